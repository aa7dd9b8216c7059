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
    return masked_token_mean(logits[:, :-1], labels[:, 1:])


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total): classes for classification, labelled next tokens for a causal LM."""
    if logits.dim() == 2:
        return int((logits.argmax(-1) == labels).sum()), int(labels.numel())
    pred = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    mask = gold != IGNORE
    return int(((pred == gold) & mask).sum()), int(mask.sum())


def lm_logits_at_labels(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's logits only at the positions whose next token is labelled in some row,
    and those next tokens: ``(logits [B, U, V], targets [B, U])``, ``IGNORE`` where a row has
    no label there.

    Instruction data labels only the response, a few tokens of each row, while the LM head of
    a small model with a large vocabulary (Gemma 3: 262k tokens) costs more than the rest of
    the model on every position. Asking the model for just these positions
    (``logits_to_keep``) gives the same per-token losses as ``per_example_loss`` on the full
    logits at a fraction of the time and memory. Rows stay independent (DP-SGD needs it): the
    kept positions are a fixed set, and a row's losses come from its own logits only.
    """
    wanted = (labels[:, 1:] != IGNORE).any(dim=0)
    keep = torch.nonzero(wanted).flatten()
    logits = model(**batch, logits_to_keep=keep).logits
    return logits, labels[:, keep + 1]


def lm_loss_at_labels(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor
) -> torch.Tensor:
    """``per_example_loss`` of a causal LM on ``batch``, computed from ``lm_logits_at_labels``
    (shape ``[batch]``: the mean cross-entropy over each row's labelled tokens)."""
    logits, targets = lm_logits_at_labels(model, batch, labels)
    return masked_token_mean(logits, targets)


def masked_token_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per row over the tokens that are not ``IGNORE`` (already aligned:
    ``logits[:, j]`` predicts ``targets[:, j]``)."""
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(targets.shape)
    counts = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts
