"""lm-evaluation-harness on a gpt1-ds model, offline (``python -m gpt1_ds.evaluate MODEL --tasks``).

``write_tasks`` writes task definitions over local files into a folder that the harness reads
(its ``--include_path``): ``gpt1_sst2`` (SST-2 dev with GPT-1's zero-shot prompt, "… very" then
"negative" or "positive") and ``gpt1_rte`` (RTE dev with the harness's own glue/rte prompt), both
zero-shot multiple choice over log-likelihoods, and ``gpt1_text`` (the rolling log-likelihood of
given texts: word and byte perplexity, bits per byte). ``run`` evaluates an HF directory of the model
(``hf_directory``) through the harness's ``hf`` model with downloads turned off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gpt1_ds.hf import CONFIG_NAME, HF_TOKENIZER_CONFIG_NAME, export_hf, export_hf_tokenizer
from gpt1_ds.model import GPT
from gpt1_ds.tasks import GLUE, SST2_WORDS, TaskData
from gpt1_ds.tokenizer import SentencePieceTokenizer

TASKS = ("gpt1_sst2", "gpt1_rte", "gpt1_text")

_TASK_YAML = {
    "gpt1_sst2": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{sentence}} very",
        "doc_to_choice": list(SST2_WORDS),
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}],
    },
    "gpt1_rte": {  # the harness's own glue/rte prompt
        "output_type": "multiple_choice",
        "doc_to_text": "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
        "doc_to_choice": ["True", "False"],
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}],
    },
    "gpt1_text": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "process_results": "!function gpt1_text.process_results",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
    },
}
_PROCESS_RESULTS = """import re


def process_results(doc, results):
    (loglikelihood,) = results
    words, n_bytes = len(re.split(r"\\s+", doc["text"])), len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
"""


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def write_tasks(dest: Path, glue: Path = GLUE, texts: dict[str, str] | None = None) -> Path:
    """lm-evaluation-harness task definitions over local files, in ``dest`` (its ``--include_path``):
    ``gpt1_sst2`` and ``gpt1_rte`` from ``glue``'s dev files, ``gpt1_text`` from ``texts``."""
    dest.mkdir(parents=True, exist_ok=True)
    sst2 = TaskData("sst2").read(glue / "sst2" / "stsa.binary.dev")
    rte = TaskData("rte").read(glue / "rte" / "dev.tsv")
    data = {
        "gpt1_sst2": [{"sentence": e.texts[0], "label": int(e.label)} for e in sst2],
        "gpt1_rte": [{"sentence1": e.texts[0], "sentence2": e.texts[1], "label": int(e.label)} for e in rte],
        "gpt1_text": [{"name": k, "text": v} for k, v in (texts or {}).items()],
    }
    (dest / "gpt1_text.py").write_text(_PROCESS_RESULTS)
    for name, spec in _TASK_YAML.items():
        if not data[name]:
            continue
        _jsonl(dest / f"{name}.jsonl", data[name])
        files = {"data_files": {"validation": str((dest / f"{name}.jsonl").resolve())}}
        body = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": files,
            "validation_split": "validation",
            "metadata": {"version": 1.0},
        }
        lines = [f"{k}: {json.dumps(v)}" for k, v in {**body, **spec}.items()]
        text = "\n".join(lines).replace(
            '"!function gpt1_text.process_results"', "!function gpt1_text.process_results"
        )
        (dest / f"{name}.yaml").write_text(text + "\n")
    return dest


def hf_directory(source: Path, model: GPT, tok: SentencePieceTokenizer, scratch: Path) -> Path:
    """``source`` when it is an HF directory with its tokenizer, else one written to ``scratch``."""
    if (source / CONFIG_NAME).is_file() and (source / HF_TOKENIZER_CONFIG_NAME).is_file():
        return source
    export_hf(model, scratch)
    export_hf_tokenizer(tok, scratch, model.config.n_positions)
    return scratch


def run(hf_dir: Path, tasks: list[str], include: Path, limit: int | None, device: str) -> dict:
    """The harness's results for ``tasks`` on ``hf_dir`` (offline: nothing is downloaded)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SystemExit("error: --tasks needs lm-evaluation-harness: pip install 'gpt1-ds[eval]'") from None
    manager = TaskManager(include_path=str(include))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown harness task(s) {unknown}: ours are {list(TASKS)} (gpt1_text needs --text)"
        )
    args = f"pretrained={hf_dir},dtype=float32"
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=args,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        batch_size=8,
        device=device,
        log_samples=False,
    )
    return {
        task: {k: v for k, v in values.items() if isinstance(v, (int, float))}
        for task, values in out["results"].items()
    }
