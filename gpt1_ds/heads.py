"""GPT-1's fine-tuning model (Radford et al., 2018, §3.2): the GPT plus a linear task head.

``TaskModel`` holds the GPT as ``gpt`` and the head as ``head`` (``BACKBONE``, ``HEAD``): the
prefixes of its parameter names, which ``gpt1_ds.loading`` reads back from checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt1_ds.model import GPT, IGNORE_INDEX, GPTConfig
from gpt1_ds.tasks import TaskData

BACKBONE = "gpt"
HEAD = "head"
LM_LOSS_AVERAGES = ("token", "sequence")
"""How the auxiliary LM loss is averaged: over every counted token of the batch, or (GPT-1) over each
sequence's own tokens and then over the sequences."""
CLF_DROPOUT_MASKS = ("sequence", "example")
"""Classifier dropout: a mask for each of an example's K sequences, or (GPT-1) one shared by them."""


@dataclass(frozen=True)
class TaskSpec:
    """What the head needs to know of a task, as a checkpoint records it (``ClientState.task``);
    ``gpt1_ds.tasks.TaskData`` has the same three members."""

    kind: str
    num_outputs: int
    regression: bool = False

    @classmethod
    def from_dict(cls, task: dict[str, Any]) -> TaskSpec:
        return cls(task["kind"], task["num_outputs"], task.get("regression", False))


class TaskModel(nn.Module):
    """GPT plus a linear head on the ``<extract>`` state: one head for all four framings.

    Input [B, K, T] (K sequences per example); the extract states [B, K, C] go to the head:
    classification / entailment: K = 1, scores [B, classes]; similarity: K = 2 orders,
    states added, scores [B, 1 or 2]; multiple choice: one score per choice, [B, K].
    ``lm_loss_average`` (``LM_LOSS_AVERAGES``) and ``clf_dropout_mask`` (``CLF_DROPOUT_MASKS``) choose
    between gpt1-ds's and GPT-1's ways (docs/FIDELITY.md).
    """

    def __init__(
        self,
        gpt: GPT,
        task: TaskSpec | TaskData,
        lm_coef: float,
        clf_pdrop: float,
        lm_loss_average: str = "token",
        clf_dropout_mask: str = "sequence",
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("lm_loss_average", lm_loss_average, LM_LOSS_AVERAGES),
            ("clf_dropout_mask", clf_dropout_mask, CLF_DROPOUT_MASKS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be {' or '.join(allowed)}, got {value!r}")
        self.gpt = gpt
        self.kind, self.regression, self.lm_coef = task.kind, task.regression, lm_coef
        self.lm_loss_average, self.clf_dropout_mask = lm_loss_average, clf_dropout_mask
        self.clf_dropout = nn.Dropout(clf_pdrop)
        self.head = nn.Linear(gpt.config.n_embd, task.num_outputs)
        nn.init.normal_(self.head.weight, std=gpt.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def skeleton(cls, config: GPTConfig, task: dict[str, Any]) -> TaskModel:
        """The model of a checkpoint's ``config`` and ``task`` record (no training settings)."""
        return cls(GPT(config), TaskSpec.from_dict(task), lm_coef=0.0, clf_pdrop=0.0)

    def features(self, h: torch.Tensor, extract_pos: torch.Tensor) -> torch.Tensor:
        """The head's input [B, K, C]: the hidden states h [B*K, T, C] at extract_pos [B, K], after
        classifier dropout (one mask per sequence, or one per example shared by its K sequences)."""
        B, K = extract_pos.shape
        C = h.size(-1)
        idx = extract_pos.reshape(B * K, 1, 1).expand(-1, 1, C)  # [B*K, 1, C]
        feats = h.gather(1, idx).view(B, K, C)
        if self.clf_dropout_mask == "sequence":
            return self.clf_dropout(feats)
        # GPT-1's noise_shape [B, 1, C]; the mask in fp32 so that a bf16 run rounds once
        mask = self.clf_dropout(torch.ones(B, 1, C, device=feats.device))
        return (feats * mask).to(feats.dtype)

    def scores(self, h: torch.Tensor, extract_pos: torch.Tensor) -> torch.Tensor:
        """Head outputs from the hidden states h [B*K, T, C] at extract_pos [B, K]."""
        feats = self.features(h, extract_pos)  # [B, K, C]
        if self.kind == "multiple_choice":
            return self.head(feats).squeeze(-1)  # [B, K]
        if self.kind == "similarity":
            return self.head(feats.sum(1))  # [B, 1 or 2]: both orders added
        return self.head(feats[:, 0])  # [B, classes]

    def forward(
        self,
        input_ids: torch.Tensor,
        extract_pos: torch.Tensor,
        lm_targets: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Scores; with labels also (scores, loss, task loss, LM loss), loss = task + lm_coef × LM.
        The LM loss is the mean over the counted tokens of ``lm_targets`` [B, K, T] (``token``), or the
        mean over the B·K sequences of each one's mean over its own tokens (``sequence``, GPT-1)."""
        B, K, T = input_ids.shape
        h = self.gpt.hidden_states(input_ids.view(B * K, T))  # [B*K, T, C]
        scores = self.scores(h, extract_pos)
        if labels is None:
            return (scores,)
        task_loss = task_loss_of(scores, labels, self.regression)
        lm_loss = torch.zeros((), device=h.device)
        if self.lm_coef > 0 and lm_targets is not None:
            logits = self.gpt.logits(h).float()  # [B*K, T, V]
            targets = lm_targets.reshape(B * K, T)
            losses = F.cross_entropy(
                logits.view(-1, logits.size(-1)),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view(B * K, T)  # 0 where ignored
            counted = (targets != IGNORE_INDEX).sum(1)  # [B*K]
            if self.lm_loss_average == "token":
                lm_loss = losses.sum() / counted.sum().clamp(min=1)
            else:  # each sequence's mean, then the mean of the sequences that count a token
                lm_loss = (losses.sum(1) / counted.clamp(min=1)).sum() / (counted > 0).sum().clamp(min=1)
        loss = task_loss + self.lm_coef * lm_loss
        return scores, loss, task_loss.detach(), lm_loss.detach()


def task_loss_of(
    scores: torch.Tensor, labels: torch.Tensor, regression: bool, reduction: str = "mean"
) -> torch.Tensor:
    """The task loss: squared error of the score, or cross-entropy (``reduction`` as in torch)."""
    if regression:
        return F.mse_loss(scores.float().squeeze(-1), labels.float(), reduction=reduction)
    return F.cross_entropy(scores.float(), labels, reduction=reduction)


def predictions(scores: torch.Tensor, regression: bool) -> torch.Tensor:
    """Class (or choice) indices, or the regression scores."""
    return scores.float().squeeze(-1) if regression else scores.argmax(-1)
