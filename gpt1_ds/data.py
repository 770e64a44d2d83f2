"""Streaming loader: WebDataset shards → batches, split by rank and worker, equal steps, exact resume.

The layout of an epoch is a pure function of the manifest, the seed, the epoch, the world size, the
number of workers and the batch size, so every rank computes the same one without talking to the others:

1. the shards, in an order shuffled by (seed, epoch), form one stream of sequences;
2. the stream is cut into ``slots`` contiguous ranges (default: world size × DataLoader workers per
   rank) of ``L`` sequences each, ``L`` the largest multiple of the batch size B that fits; the
   remainder (fewer than ``slots × B`` sequences) is left out of that epoch, a different remainder
   each epoch since the shard order changes;
3. within a slot, consecutive windows of ``shuffle_window`` sequences are permuted by
   (seed, epoch, slot, window): a bounded shuffle buffer;
4. micro-batch t of the epoch is batch ``t // slots`` of slot ``t % slots``: the slots are read side
   by side. Rank r takes the micro-batches with ``t % world_size == r`` and its DataLoader workers take
   turns, each reading its own slots sequentially. Every rank yields ``slots × L / B / world_size``
   micro-batches per epoch whatever the shard sizes, so no rank ever waits in a collective for one
   that ran dry; and the micro-batches of an optimiser step (``world_size × accumulation``
   consecutive t) are the same whatever the world size, for a given number of slots.

Resume: ``state_dict()`` is (epoch, micro-batches consumed across ranks) plus the settings the order
depends on. ``load_state_dict`` makes the next batch the one the uninterrupted run would have yielded:
each worker seeks (local files: by byte offset, computed from the manifest; URLs: by reading through
the shard) to the window holding its next batch, so a resume costs reading about one window per slot,
not the epoch. The world size and worker count may change at a resume when the saved slot count is a
multiple of the new world size × workers (the order, and so the epoch's coverage, is then unchanged);
otherwise, and for a different seed, batch size or dataset, it is refused with an error naming both
values.

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
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.manifest import (
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

STATE_VERSION = 1
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


def to_batch(seqs: np.ndarray, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """[B, ≥ seq_len + 1] uint16 → input_ids and targets [B, seq_len] (int64; padding → IGNORE_INDEX)."""
    x = torch.from_numpy(seqs[:, :seq_len].astype(np.int64))
    y = torch.from_numpy(seqs[:, 1 : seq_len + 1].astype(np.int64))
    y[y == pad_id] = IGNORE_INDEX
    return {"input_ids": x, "targets": y}


RESUME_KEYS = {
    "tokenizer_sha256": "tokenizer sha256",
    "total_sequences": "training sequences",
    "batch_size": "micro_batch_size",
    "window": "shuffle_window",
}
"""What the loader state's keys are to a user: the run setting, or what of the dataset."""


@dataclass(frozen=True)
class Layout:
    """Everything the order of the micro-batches depends on (not the world size)."""

    seed: int
    slots: int  # contiguous ranges of the epoch's stream, read in parallel
    batch_size: int
    shuffle: bool
    window: int  # shuffle window in sequences, a multiple of batch_size

    def slot_len(self, total: int) -> int:
        return total // (self.slots * self.batch_size) * self.batch_size

    def order(self, n_shards: int, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n_shards)
        return np.random.default_rng([self.seed, epoch]).permutation(n_shards)


class _Slots:
    """One epoch's micro-batches by (slot, index in the slot), read window by window, one stream per slot."""

    def __init__(self, dataset: Dataset, layout: Layout, epoch: int, seq_len: int, on_error: str, where: str):
        self.layout, self.epoch, self.seq_len = layout, epoch, seq_len
        self.slot_len = layout.slot_len(dataset.total_sequences)
        order = layout.order(len(dataset.shards), epoch)
        self.readers: dict[int, _Stream] = defaultdict(lambda: _Stream(dataset, order, on_error, where))
        self.windows: dict[int, tuple[int, np.ndarray]] = {}

    def batch(self, slot: int, index: int) -> dict[str, Any]:
        lay, B = self.layout, self.layout.batch_size
        start = index * B
        w_start = start // lay.window * lay.window
        cached = self.windows.get(slot)
        if cached is None or cached[0] != w_start:
            n = min(lay.window, self.slot_len - w_start)
            seqs = np.concatenate(list(self.readers[slot].read(slot * self.slot_len + w_start, n)))
            if lay.shuffle:
                seqs = seqs[np.random.default_rng([lay.seed, self.epoch, slot, w_start]).permutation(n)]
            self.windows[slot] = cached = (w_start, seqs)
        # uint16 as stored: 4× less to move from a worker than the int64 batch (to_batch makes it)
        seqs = np.ascontiguousarray(cached[1][start - w_start : start - w_start + B, : self.seq_len + 1])
        return {
            "tokens": torch.from_numpy(seqs.view(np.int16)),
            "skipped_shards": sum(r.skipped for r in self.readers.values()),
        }


