"""gpt1_ds.checkpoint: which tag a resume takes, pruning, and DeepSpeed's silent failure."""

from __future__ import annotations

import pytest

from gpt1_ds import checkpoint


def make_tags(root, complete: list[int], partial: list[int]):
    for step in complete + partial:
        tag = root / checkpoint.tag_for(step)
        tag.mkdir(parents=True)
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if step in complete:
            (tag / checkpoint.COMPLETE).write_text(f"{step}\n")


def test_auto_resume_takes_the_newest_complete_tag_never_a_half_written_one(tmp_path):
    make_tags(tmp_path, complete=[100, 200], partial=[300])
    assert checkpoint.find_resume(tmp_path, "auto") == (tmp_path, "step00000200")
    assert checkpoint.find_resume(tmp_path, "none") is None
    assert checkpoint.find_resume(tmp_path / "empty", "auto") is None
    assert checkpoint.find_resume(tmp_path, str(tmp_path / "step00000100")) == (tmp_path, "step00000100")
    assert checkpoint.find_resume(tmp_path, str(tmp_path)) == (tmp_path, "step00000200")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.find_resume(tmp_path, str(tmp_path / "step00000300"))


def test_prune_keeps_the_last_k_and_drops_older_unfinished_saves(tmp_path):
    make_tags(tmp_path, complete=[100, 200, 300, 400], partial=[250, 500])
    checkpoint.prune(tmp_path, keep=2)
    left = sorted(p.name for p in tmp_path.iterdir())
    # 500 is newer than the newest complete tag: it may be a save still in flight elsewhere.
    assert left == ["step00000300", "step00000400", "step00000500"]


class _EngineThatFindsNothing:
    def load_checkpoint(self, load_dir, tag=None):
        return None, None  # what DeepSpeed returns, with only a warning, when nothing is there


def test_a_failed_deepspeed_load_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="could not load checkpoint"):
        checkpoint.load(_EngineThatFindsNothing(), tmp_path, "step00000100")
