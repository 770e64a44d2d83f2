"""Training-efficiency arithmetic: FLOPs per token and model FLOPs utilisation (MFU).

FLOPs per token follow PaLM (Chowdhery et al., 2022), appendix B: ``6 N + 12 L T d`` for a forward
and backward pass, where N counts the parameters without the position table (a lookup does no
matmul), L is the number of layers, T the sequence length and d the model width. The first term is
the matmuls with the weights (2 FLOPs per multiply-add, ×3 for forward + backward); the second is
attention's QKᵀ and AV. The tied LM head is counted once, as a matmul (its table lookup costs
nothing). MFU divides achieved FLOPs/s by the device's dense peak.
"""

from __future__ import annotations

import logging
from typing import Any

from gpt1_ds.model import GPTConfig

log = logging.getLogger(__name__)

PEAK_FLOPS = {
    # Dense bf16 tensor-core peaks from the vendors' data sheets.
    "h100-sxm": 989e12,
    "h100-pcie": 756e12,
    "h200": 989e12,
    "a100": 312e12,
}


def num_matmul_params(config: GPTConfig) -> int:
    """N of the formula: every parameter but the position table, tied table once."""
    return config.num_parameters(exclude_positions=True)


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length ``seq_len``."""
    return 6 * num_matmul_params(config) + 12 * config.n_layer * seq_len * config.n_embd


def mfu(tokens_per_sec: float, config: GPTConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOPs/s over ``peak_flops``."""
    return tokens_per_sec * flops_per_token(config, seq_len) / peak_flops


def device_peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a known GPU from its name (``torch.cuda.get_device_name``), else None."""
    name = device_name.lower()
    key = next((k for k in ("h200", "h100", "a100") if k in name), None)
    if key == "h100":
        key = "h100-pcie" if "pcie" in name else "h100-sxm"
    return PEAK_FLOPS.get(key)


class Monitor:
    """TensorBoard scalars and text from rank 0 (other ranks hold a no-op monitor).

    ``purge_step``: on resume, events of an earlier attempt at or after this step are
    hidden, so a resumed run continues its curves without duplicate steps. A write that
    fails (a full disk, a removed directory) is logged and skipped: it never ends a run.
    """

    def __init__(self, log_dir: str | None, purge_step: int | None = None) -> None:
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def _write(self, method: str, *args: Any) -> None:
        if self.writer is None:
            return
        try:
            getattr(self.writer, method)(*args)
        except Exception as e:  # an auxiliary step: the run goes on
            log.warning("TensorBoard %s failed, skipped (%s: %s)", method, type(e).__name__, e)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if value is not None:
                self._write("add_scalar", tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._write("add_text", tag, text, step)

    def flush(self) -> None:
        self._write("flush")

    def close(self) -> None:
        self._write("close")