class _RankDataset(IterableDataset):
    """A loader's micro-batches from its (epoch, batch) on, epoch after epoch (order: see the module doc)."""

    def __init__(self, loader: TrainLoader) -> None:
        super().__init__()
        self.dataset, self.layout, self.rank = loader.dataset, loader.layout, loader.rank
        self.world_size, self.workers, self.seq_len = loader.world_size, loader.workers, loader.seq_len
        self.on_error, self.start_epoch, self.start_batch = loader.on_error, loader.epoch, loader.batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # The DataLoader asks worker 0 first; after a resume at rank batch k, the next
        # batch belongs to logical worker k mod W, so worker ids are rotated by that.
        lay, world, W, epoch = self.layout, self.world_size, self.workers, self.start_epoch
        worker = (physical + self.start_batch) % W
        j = max(0, -(-(self.start_batch - worker) // W))  # ceil((k - w) / W): this worker's batches done
        where = f"rank {self.rank} worker {worker}"
        per_epoch = lay.slots * lay.slot_len(self.dataset.total_sequences) // lay.batch_size
        while True:
            slots = _Slots(self.dataset, lay, epoch, self.seq_len, self.on_error, where)
            while (t := (j * W + worker) * world + self.rank) < per_epoch:
                yield slots.batch(t % lay.slots, t // lay.slots)
                j += 1
            epoch, j = epoch + 1, 0


class TrainLoader:
    """Shuffled training micro-batches for one rank; iterate for the rest of the current epoch.

    ``len(loader)`` is the number of micro-batches per epoch, the same on every rank.
    ``state_dict()`` / ``load_state_dict()`` give exact resume (see the module doc).
    """

    def __init__(
        self,
        source: str | Path,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        slots: int | None = None,
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
        self.dataset = open_dataset(
            source, tokenizer_sha256, vocab_size, seq_len, verify, retries, retry_wait
        )
        self.seq_len = seq_len or self.dataset.seq_len
        self.world_size, self.workers = world_size, max(1, num_workers)
        slots = slots or world_size * self.workers
        if slots % (world_size * self.workers):
            raise ValueError(
                f"slots {slots} is not a multiple of world_size {world_size} × workers {self.workers}"
            )
        window = max(1, -(-shuffle_window // batch_size)) * batch_size
        self.layout = Layout(seed, slots, batch_size, shuffle, window)
        if (slot_len := self.layout.slot_len(self.dataset.total_sequences)) == 0:
            raise ValueError(
                f"{source}: {self.dataset.total_sequences} sequences cannot give one batch of {batch_size} "
                f"to each of {slots} slots ({world_size} ranks × {self.workers} workers)"
            )
        self.batches_per_epoch = slots * slot_len // batch_size // world_size
        self.rank, self.num_workers, self.on_error = rank, num_workers, on_error
        self._dl_kw = dict(pin_memory=pin_memory, prefetch_factor=prefetch_factor, persistent_workers=False)
        self.epoch, self.batch = 0, 0
        self._iter: Iterator[dict[str, Any]] | None = None
        self._skipped: dict[int, int] = {}

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def skipped_shards(self) -> int:
        """Shards skipped so far (``on_error="skip"``), summed over this rank's workers."""
        return sum(self._skipped.values())

    def _start(self) -> Iterator[dict[str, Any]]:
        ds = _RankDataset(self)
        if self.num_workers == 0:
            return iter(ds)
        return iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, **self._dl_kw))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._iter is None:  # one underlying iterator runs across epochs: the workers persist
            self._iter = self._start()
        while self.batch < self.batches_per_epoch:
            raw = next(self._iter)
            worker = (self.batch + self.epoch * self.batches_per_epoch) % self.workers
            self._skipped[worker] = int(raw["skipped_shards"])
            self.batch += 1
            yield to_batch(raw["tokens"].numpy().view(np.uint16), self.seq_len, self.dataset.pad_id)
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands, in world-size-free terms, and what the order depends on."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "micro_batches": self.batch * self.world_size,
            **asdict(self.layout),  # seed, slots, batch_size, shuffle, window
            "total_sequences": self.dataset.total_sequences,
            "tokenizer_sha256": self.dataset.manifest["tokenizer_sha256"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken. The world size and the workers may change if the
        saved slot count is a multiple of world size × workers; the other settings of the order must match."""
        mine = self.state_dict()
        for key in ("tokenizer_sha256", "total_sequences"):  # the dataset itself first
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"the checkpoint was trained on another dataset ({RESUME_KEYS[key]} "
                    f"{str(state.get(key))[:12]}; the train split given now has {str(mine[key])[:12]}, "
                    f"tokenizer sha256 {mine['tokenizer_sha256'][:12]}): resume with the run's own --data, "
                    "or start a new run (resume=new, or another --run-dir)"
                )
        for key in (k for k in mine if k not in ("epoch", "micro_batches", "slots")):
            if state.get(key) != mine[key]:
                setting = RESUME_KEYS.get(key, key)
                raise ValueError(
                    f"the checkpoint's batch order was made with {setting}={state.get(key)!r}, this run has "
                    f"{mine[key]!r}: set {setting}={state.get(key)!r} to resume it exactly"
                )
        slots, consumed = state["slots"], state["micro_batches"]
        if slots % (self.world_size * self.workers) or consumed % self.world_size:
            raise ValueError(
                f"loader state has slots={slots}, micro_batches={consumed}: world_size {self.world_size} × "
                f"workers {self.workers} cannot continue it exactly (slots must be a multiple of "
                "world_size × workers, micro_batches of world_size)"
            )
        if slots != self.layout.slots:
            self.layout = replace(self.layout, slots=slots)
            slot_len = self.layout.slot_len(self.dataset.total_sequences)
            self.batches_per_epoch = slots * slot_len // self.layout.batch_size // self.world_size
        if not 0 <= consumed // self.world_size < self.batches_per_epoch:
            raise ValueError(f"loader state micro_batches {consumed} is outside this epoch")
        self.epoch, self.batch = int(state["epoch"]), consumed // self.world_size
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
