"""gpt1_ds.harness: lm-evaluation-harness task files over the embedded dev sets."""

from __future__ import annotations

import json

from gpt1_ds.harness import write_tasks


def test_harness_task_files_hold_the_embedded_dev_sets(tmp_path):
    dest = write_tasks(tmp_path, texts={"a": "Some text."})
    rows = [json.loads(line) for line in (dest / "gpt1_sst2.jsonl").read_text().splitlines()]
    assert len(rows) == 872 and {r["label"] for r in rows} == {0, 1}
    rte = [json.loads(line) for line in (dest / "gpt1_rte.jsonl").read_text().splitlines()]
    assert len(rte) == 277 and sum(r["label"] == 0 for r in rte) == 146  # entailment: 146 of 277
    assert "!function gpt1_text.process_results" in (dest / "gpt1_text.yaml").read_text()
    assert str(dest / "gpt1_sst2.jsonl") in (dest / "gpt1_sst2.yaml").read_text()
