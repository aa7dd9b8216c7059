"""FedAvg over adapter tensors and the coordinator's minimum-results guard."""

from __future__ import annotations

import pytest
import torch

from fedslm.aggregation import fedavg, weighted_mean


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}


def test_fedavg_is_the_example_weighted_mean() -> None:
    states = [state(i) for i in range(3)]
    weights = [10.0, 30.0, 60.0]
    out = fedavg(zip(states, weights, strict=True))
    for k in ("a", "b"):
        expected = sum(w * s[k] for s, w in zip(states, weights, strict=True)) / sum(weights)
        torch.testing.assert_close(out[k], expected)
        assert out[k].dtype == torch.float32


def test_fedavg_of_one_is_identity_and_order_does_not_matter() -> None:
    s = state(0)
    torch.testing.assert_close(fedavg([(s, 5.0)])["a"], s["a"])
    pairs = [(state(i), float(i + 1)) for i in range(4)]
    forward, backward = fedavg(pairs), fedavg(reversed(pairs))
    torch.testing.assert_close(forward["a"], backward["a"], rtol=0, atol=1e-6)


def test_fedavg_rejects_mismatches() -> None:
    s = state(0)
    with pytest.raises(ValueError, match="names"):
        fedavg([(s, 1.0), ({"a": s["a"]}, 1.0)])
    with pytest.raises(ValueError, match="shape"):
        fedavg([(s, 1.0), ({"a": torch.zeros(2, 2), "b": s["b"]}, 1.0)])
    with pytest.raises(ValueError, match="weight"):
        fedavg([(s, 0.0)])
    with pytest.raises(ValueError, match="nothing"):
        fedavg([])


def test_weighted_mean_skips_nan() -> None:
    assert weighted_mean([(1.0, 1.0), (float("nan"), 5.0), (3.0, 1.0)]) == 2.0
    assert weighted_mean([]) is None
