"""The local training loop: Poisson batches, empty batches under DP, the update assertion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedslm.batching import encode_classification, poisson_batches
from fedslm.config import LoraConfig
from fedslm.models import get_adapter_state, load_model
from fedslm.privacy.dp_sgd import per_sample_module
from fedslm.training import DPSettings, _assert_updated, make_optimizer, train_steps


def test_poisson_batches_are_seeded_and_can_be_empty() -> None:
    a = poisson_batches(50, 0.02, 200, torch.Generator().manual_seed(3))
    b = poisson_batches(50, 0.02, 200, torch.Generator().manual_seed(3))
    assert a == b
    assert any(len(x) == 0 for x in a)
    mean = sum(len(x) for x in a) / len(a)
    assert 0.5 < mean < 1.5  # q * N = 1


def _site_model(path: Path) -> tuple[torch.nn.Module, object]:
    loaded = load_model(path, "classification", LoraConfig(r=2), ["a", "b"], torch.device("cpu"), 0)
    data = encode_classification(
        loaded.tokenizer,
        ["card lost", "pin reset", "card stolen"],
        ["a", "b", "a"],
        {"a": 0, "b": 1},
        16,
    )
    return loaded.model, data


@pytest.mark.integration
def test_empty_batches_still_count_as_noised_steps(tiny_bert: Path) -> None:
    model, data = _site_model(tiny_bert)
    before = get_adapter_state(model)
    gsm = per_sample_module(model)
    params = [p for p in model.parameters() if p.requires_grad]
    result = train_steps(
        gsm,
        data,
        steps=20,
        sample_rate=0.05,
        optimizer=make_optimizer(params, "sgd", 0.1, 0.0),
        device=torch.device("cpu"),
        dp=DPSettings(1.0, 1.0, 1),
        seed=5,
    )
    assert result.steps == 20
    assert result.empty_batches > 10  # q = 0.05 over 3 rows: most batches are empty
    after = get_adapter_state(model)
    # noise was added on every step, so every adapter tensor moved
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_update_assertion_catches_weights_that_did_not_move() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="did not change"):
        _assert_updated([p], [p.detach().clone()])
    p.grad = None
    with pytest.raises(RuntimeError, match="no gradient"):
        _assert_updated([p], [p.detach().clone()])


def test_proximal_step_pulls_back_toward_the_start() -> None:
    """FedProx as a decoupled step: w -= lr * mu * (w - w_start), after the optimizer's step."""
    from fedslm.training import Proximal

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    prox = Proximal(mu=2.0, lr=0.1, params=[w])
    with torch.no_grad():
        w.add_(torch.tensor([1.0, 1.0]))  # the optimizer moved it to [2, -1]
    prox.step()
    torch.testing.assert_close(w.detach(), torch.tensor([2.0 - 0.2 * 1.0, -1.0 - 0.2 * 1.0]))
