"""Streaming loader: WebDataset shards → batches, split by rank and worker, equal steps, exact resume.

The layout of an epoch is a pure function of the manifest, the seed, the epoch and the global batch G
(sequences per optimiser step), so every rank computes the same one without talking to the others,
and an optimiser step trains on the same G sequences whatever the world size, micro-batch and loader
workers (the idea of Megatron-LM's consumed-samples index):

1. the shards, in an order shuffled by (seed, epoch), form one stream of sequences;
2. the stream is cut into G slots: contiguous ranges of ``L = total // G`` sequences each; the
   remainder (fewer than G sequences) is left out of that epoch, a different one each epoch since the
   shard order changes;
3. within a slot, consecutive windows of ``ceil(shuffle_window / G)`` sequences are permuted by
   (seed, epoch, slot, window): a bounded shuffle buffer, ``shuffle_window`` sequences over all slots;
4. step s of the epoch (of L) is sequence s of each slot, in slot order. Rank r of W takes slots
   ``r·G/W … (r+1)·G/W - 1``, cut into micro-batches in that order; its DataLoader workers split
   those slots between them, each reading its own slots sequentially, and the rank joins their parts.
   Every slot is read once per epoch, by one worker of one rank; every rank has L steps per epoch
   whatever the shard sizes, so no rank ever waits in a collective for one that ran dry.

Resume: ``state_dict()`` is (epoch, steps done) plus the settings the order depends on.
``load_state_dict`` makes the next step the one the uninterrupted run would have taken: each worker
seeks (local files: by byte offset, computed from the manifest; URLs: by reading through the shard)
to the window holding it, so a resume costs reading about one window per slot, not the epoch. The
world size, micro-batch and workers may change at a resume (any that split G); a different seed,
global batch, shuffle window or dataset is refused with an error naming both values.

Bad shards: every member is checked as it streams, its bytes against the manifest's CRC-32 and its
token ids against the vocabulary. A missing, truncated or corrupt shard is an error naming the
shard, the member, the rank and the worker. With ``on_error="skip"`` it is logged and counted, and
each sequence it should have given (of a damaged member: that member's only; of a truncated or
missing shard: the rest of it) is replaced by a sequence of the next readable shard of the epoch
(same offset modulo its size): every rank keeps its number of batches, and resume stays exact.
"""

from __future__ import annotations

import bisect
import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from gpt1_ds.manifest import (
    CHECKSUM,
    MANIFEST_NAME,
    SAMPLE_EXT,
    check_compatible,
    checksum,
    decode_block,
    parse_manifest,
    read_manifest,
)
from gpt1_ds.model import IGNORE_INDEX

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: an order that depended on the world size and micro-batch
TAR_BLOCK = 512


class ShardError(RuntimeError):
    """A shard that cannot be read as its manifest describes; ``member``: the damaged member
    when the damage is known to end with it (a checksum or token-id check), else None."""

    def __init__(self, message: str, member: int | None = None) -> None:
        super().__init__(message)
        self.member = member


@dataclass(frozen=True)
class Shard:
    url: str  # a local path, or anything webdataset's gopen opens (pipe:, http)
    sequences: int
    local: bool
    sums: tuple[int, ...] | None = None  # CRC-32 of each member; None: a dataset prepared without them


@dataclass(frozen=True)
class Dataset:
    """A split: its shards and the numbers the loader needs from its manifest."""

    shards: tuple[Shard, ...]
    seq_len: int  # tokens per stored sequence, minus one
    per_sample: int  # sequences per tar member (the last member of a shard may hold fewer)
    pad_id: int
    manifest: dict[str, Any]
    verify: bool = True  # check each member's checksum and token ids as it is read
    retries: int = 3  # a streamed shard that fails in transport is read again this many times more
    retry_wait: float = 1.0  # seconds before the first retry; doubled for each next one

    def check(self, data: bytes, shard: Shard, member: int) -> np.ndarray:
        """The sequences of member ``member`` of ``shard``, after its checks."""
        if shard.sums is not None and member >= len(shard.sums):
            raise ShardError(f"member {member}: the manifest lists {len(shard.sums)}")
        if self.verify and shard.sums is not None and (crc := checksum(data)) != shard.sums[member]:
            raise ShardError(
                f"member {member}: crc32 {crc:08x}, the manifest has {shard.sums[member]:08x} "
                "(its bytes changed after data prep)",
                member,
            )
        seqs = decode_block(data, self.seq_len)
        if self.verify and (top := int(seqs.max())) >= self.manifest["vocab_size"]:
            raise ShardError(
                f"member {member}: token id {top} is outside the vocabulary of {self.manifest['vocab_size']}",
                member,
            )
        return seqs

    @property
    def total_sequences(self) -> int:
        return sum(s.sequences for s in self.shards)


