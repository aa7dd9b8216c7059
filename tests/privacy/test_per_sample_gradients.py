"""With noise off, the DP update equals per-example clipping computed one example at a time.

This is the parity test against a reference implementation: the reference is a plain loop over
examples with ordinary autograd, no Opacus.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import prepare_parity_model as _prepare
from support import reference_update as _reference

from fedslm.batching import collate
from fedslm.losses import per_example_loss
from fedslm.privacy.dp_sgd import dp_optimizer, per_sample_module

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("model_fixture", "task"), [("tiny_bert", "classification"), ("tiny_llama", "causal-lm")]
)
def test_dp_update_equals_one_at_a_time_clipping(
    model_fixture: str, task: str, request: pytest.FixtureRequest
) -> None:
    model, data = _prepare(request.getfixturevalue(model_fixture), task)
    expected_batch = len(data)
    # a clipping bound that clips some examples and not others
    # (the mean-pool head scales logits by 10: its per-example norms are 10-20 here)
    clip = 15.0 if task == "classification" else 0.5
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


@pytest.mark.parametrize("physical", [1, 2, 4])
def test_micro_batched_logical_batch_equals_one_at_a_time_clipping(
    physical: int, tiny_bert: Path
) -> None:
    """A logical batch in micro-batches (``train.physical_batch_size``) is clipped and noised
    once, exactly as the whole batch clipped one example at a time (noise off)."""
    from fedslm.training import DPSettings, train_steps

    model, data = _prepare(tiny_bert, "classification")
    clip = 15.0  # clips some of the six examples, not all (as above)
    reference = _reference(model, data, clip, len(data))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    gsm = per_sample_module(model)
    result = train_steps(
        gsm,
        data,
        steps=1,
        sample_rate=1.0,  # every row joins the one logical batch
        optimizer=torch.optim.SGD(params, lr=1.0),
        device=torch.device("cpu"),
        dp=DPSettings(0.0, clip, len(data)),
        seed=0,
        physical_batch_size=physical,
    )
    gsm._close()
    assert result.examples == len(data)
    for p, old, ref in zip(params, before, reference, strict=True):
        torch.testing.assert_close(old - p.detach(), ref, rtol=1e-4, atol=1e-7)


def test_micro_batches_without_dp_give_the_mean_gradient_of_the_logical_batch(
    tiny_bert: Path,
) -> None:
    from fedslm.training import train_steps

    updates = []
    for physical in (None, 2):
        model, data = _prepare(tiny_bert, "classification")
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        train_steps(
            model,
            data,
            steps=1,
            sample_rate=1.0,
            optimizer=torch.optim.SGD(params, lr=1.0),
            device=torch.device("cpu"),
            dp=None,
            seed=0,
            physical_batch_size=physical,
        )
        updates.append([old - p.detach() for p, old in zip(params, before, strict=True)])
    for whole, micro in zip(*updates, strict=True):
        torch.testing.assert_close(whole, micro, rtol=1e-4, atol=1e-7)
