"""gpt1_ds.data: rank/worker split, equal steps, exact resume, bad shards, eval coverage."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import write_numbered_split

from gpt1_ds.data import EvalLoader, ShardError, TrainLoader
from gpt1_ds.env import free_port
from gpt1_ds.manifest import CHECKSUM, MANIFEST_NAME, shard_name
from gpt1_ds.model import IGNORE_INDEX


def seq_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    """The number each sequence of a numbered batch carries."""
    return [((int(x) - 1) // 16) for x in batch["input_ids"][:, 0]]


def digest(batch: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(
        batch["input_ids"].numpy().tobytes() + batch["targets"].numpy().tobytes()
    ).hexdigest()


def take(loader: TrainLoader, n: int) -> list[str]:
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(digest(batch))
            if len(out) == n:
                break
    return out


def test_batches_are_inputs_and_shifted_targets(prepared):
    loader = TrainLoader(prepared / "train", batch_size=4)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 64)
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.int64
    x, y = batch["input_ids"], batch["targets"]
    assert torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(numbered, workers):
    kw = dict(batch_size=6, global_batch=12, seed=7, num_workers=workers, shuffle_window=24)
    full = TrainLoader(numbered, **kw)
    assert len(full) < 50  # the 50 micro-batches (25 steps of 2) cross an epoch boundary
    reference = take(full, 50)
    first = TrainLoader(numbered, **kw)
    head = take(first, 21)
    with pytest.raises(RuntimeError, match="loader state taken inside a step"):
        first.state_dict()
    head += take(first, 1)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would carry it
    assert (state["epoch"], state["steps"]) == (0, 11)
    second = TrainLoader(numbered, **kw)
    second.load_state_dict(state)
    assert head + take(second, 28) == reference
    assert len(set(reference[: len(full)])) == len(full)  # no batch twice within an epoch


def test_epochs_differ_and_seeds_differ(numbered):
    loader = TrainLoader(numbered, batch_size=4, seed=1)
    n = len(loader)
    two = take(loader, 2 * n)
    assert two[:n] != two[n:]
    assert take(TrainLoader(numbered, batch_size=4, seed=2), n) != two[:n]


def collect_epoch(source: Path, world: int, workers: int, batch_size: int = 4, shuffle: bool = True):
    per_rank = []
    for rank in range(world):
        loader = TrainLoader(
            source,
            batch_size=batch_size,
            rank=rank,
            world_size=world,
            num_workers=workers,
            shuffle=shuffle,
            shuffle_window=8,
        )
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append([i for b in batches for i in seq_ids(b)])
    return per_rank


@pytest.mark.parametrize("shuffle", [True, False])
def test_one_epoch_over_2_ranks_x_2_workers_covers_each_sequence_once(numbered, shuffle):
    per_rank = collect_epoch(numbered, world=2, workers=2, shuffle=shuffle)
    seen = [i for r in per_rank for i in r]
    total = 37 + 3 + 100 + 61 + 12 + 45
    assert len(seen) == len(set(seen))  # nothing twice
    assert set(seen) <= set(range(1, total + 1))
    assert total - len(seen) < 2 * 2 * 4  # the documented remainder
    assert len(per_rank[0]) == len(per_rank[1])  # same number of batches on every rank


def test_uneven_shards_give_equal_steps_per_rank(tmp_path):
    split = write_numbered_split(tmp_path / "uneven", [3 * 4, 100 * 4])  # 3 samples and 100 samples
    for workers in (0, 2):
        counts = [
            len(list(TrainLoader(split, batch_size=8, rank=r, world_size=2, num_workers=workers)))
            for r in range(2)
        ]
        assert counts[0] == counts[1] > 0
        assert counts[0] == len(TrainLoader(split, batch_size=8, rank=0, world_size=2, num_workers=workers))


def test_truncated_shard_is_an_error_naming_it_or_skipped_and_counted(numbered):
    victim = numbered / shard_name(2)
    victim.write_bytes(victim.read_bytes()[:3000])
    with pytest.raises(ShardError, match=r"rank 1 worker 0: shard .*shard-000002\.tar: truncated"):
        for _ in TrainLoader(numbered, batch_size=4, rank=1, world_size=2, shuffle=False):
            pass
    counts = []
    for rank in range(2):
        loader = TrainLoader(numbered, batch_size=4, rank=rank, world_size=2, on_error="skip")
        counts.append(len(list(loader)))
        assert counts[-1] == len(loader)
    assert counts[0] == counts[1]
    loader = TrainLoader(numbered, batch_size=4, on_error="skip", num_workers=2)
    assert len(list(loader)) == len(loader) and loader.skipped_shards >= 1


MEMBER_STRIDE = 1024  # numbered shards: a 512-byte header and 72 bytes of data padded to 512


def flip(path: Path, offset: int, mask: int) -> None:
    """XOR one byte of a file in place: same size, still a valid tar."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def drop_checksums(split: Path) -> None:
    """Make the split look prepared by an older data_prep.shard (no member checksums)."""
    manifest = json.loads((split / MANIFEST_NAME).read_text())
    for shard in manifest["shards"]:
        del shard[CHECKSUM]
    (split / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_ids_outside_the_vocabulary_are_caught_with_or_without_checksums(prepared, tmp_path, caplog):
    import shutil

    split = shutil.copytree(prepared / "train", tmp_path / "train")
    per_sample, seq_len = 16, 64  # PREP_ARGS
    stride = 512 + -(-(per_sample * (seq_len + 1) * 2) // 512) * 512
    flip(split / shard_name(0), 2 * stride + 512 + 1, 0xF0)  # high byte of member 2's first id: ≥ 2000
    loader = TrainLoader(split, batch_size=4, shuffle=False)
    with pytest.raises(ShardError, match=r"rank 0 worker 0: shard .*shard-000000\.tar: member 2: crc32"):
        list(loader)
    drop_checksums(split)
    with caplog.at_level("WARNING", logger="gpt1_ds.data"):
        loader = TrainLoader(split, batch_size=4, shuffle=False)
    assert "no member checksums" in caplog.text
    with pytest.raises(ShardError, match=r"member 2: token id \d+ is outside the vocabulary of 2000"):
        list(loader)


def test_a_low_bit_flip_is_seen_only_by_the_checksum(numbered):
    clean = take(TrainLoader(numbered, batch_size=1, shuffle=False), 60)  # the stream in order
    flip(numbered / shard_name(2), 3 * MEMBER_STRIDE + 512 + 6, 0x01)  # one id of member 3, still valid
    unchecked = take(TrainLoader(numbered, batch_size=1, shuffle=False, verify=False), 60)
    assert unchecked != clean and sum(a != b for a, b in zip(unchecked, clean, strict=True)) == 1
    with pytest.raises(ShardError, match=r"rank 0 worker 0: shard .*shard-000002\.tar: member 3: crc32 "):
        list(TrainLoader(numbered, batch_size=4, rank=0, world_size=2, shuffle=False))
    with pytest.raises(ShardError, match=r"shard-000002\.tar: member 3: crc32 "):
        list(TrainLoader(f"pipe:cat {numbered}/", batch_size=4, shuffle=False))  # read as a stream


def test_a_damaged_member_is_skipped_alone_and_resume_stays_exact(numbered):
    flip(numbered / shard_name(2), 3 * MEMBER_STRIDE + 512 + 6, 0x01)  # sequences 12-15 of shard 2
    first_of_shard_2 = 1 + 37 + 3  # numbered sequences start at 1
    damaged = set(range(first_of_shard_2 + 12, first_of_shard_2 + 16))

    def run(n: int, state=None) -> tuple[list[str], list[int], TrainLoader]:
        loader = TrainLoader(numbered, batch_size=4, seed=1, num_workers=2, on_error="skip")
        if state is not None:
            loader.load_state_dict(state)
        digests, ids = [], []
        for batch in loader:
            digests.append(digest(batch))
            ids += seq_ids(batch)
            if len(digests) == n:
                break
        return digests, ids, loader

    whole, ids, loader = run(len(TrainLoader(numbered, batch_size=4)))
    assert len(whole) == len(loader) and loader.skipped_shards >= 1
    assert not damaged & set(ids)
    assert {first_of_shard_2 + 11, first_of_shard_2 + 16} <= set(ids)  # the member's neighbours are read
    for cut in (5, 17, 30):
        head, _, stopped = run(cut)
        tail, _, _ = run(len(whole) - cut, stopped.state_dict())
        assert head + tail == whole, cut


def test_missing_shard_is_an_error(numbered):
    (numbered / shard_name(0)).unlink()
    with pytest.raises(ShardError, match=r"shard-000000\.tar"):
        list(TrainLoader(numbered, batch_size=4, shuffle=False))


def test_manifest_mismatch_is_a_clear_error(numbered, prepared):
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        TrainLoader(numbered, batch_size=4, tokenizer_sha256="f" * 64)
    with pytest.raises(ValueError, match="vocab_size 2000 exceeds the model's 1000"):
        TrainLoader(prepared / "train", batch_size=4, vocab_size=1000)
    with pytest.raises(ValueError, match="seq_len 64 is shorter than the model's 128"):
        TrainLoader(prepared / "train", batch_size=4, seq_len=128)
    with pytest.raises(FileNotFoundError, match="manifest"):
        TrainLoader(numbered / "nowhere", batch_size=4)


def test_a_state_of_another_order_or_dataset_is_refused_naming_the_setting(numbered):
    state = TrainLoader(numbered, batch_size=4, world_size=1).state_dict()
    with pytest.raises(
        ValueError, match=r"made with train_batch_size=4, this run has 8: set train_batch_size=4"
    ):
        TrainLoader(numbered, batch_size=4, world_size=2).load_state_dict(state)
    with pytest.raises(
        ValueError, match=r"made with seed=0, this run has 5: set seed=0 to resume it exactly"
    ):
        TrainLoader(numbered, batch_size=4, seed=5).load_state_dict(state)
    other = {**state, "total_sequences": state["total_sequences"] + 1}  # another dataset, same tokenizer
    with pytest.raises(ValueError) as e:
        TrainLoader(numbered, batch_size=4).load_state_dict(other)
    assert re.match(
        r"the checkpoint was trained on another dataset \(training sequences \d+; the train split given now "
        r"has \d+, tokenizer sha256 [0-9a-f]{12}\): resume with the run's own --data, or start a new run",
        str(e.value),
    )
    # a state written before the order depended on the global batch alone
    old = {"version": 1, "epoch": 0, "micro_batches": 4, "slots": 1, "batch_size": 4, "window": 4096}
    with pytest.raises(
        ValueError, match=r"loader state is version 1.*init=CHECKPOINT with another --run-dir"
    ):
        TrainLoader(numbered, batch_size=4).load_state_dict(old)


def test_workers_that_do_not_split_a_ranks_share_are_refused(numbered):
    with pytest.raises(
        ValueError, match="num_workers 2 does not divide the 3 sequences a rank takes per step"
    ):
        TrainLoader(numbered, batch_size=3, num_workers=2)
    with pytest.raises(ValueError, match="does not split into micro-batches of 3 over 2 ranks"):
        TrainLoader(numbered, batch_size=3, global_batch=8, world_size=2)


def step_ids(loaders: list[TrainLoader], steps: int) -> list[list[int]]:
    """The sequence numbers of each step: every rank's micro-batches, rank after rank."""
    return [[i for loader in loaders for b in loader.next_step() for i in seq_ids(b)] for _ in range(steps)]


def test_a_steps_sequences_do_not_depend_on_world_size_micro_batch_or_workers(numbered):
    """The global batch of 8 over 1 rank (micro-batches of 1, 4 or 8, 0 or 2 workers), 2 ranks and
    8 ranks: the same sequences in every step, across an epoch's end (32 steps per epoch); a state
    taken on 2 ranks resumes on 1 rank with 2 workers and on 8 ranks."""
    kw = dict(global_batch=8, seed=3, shuffle_window=16)
    reference = step_ids([TrainLoader(numbered, batch_size=8, **kw)], 40)
    assert len({i for step in reference[:32] for i in step}) == 32 * 8  # nothing twice in the epoch
    for micro, world, workers in ((1, 1, 0), (4, 1, 2), (4, 2, 0), (2, 2, 2), (1, 8, 0)):
        ranks = [
            TrainLoader(numbered, batch_size=micro, rank=r, world_size=world, num_workers=workers, **kw)
            for r in range(world)
        ]
        assert step_ids(ranks, 40) == reference, (micro, world, workers)
    two = [TrainLoader(numbered, batch_size=4, rank=r, world_size=2, **kw) for r in range(2)]
    assert step_ids(two, 30) == reference[:30]
    state = json.loads(json.dumps(two[0].state_dict()))
    one = TrainLoader(numbered, batch_size=2, num_workers=2, **kw)
    one.load_state_dict(state)
    eight = [TrainLoader(numbered, batch_size=1, rank=r, world_size=8, **kw) for r in range(8)]
    for loader in eight:
        loader.load_state_dict(state)
    assert step_ids([one], 10) == step_ids(eight, 10) == reference[30:]


def test_shorter_model_context_crops_sequences(prepared):
    batch = next(iter(TrainLoader(prepared / "train", batch_size=2, seq_len=32)))
    assert batch["input_ids"].shape == (2, 32)


def test_shard_urls_through_pipe_give_the_same_batches(numbered):
    local = take(TrainLoader(numbered, batch_size=4, seed=3), 10)
    piped = take(TrainLoader(f"pipe:cat {numbered}/", batch_size=4, seed=3), 10)
    assert take(TrainLoader(f"pipe:cat {numbered}/{{name}} | cat", batch_size=4, seed=3), 10) == local
    assert piped == local
    loader = TrainLoader(f"pipe:cat {numbered}/", batch_size=4, seed=3)
    head = take(loader, 4)
    resumed = TrainLoader(f"pipe:cat {numbered}/", batch_size=4, seed=3)
    resumed.load_state_dict(loader.state_dict())
    assert head + take(resumed, 6) == local


class FlakyServer:
    """An HTTP server on 127.0.0.1 serving ``root``: ``drop`` shard requests are cut off after
    half their bytes (a connection dropped mid-shard); ``stop()`` / ``start()`` take it down and
    bring it back on the same port."""

    def __init__(self, root: Path, drop: int = 0) -> None:
        self.root, self.drop, self.port, self.served = root, drop, free_port(), 0
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def handler(self) -> type:
        outer = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(outer.root), **kwargs)

            def copyfile(self, source, outputfile) -> None:
                if self.path.endswith(".tar"):
                    outer.served += 1
                    if outer.drop > 0:
                        outer.drop -= 1
                        data = source.read()
                        outputfile.write(data[: len(data) // 2])
                        self.close_connection = True
                        return
                super().copyfile(source, outputfile)

            def log_message(self, *args) -> None:
                pass

        return Handler

    def start(self) -> None:
        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


def test_a_dropped_connection_mid_shard_is_read_on_and_gives_the_same_batches(numbered):
    local = take(TrainLoader(numbered, batch_size=4, seed=3), 60)
    server = FlakyServer(numbered, drop=3)
    try:
        loader = TrainLoader(server.url, batch_size=4, seed=3, retry_wait=0.05)
        head = take(loader, 25)
        resumed = TrainLoader(server.url, batch_size=4, seed=3, retry_wait=0.05)
        resumed.load_state_dict(loader.state_dict())
        assert head + take(resumed, 35) == local
        assert server.drop == 0  # all three cuts happened and were read past
    finally:
        server.stop()


def test_a_server_that_goes_down_is_retried_then_a_bad_shard(numbered, caplog):
    local = take(TrainLoader(numbered, batch_size=4, shuffle=False), 60)
    server = FlakyServer(numbered)
    try:  # a window of one batch: the shards are opened as the batches are taken
        loader = TrainLoader(server.url, batch_size=4, shuffle=False, shuffle_window=4, retry_wait=0.2)
        it = iter(loader)
        got = [digest(next(it)) for _ in range(5)]
        server.stop()  # killed mid-epoch, back 0.3 s later: the first or second retry finds it
        threading.Timer(0.3, server.start).start()
        with caplog.at_level("WARNING", logger="gpt1_ds.data"):
            got += [digest(next(it)) for _ in range(55)]
        assert got == local
        assert "reading on from sequence" in caplog.text and "(retry 1 of 3)" in caplog.text
    finally:
        server.stop()
    # Down for good: after 2 retries, an error naming the rank, the worker and the shard.
    server.start()
    loader = TrainLoader(server.url + "{name}", batch_size=4, shuffle=False, retries=2, retry_wait=0.05)
    server.stop()
    with pytest.raises(ShardError, match=r"rank 0 worker 0: shard http://127.*shard-00000\d\.tar: "):
        list(loader)


def test_eval_loader_covers_the_split_once_across_ranks(numbered):
    total = 37 + 3 + 100 + 61 + 12 + 45
    seen = []
    for rank in range(3):
        loader = EvalLoader(numbered, batch_size=5, rank=rank, world_size=3)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen += [i for b in batches for i in seq_ids(b)]
    assert sorted(seen) == list(range(1, total + 1))
    assert seen == sorted(seen)  # fixed order
    capped = [
        i
        for r in range(2)
        for b in EvalLoader(numbered, batch_size=5, rank=r, world_size=2, max_batches=3)
        for i in seq_ids(b)
    ]
    assert capped == list(range(1, 31))


def test_padding_targets_are_ignored(prepared):
    m = json.loads((prepared / "train" / MANIFEST_NAME).read_text())
    loader = EvalLoader(prepared / "train", batch_size=10_000)
    last = list(loader)[-1]
    tail = last["targets"][-1]
    assert (tail == IGNORE_INDEX).any() or m["shards"][-1]["tokens"] % m["seq_len"] == 1
    assert not (last["targets"] == 0).any()


def _rank_main(rank: int, world: int, port: int, source: str, out_dir: str) -> None:
    # Loader workers forked, as in a rank a launcher starts (a process started by spawn would
    # spawn them too, each importing torch again).
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    kw = dict(batch_size=4, rank=rank, world_size=world, seed=11, num_workers=2, shuffle_window=8)
    reference = take(TrainLoader(source, **kw), 50)
    first = TrainLoader(source, **kw)
    head = take(first, 21)
    second = TrainLoader(source, **kw)
    second.load_state_dict(first.state_dict())  # accumulation 1: any micro-batch ends a step
    resumed = head + take(second, 29)
    lengths = [None] * world
    dist.all_gather_object(lengths, len(second))
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"reference": reference, "resumed": resumed, "lengths": lengths})
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_resume_and_split_in_a_real_2_process_gloo_group(numbered, tmp_path):
    mp.spawn(_rank_main, args=(2, free_port(), str(numbered), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["resumed"] == r["reference"]
        assert r["lengths"][0] == r["lengths"][1]
    assert not set(results[0]["reference"][:10]) & set(results[1]["reference"][:10])  # ranks see other data


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