def _complete(source: str, name: str) -> str:
    """The URL of file ``name``: ``{name}`` in the source replaced, or ``name`` appended."""
    return source.replace("{name}", name) if "{name}" in source else source + name


def open_dataset(
    source: str | Path,
    tokenizer_sha256: str | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
    verify: bool = True,
    retries: int = 3,
    retry_wait: float = 1.0,
) -> Dataset:
    """A split directory (local), or a URL that ``manifest.json`` and the shard names complete: appended
    (``http://host/train/``) or in place of ``{name}`` (``pipe:aws s3 cp s3://bucket/train/{name} -``);
    checked against the tokenizer and the model before anything runs. ``verify``: check each member
    as it streams (its checksum, its token ids); off only to measure what the checks cost."""
    source = str(source)
    if "://" in source or source.startswith("pipe:"):  # a URL
        from webdataset.gopen import gopen

        where = _complete(source, MANIFEST_NAME)
        try:
            with gopen(where, "rb") as f:
                data = f.read()
        except Exception as e:  # any transport error, reported with the URL
            raise FileNotFoundError(f"{where}: cannot read the manifest: {e}") from None
        manifest = parse_manifest(data, where)
        local, url = False, lambda name: _complete(source, name)
    else:
        where = str(Path(source) / MANIFEST_NAME)
        manifest = read_manifest(source)
        local, url = True, lambda name: str(Path(source) / name)
    check_compatible(manifest, where, tokenizer_sha256, vocab_size, seq_len)
    shards = tuple(
        Shard(url(s["name"]), s["sequences"], local, tuple(s[CHECKSUM]) if CHECKSUM in s else None)
        for s in manifest["shards"]
    )
    if verify and any(s.sums is None for s in shards):
        log.warning(
            "%s: no member checksums (prepared by an older data_prep.shard): bytes are not checked", where
        )
    return Dataset(
        shards,
        manifest["seq_len"],
        manifest["sequences_per_sample"],
        manifest["pad_id"],
        manifest,
        verify,
        retries,
        retry_wait,
    )


