"""Per-example losses.

Under DP-SGD each example's gradient must depend on that example alone, so losses are computed
per sequence and only then averaged over the batch. HF's ``outputs.loss`` averages over all
tokens of the batch, which makes one example's gradient depend on the others' lengths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedslm.batching import IGNORE


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss per example, shape ``[batch]``.

    Classification: cross-entropy of ``logits [B, C]`` against ``labels [B]``.
    Causal LM: mean next-token cross-entropy over each sequence's labelled tokens
    (``logits [B, T, V]``, ``labels [B, T]`` with ``IGNORE`` elsewhere).
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total): classes for classification, labelled next tokens for a causal LM."""
    if logits.dim() == 2:
        return int((logits.argmax(-1) == labels).sum()), int(labels.numel())
    pred = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    mask = gold != IGNORE
    return int(((pred == gold) & mask).sum()), int(mask.sum())
