"""Helpers shared by test files in different folders (``pythonpath = ["tests"]`` in
pyproject.toml makes this importable as ``support``). Not a test module: pytest collects
``test_*.py`` only."""

from __future__ import annotations

from pathlib import Path

import torch

from fedslm.batching import Encoded, collate, encode_classification, encode_instructions
from fedslm.config import LoraConfig, ModelConfig
from fedslm.losses import per_example_loss
from fedslm.models import load_model

TEXTS = [
    "my card was lost on the bus",
    "please reset my pin",
    "why was my transfer declined",
    "close my account today please, I am moving abroad next month",
    "balance?",
    "I want a loan for a car",
]
LABELS = ["card", "pin", "transfer", "close", "balance", "loan"]


def prepare_parity_model(
    path: Path, task: str, options: ModelConfig | None = None
) -> tuple[torch.nn.Module, Encoded]:
    """A tiny LoRA model at ``path`` with no dropout and factors moved off their initialisation,
    and six short examples for ``task``: the input of the per-example clipping parity tests."""
    loaded = load_model(
        path,
        task,
        LoraConfig(r=4, alpha=8, dropout=0.0),
        sorted(LABELS),
        torch.device("cpu"),
        seed=0,
        options=options,
    )
    model = loaded.model
    for m in model.modules():  # dropout would make the two computations see different masks
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would make A's gradients vanish; move off zero
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    tok = loaded.tokenizer
    if task == "classification":
        data = encode_classification(
            tok, TEXTS, LABELS, {k: i for i, k in enumerate(sorted(LABELS))}, 32
        )
    else:
        data = encode_instructions(
            tok, [f"Message: {t}\nIntent:" for t in TEXTS], [f" {label}" for label in LABELS], 32
        )
    return model, data


def reference_update(
    model: torch.nn.Module, data: Encoded, clip: float, expected: int
) -> list[torch.Tensor]:
    """The reference DP update with noise off: each example's gradient by plain autograd,
    clipped to ``clip`` one at a time, summed and divided by the ``expected`` batch size."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    model.train()
    for i in range(len(data)):
        batch = collate(data, [i], torch.device("cpu"))
        labels = batch.pop("labels")
        grads = torch.autograd.grad(per_example_loss(model(**batch).logits, labels).sum(), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += g * factor
    return [t / expected for t in total]