def _read_local(shard: Shard, dataset: Dataset, first: int) -> Iterator[np.ndarray]:
    """Sequences ``first``… of a local shard, seeking straight to the member that holds ``first``."""
    k, row = dataset.per_sample, 2 * (dataset.seq_len + 1)
    block = first // k
    stride = TAR_BLOCK + -(-(k * row) // TAR_BLOCK) * TAR_BLOCK  # one full member: header + padded data
    with open(shard.url, "rb") as f:
        f.seek(block * stride)
        done = block * k
        while done < shard.sequences:
            header = f.read(TAR_BLOCK)
            if len(header) < TAR_BLOCK or not header.strip(b"\0"):
                break
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            expected = min(k, shard.sequences - done) * row
            if not info.name.endswith(f"-{block:06d}.{SAMPLE_EXT}") or info.size != expected:
                raise ShardError(f"member {block} is {info.name!r} of {info.size} bytes, expected {expected}")
            data = f.read(info.size)
            if len(data) < info.size:
                break
            f.seek(-info.size % TAR_BLOCK, 1)
            seqs = dataset.check(data, shard, block)
            yield seqs[first - done :] if first > done else seqs
            done += len(seqs)
            block += 1
    if done < shard.sequences:
        raise ShardError(f"truncated: {done} of {shard.sequences} sequences")


def _read_stream(shard: Shard, dataset: Dataset, first: int) -> Iterator[np.ndarray]:
    """Sequences ``first``… of a shard read as a stream (pipe:, http): members before it are skipped."""
    from webdataset.gopen import gopen

    done = 0
    with gopen(shard.url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for index, member in enumerate(tar):
            n = member.size // (2 * (dataset.seq_len + 1))
            if done + n <= first:
                done += n
                continue
            seqs = dataset.check(tar.extractfile(member).read(), shard, index)
            yield seqs[first - done :] if first > done else seqs
            done += len(seqs)
    if done < shard.sequences:
        raise ShardError(f"truncated: {done} of {shard.sequences} sequences")


def read_shard(shard: Shard, dataset: Dataset, first: int = 0, where: str = "") -> Iterator[np.ndarray]:
    """Blocks of sequences [n, seq_len + 1] from sequence ``first`` to the shard's end. A streamed
    shard (pipe:, http) that fails in transport (a dropped connection, a server down for a moment)
    is opened again and read on from where it stopped, up to ``dataset.retries`` times, waiting
    ``retry_wait`` × 1, 2, 4… seconds; damaged contents (a member's checks) are not retried."""
    reader = _read_local if shard.local else _read_stream
    attempt = 0
    while True:
        try:
            for chunk in reader(shard, dataset, first):
                yield chunk
                first += len(chunk)
            return
        except (ShardError, OSError, tarfile.TarError, ValueError, EOFError) as e:
            error = e if isinstance(e, ShardError) else ShardError(f"{type(e).__name__}: {e}")
            if shard.local or error.member is not None or attempt >= dataset.retries:
                raise error from None
            wait = dataset.retry_wait * 2**attempt
            attempt += 1
            log.warning(
                "%sshard %s: %s; reading on from sequence %d in %.1f s (retry %d of %d)",
                f"{where}: " if where else "",
                shard.url,
                str(error).strip(),
                first,
                wait,
                attempt,
                dataset.retries,
            )
            time.sleep(wait)


class _Stream:
    """The sequences of one epoch's stream, from any position, with bad shards handled."""

    def __init__(self, dataset: Dataset, order: np.ndarray, on_error: str, where: str) -> None:
        self.dataset, self.order, self.on_error, self.where = dataset, order, on_error, where
        self.starts = np.concatenate([[0], np.cumsum([dataset.shards[i].sequences for i in order])]).tolist()
        self.bad: set[int] = set()
        self.skipped = 0
        self._gen: Iterator[np.ndarray] | None = None
        self._left: np.ndarray | None = None
        self._pos = 0

    def read(self, start: int, count: int) -> Iterator[np.ndarray]:
        """``count`` sequences from stream position ``start``, in chunks. A read that goes
        on where the previous one ended continues the open shard instead of seeking."""
        if self._gen is None or self._pos != start:
            i = bisect.bisect_right(self.starts, start) - 1
            self._gen, self._left, self._pos = self._chain(i, start - self.starts[i]), None, start
        while count > 0:
            chunk = self._left if self._left is not None else next(self._gen)
            self._left = chunk[count:] if len(chunk) > count else None
            chunk = chunk[:count]
            count -= len(chunk)
            self._pos += len(chunk)
            yield chunk

    def _chain(self, i: int, offset: int) -> Iterator[np.ndarray]:
        while i < len(self.order):
            yield from self._region(i, offset)
            i, offset = i + 1, 0

    def _region(self, i: int, offset: int) -> Iterator[np.ndarray]:
        """Sequences offset… of the i-th shard of the order; a damaged part is replaced by the
        sequences of a substitute, and a damaged member only until its end: what a position
        gives depends on the position alone, so a resume that starts anywhere reads the same."""
        shard_index = int(self.order[i])
        shard = self.dataset.shards[shard_index]
        while offset < shard.sequences:
            end = shard.sequences
            if shard_index not in self.bad:
                try:
                    for chunk in read_shard(shard, self.dataset, offset, self.where):
                        yield chunk
                        offset += len(chunk)
                    return
                except ShardError as e:
                    end = self._damaged(shard_index, e)
            yield from self._substitute(i, offset, end)
            offset = end

    def _damaged(self, shard_index: int, error: ShardError) -> int:
        """Raise, or log and count a damaged shard; returns where its damage ends."""
        shard = self.dataset.shards[shard_index]
        if self.on_error != "skip":
            raise ShardError(f"{self.where}: shard {shard.url}: {error}", error.member) from None
        self.skipped += 1
        log.warning("%s: skipping shard %s (%s)", self.where, shard.url, error)
        if error.member is None:
            self.bad.add(shard_index)
            return shard.sequences
        return min(shard.sequences, (error.member + 1) * self.dataset.per_sample)

    def _substitute(self, i: int, offset: int, end: int) -> Iterator[np.ndarray]:
        """Sequences offset…end of the i-th shard of the order, taken from the next readable shard
        of the order at the same offset modulo its size."""
        for step in range(1, len(self.order)):
            j = int(self.order[(i + step) % len(self.order)])
            if j in self.bad:
                continue
            sub = self.dataset.shards[j]
            try:
                while offset < end:
                    for chunk in read_shard(sub, self.dataset, offset % sub.sequences, self.where):
                        chunk = chunk[: end - offset]
                        yield chunk
                        offset += len(chunk)
                        if offset >= end:
                            break
                return
            except ShardError as e:
                self.bad.add(j)
                self.skipped += 1
                log.warning("%s: skipping shard %s (%s)", self.where, sub.url, e)
        raise ShardError(f"{self.where}: no readable shard left")


def to_batch(seqs: np.ndarray, seq_len: int, pad_id: int) -> dict[str, Any]:
    """[B, ≥ seq_len + 1] uint16 → input_ids and targets [B, seq_len] (int64; padding → IGNORE_INDEX),
    and ``counted``: the targets that count, an int (no tensor read)."""
    x = torch.from_numpy(seqs[:, :seq_len].astype(np.int64))
    pad = seqs[:, 1 : seq_len + 1] == pad_id
    y = torch.from_numpy(seqs[:, 1 : seq_len + 1].astype(np.int64))
    y[torch.from_numpy(pad)] = IGNORE_INDEX
    return {"input_ids": x, "targets": y, "counted": int(pad.size - pad.sum())}


RESUME_KEYS = {
    "tokenizer_sha256": "tokenizer sha256",
    "total_sequences": "training sequences",
    "global_batch": "train_batch_size",
}
"""What the loader state's keys are to a user: the run setting, or what of the dataset."""


@dataclass(frozen=True)
class Layout:
    """Everything the order of an epoch's steps depends on: not the world size, the micro-batch
    or the workers."""

    seed: int
    global_batch: int  # sequences per optimiser step, and slots: a step takes one sequence of each
    shuffle: bool
    shuffle_window: int  # sequences shuffled together, over all the slots

    @property
    def window(self) -> int:
        """Each slot's shuffle window, in sequences (= steps)."""
        return max(1, -(-self.shuffle_window // self.global_batch))

    def steps(self, total: int) -> int:
        """Optimiser steps per epoch: each slot's length."""
        return total // self.global_batch

    def order(self, n_shards: int, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n_shards)
        return np.random.default_rng([self.seed, epoch]).permutation(n_shards)


def read_slots(
    dataset: Dataset, layout: Layout, epoch: int, slots: range, first_step: int, seq_len: int,
    on_error: str, where: str,
) -> Iterator[tuple[np.ndarray, int]]:  # fmt: skip
    """Steps ``first_step``… of one epoch for ``slots``: ([len(slots), seq_len + 1] uint16, shards
    skipped so far), read a shuffle window at a time, each slot through its own stream."""
    steps, w = layout.steps(dataset.total_sequences), layout.window
    order = layout.order(len(dataset.shards), epoch)
    streams = [_Stream(dataset, order, on_error, where) for _ in slots]
    for start in range(first_step // w * w, steps, w):
        n = min(w, steps - start)
        block = np.empty((len(slots), n, seq_len + 1), np.uint16)  # [slot, step, token]
        for i, (slot, stream) in enumerate(zip(slots, streams, strict=True)):
            seqs = np.concatenate(list(stream.read(slot * steps + start, n)))
            if layout.shuffle:
                seqs = seqs[np.random.default_rng([layout.seed, epoch, slot, start]).permutation(n)]
            block[i] = seqs[:, : seq_len + 1]
        skipped = sum(s.skipped for s in streams)
        for step in range(max(first_step, start), start + n):
            yield np.ascontiguousarray(block[:, step - start]), skipped


class _RankDataset(IterableDataset):
    """A rank's share of every step from its (epoch, step) on, epoch after epoch: one item per step
    and worker, the worker's slots (a contiguous part of the rank's)."""

    def __init__(self, loader: TrainLoader) -> None:
        super().__init__()
        self.dataset, self.layout, self.rank = loader.dataset, loader.layout, loader.rank
        self.slots, self.workers, self.seq_len = loader.slots, loader.workers, loader.seq_len
        self.on_error, self.start_epoch, self.start_step = loader.on_error, loader.epoch, loader.step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        per = len(self.slots) // self.workers
        mine = self.slots[worker * per : (worker + 1) * per]
        where = f"rank {self.rank} worker {worker}"
        epoch, step = self.start_epoch, self.start_step
        while True:
            args = (self.dataset, self.layout, epoch, mine, step, self.seq_len, self.on_error, where)
            for seqs, skipped in read_slots(*args):
                # uint16 as stored: 4× less to move from a worker than the int64 batch (to_batch makes it)
                yield {"tokens": torch.from_numpy(seqs.view(np.int16)), "skipped_shards": skipped}
            epoch, step = epoch + 1, 0


class TrainLoader:
    """Shuffled training micro-batches for one rank: ``next_step()`` gives an optimiser step's,
    iterating gives them one by one to the end of the current epoch.

    ``len(loader)`` is the number of micro-batches per epoch, the same on every rank.
    ``state_dict()`` / ``load_state_dict()`` give exact resume (see the module doc).
    """

    def __init__(
        self,
        source: str | Path | Dataset,
        batch_size: int,
        *,
        global_batch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle: bool = True,
        shuffle_window: int = 4096,
        on_error: str = "raise",
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        seq_len: int | None = None,
        vocab_size: int | None = None,
        tokenizer_sha256: str | None = None,
        verify: bool = True,
        retries: int = 3,
        retry_wait: float = 1.0,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset = (
            source
            if isinstance(source, Dataset)
            else open_dataset(source, tokenizer_sha256, vocab_size, seq_len, verify, retries, retry_wait)
        )
        self.seq_len = seq_len or self.dataset.seq_len
        global_batch = global_batch or batch_size * world_size
        per_rank, self.workers = global_batch // world_size, max(1, num_workers)
        if global_batch % world_size or per_rank % batch_size:
            raise ValueError(
                f"the global batch of {global_batch} sequences does not split into micro-batches of "
                f"{batch_size} over {world_size} ranks"
            )
        if per_rank % self.workers:
            raise ValueError(
                f"num_workers {num_workers} does not divide the {per_rank} sequences a rank takes per step "
                f"(each worker reads whole slots): use a divisor of {per_rank}"
            )
        self.layout = Layout(seed, global_batch, shuffle, shuffle_window)
        self.steps_per_epoch = self.layout.steps(self.dataset.total_sequences)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{source}: {self.dataset.total_sequences} sequences cannot give one step of {global_batch}"
            )
        self.batch_size, self.accumulation = batch_size, per_rank // batch_size
        self.slots = range(rank * per_rank, (rank + 1) * per_rank)
        self.rank, self.world_size, self.num_workers, self.on_error = rank, world_size, num_workers, on_error
        self._dl_kw = dict(pin_memory=pin_memory, prefetch_factor=prefetch_factor, persistent_workers=False)
        self.epoch, self.step = 0, 0
        self._pending: list[dict[str, Any]] = []  # this step's micro-batches not yet given
        self._iter: Iterator[dict[str, Any]] | None = None
        self._skipped: dict[int, int] = {}

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accumulation

    @property
    def skipped_shards(self) -> int:
        """Shards skipped so far this epoch (``on_error="skip"``), summed over this rank's workers."""
        return sum(self._skipped.values())

    def _start(self) -> Iterator[dict[str, Any]]:
        ds = _RankDataset(self)
        if self.num_workers == 0:
            return iter(ds)
        return iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, **self._dl_kw))

    def next_step(self) -> list[dict[str, Any]]:
        """The micro-batches of this rank's next optimiser step (the next epoch's first at an epoch's end)."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} micro-batches of the current step were not taken")
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self._iter is None:  # one underlying iterator runs across epochs: the workers persist
            self._iter = self._start()
        parts = []
        for worker in range(self.workers):  # a DataLoader takes its workers' items in turn
            raw = next(self._iter)
            self._skipped[worker] = int(raw["skipped_shards"])
            parts.append(raw["tokens"].numpy().view(np.uint16))
        seqs, b = np.concatenate(parts), self.batch_size
        self.step += 1
        return [to_batch(seqs[i : i + b], self.seq_len, self.dataset.pad_id) for i in range(0, len(seqs), b)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self._pending or self.step < self.steps_per_epoch:
            if not self._pending:
                self._pending = self.next_step()
            yield self._pending.pop(0)
        self.epoch, self.step = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands, in steps, and what the order depends on; taken between steps."""
        if self._pending:
            raise RuntimeError(f"loader state taken inside a step ({len(self._pending)} micro-batches to go)")
        epoch, step = (self.epoch + 1, 0) if self.step == self.steps_per_epoch else (self.epoch, self.step)
        return {
            "version": STATE_VERSION,
            "epoch": epoch,
            "steps": step,
            **asdict(self.layout),  # seed, global_batch, shuffle, shuffle_window
            "total_sequences": self.dataset.total_sequences,
            "tokenizer_sha256": self.dataset.manifest["tokenizer_sha256"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken, on any world size, micro-batch and workers
        that split its global batch; the dataset and the settings of the order must match."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"the checkpoint's loader state is version {state.get('version')}, whose data order depended "
                f"on the world size and micro-batch; this gpt1-ds orders each step by train_batch_size "
                f"alone (version {STATE_VERSION}) and cannot continue it exactly: train on from its weights "
                "in a new run (init=CHECKPOINT with another --run-dir)"
            )
        mine = self.state_dict()
        for key in ("tokenizer_sha256", "total_sequences"):  # the dataset itself first
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"the checkpoint was trained on another dataset ({RESUME_KEYS[key]} "
                    f"{str(state.get(key))[:12]}; the train split given now has {str(mine[key])[:12]}, "
                    f"tokenizer sha256 {mine['tokenizer_sha256'][:12]}): resume with the run's own --data, "
                    "or start a new run (resume=new, or another --run-dir)"
                )
        for key in (k for k in mine if k not in ("epoch", "steps")):
            if state.get(key) != mine[key]:
                setting = RESUME_KEYS.get(key, key)
                raise ValueError(
                    f"the checkpoint's batch order was made with {setting}={state.get(key)!r}, this run has "
                    f"{mine[key]!r}: set {setting}={state.get(key)!r} to resume it exactly"
                )
        if not 0 <= state["steps"] < self.steps_per_epoch:
            raise ValueError(f"loader state steps {state['steps']} is outside this epoch")
        self.epoch, self.step = int(state["epoch"]), int(state["steps"])
        self._iter = None


class EvalLoader:
    """Validation batches in a fixed order; the ranks cover the split, or its first
    ``max_batches × batch_size × world_size`` sequences, exactly once between them. Ranks may get one
    sequence more or less and the last batch may be short: sum the losses and counts, then all-reduce once."""

    def __init__(
        self,
        source: str | Path,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_batches: int | None = None,
        seq_len: int | None = None,
        vocab_size: int | None = None,
        tokenizer_sha256: str | None = None,
        retries: int = 3,
        retry_wait: float = 1.0,
    ) -> None:
        self.dataset = open_dataset(source, tokenizer_sha256, vocab_size, seq_len, True, retries, retry_wait)
        self.seq_len = seq_len or self.dataset.seq_len
        total = self.dataset.total_sequences
        if max_batches is not None:
            total = min(total, max_batches * batch_size * world_size)
        self.start = rank * total // world_size
        self.count = (rank + 1) * total // world_size - self.start
        self.batch_size, self.rank = batch_size, rank

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        stream = _Stream(self.dataset, np.arange(len(self.dataset.shards)), "raise", f"rank {self.rank} eval")
        pending: list[np.ndarray] = []
        have = 0
        for chunk in stream.read(self.start, self.count):
            pending.append(chunk)
            have += len(chunk)
            while have >= self.batch_size:
                seqs = np.concatenate(pending)
                yield to_batch(seqs[: self.batch_size], self.seq_len, self.dataset.pad_id)
                pending, have = [seqs[self.batch_size :]], have - self.batch_size
        if have:
            yield to_batch(np.concatenate(pending), self.seq_len, self.dataset.pad_id)
