"""With noise off, the DP update equals per-example clipping computed one example at a time.

This is the parity test against a reference implementation: the reference is a plain loop over
examples with ordinary autograd, no Opacus.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedslm.batching import Encoded, collate, encode_classification, encode_instructions
from fedslm.config import LoraConfig
from fedslm.losses import per_example_loss
from fedslm.models import load_model
from fedslm.privacy.dp_sgd import dp_optimizer, per_sample_module

TEXTS = [
    "my card was lost on the bus",
    "please reset my pin",
    "why was my transfer declined",
    "close my account today please, I am moving abroad next month",
    "balance?",
    "I want a loan for a car",
]
LABELS = ["card", "pin", "transfer", "close", "balance", "loan"]


def _prepare(path: Path, task: str) -> tuple[torch.nn.Module, Encoded]:
    loaded = load_model(
        path,
        task,
        LoraConfig(r=4, alpha=8, dropout=0.0),
        sorted(LABELS),
        torch.device("cpu"),
        seed=0,
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


def _reference(
    model: torch.nn.Module, data: Encoded, clip: float, expected: int
) -> list[torch.Tensor]:
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


@pytest.mark.parametrize(
    ("model_fixture", "task"), [("tiny_bert", "classification"), ("tiny_llama", "causal-lm")]
)
def test_dp_update_equals_one_at_a_time_clipping(
    model_fixture: str, task: str, request: pytest.FixtureRequest
) -> None:
    model, data = _prepare(request.getfixturevalue(model_fixture), task)
    expected_batch = len(data)
    # a clipping bound that clips some examples and not others
    clip = 0.05 if task == "classification" else 0.5
    reference = _reference(model, data, clip, expected_batch)

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    gsm = per_sample_module(model)
    optimizer = dp_optimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
        generator=None,
    )
    gsm.train()
    batch = collate(data, list(range(len(data))), torch.device("cpu"))
    labels = batch.pop("labels")
    optimizer.zero_grad()
    per_example_loss(gsm(**batch).logits, labels).mean().backward()
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params]).norm(dim=0)
    assert (norms > clip).any() and (norms < clip * 50).all(), "test needs some clipping"
    optimizer.step()
    gsm._close()

    for p, old, ref in zip(params, before, reference, strict=True):
        torch.testing.assert_close(old - p.detach(), ref, rtol=1e-4, atol=1e-7)
