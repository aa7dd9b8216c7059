"""LoRA-exact aggregation (``ffa``, ``exact``) and the factor algebra under it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from fedslm.aggregation import exact, ffa
from fedslm.lora_math import factorize, lora_delta, lora_pairs, to_site_rank

# PEFT's own key names, as get_adapter_state returns them for a BERT classifier
PREFIX = "base_model.model.bert.encoder.layer.0.attention.self"
LAYERS = [f"{PREFIX}.query", f"{PREFIX}.value"]
HEAD_W, HEAD_B = "base_model.model.classifier.weight", "base_model.model.classifier.bias"
OUT, IN = 40, 48
CPU = torch.device("cpu")

State = dict[str, torch.Tensor]


def site_state(seed: int, rank: int, a: State | None = None) -> State:
    """A trained-looking adapter of ``rank`` (random A and B, a head); ``a`` fixes the A's."""
    g = torch.Generator().manual_seed(seed)
    state: State = {}
    for layer in LAYERS:
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, IN, generator=g) / math.sqrt(IN)
        state[f"{layer}.lora_B.weight"] = torch.randn(OUT, rank, generator=g) * 0.1
    if a is not None:
        state.update({k: v.clone() for k, v in a.items() if ".lora_A." in k})
    state[HEAD_W] = torch.randn(3, IN, generator=g)
    state[HEAD_B] = torch.randn(3, generator=g)
    return state


def dense_mean(updates: list[tuple[State, float, float]]) -> dict[str, torch.Tensor]:
    """The reference: per layer Σ w (alpha/r) B A / Σ w, in float64, one site at a time."""
    total = sum(w for _, w, _ in updates)
    return {
        layer: sum(
            w * lora_delta(s[f"{layer}.lora_B.weight"], s[f"{layer}.lora_A.weight"], alpha)
            for s, w, alpha in updates
        )
        / total
        for layer in LAYERS
    }


def product(state: State, layer: str, alpha: float) -> torch.Tensor:
    return lora_delta(state[f"{layer}.lora_B.weight"], state[f"{layer}.lora_A.weight"], alpha)


def test_pairs_on_a_real_peft_adapter(tiny_bert: Path) -> None:
    from fedslm.config import LoraConfig
    from fedslm.models.adapter import get_adapter_state
    from fedslm.models.loading import load_model

    loaded = load_model(tiny_bert, "classification", LoraConfig(r=4), ["a", "b"], CPU, seed=0)
    state = get_adapter_state(loaded.model)
    pairs = lora_pairs(state)
    assert len(pairs) == 4 and all(p.rank == 4 for p in pairs.values())
    paired = {k for p in pairs.values() for k in (p.a_key, p.b_key)}
    assert {k for k in state if "classifier" in k} == set(state) - paired
    for p in pairs.values():
        assert state[p.a_key].shape == (p.rank, p.in_features)
        assert state[p.b_key].shape == (p.out_features, p.rank)


def test_pairing_errors_name_the_key() -> None:
    s = site_state(0, 4)
    a_key, b_key = f"{LAYERS[0]}.lora_A.weight", f"{LAYERS[0]}.lora_B.weight"
    a_re, b_re = re.escape(a_key), re.escape(b_key)
    alone = {k: v for k, v in s.items() if k != b_key}
    with pytest.raises(ValueError, match=rf"{a_re} has no partner {b_re}"):
        lora_pairs(alone)
    with pytest.raises(ValueError, match=rf"{b_re} has no partner {a_re}"):
        lora_pairs({k: v for k, v in s.items() if k != a_key})
    with pytest.raises(ValueError, match=rf"{a_re} has rank 4 .* {b_re} has rank 5"):
        lora_pairs({**s, b_key: torch.zeros(OUT, 5)})
    with pytest.raises(ValueError, match=rf"{a_re}: LoRA factor must be 2-D"):
        lora_pairs({**s, a_key: torch.zeros(4, IN, 1)})
    with pytest.raises(ValueError, match=r"x\.lora_embedding_A: unsupported"):
        lora_pairs({**s, "x.lora_embedding_A": torch.zeros(4, 9)})
    with pytest.raises(ValueError, match="unsupported"):
        lora_pairs({**s, "x.lora_magnitude_vector.weight": torch.zeros(9)})


def test_exact_is_the_dense_average_when_the_rank_covers_every_site() -> None:
    # heterogeneous ranks and alphas: 4/8/16 with alpha = 2r, weights by records
    updates = [
        (site_state(i, r), w, 2.0 * r) for i, (r, w) in enumerate([(4, 10), (8, 30), (16, 60)])
    ]
    result = exact(iter(updates), rank=28, alpha=56.0)
    expected = dense_mean(updates)
    for layer in LAYERS:
        assert result.state[f"{layer}.lora_A.weight"].shape == (28, IN)
        assert result.state[f"{layer}.lora_B.weight"].shape == (OUT, 28)
        got = product(result.state, layer, 56.0)
        torch.testing.assert_close(got, expected[layer], rtol=0, atol=2e-6)
        assert result.energy_lost[layer] < 1e-12
    head = sum(s[HEAD_W].double() * w for s, w, _ in updates) / 100
    torch.testing.assert_close(result.state[HEAD_W], head.float())
    assert list(result.state) == list(updates[0][0])  # the sites' tensor order
    assert all(t.dtype == torch.float32 for t in result.state.values())


def test_exact_truncation_is_the_best_rank_r_approximation() -> None:
    updates = [(site_state(i, r), 1.0 + i, 16.0) for i, r in enumerate([4, 8, 16])]
    dense = dense_mean(updates)
    result = exact(updates, rank=6, alpha=16.0)
    for layer in LAYERS:
        u, s, vh = torch.linalg.svd(dense[layer])
        best = u[:, :6] @ torch.diag(s[:6]) @ vh[:6]
        got = product(result.state, layer, 16.0)
        torch.testing.assert_close(got, best, rtol=0, atol=2e-6)
        dropped = float((s[6:] ** 2).sum())
        error = float(((dense[layer] - got) ** 2).sum())
        assert error == pytest.approx(dropped, rel=1e-5)
        assert result.energy_lost[layer] == pytest.approx(dropped / float((s**2).sum()), rel=1e-9)
        assert 0 < result.energy_lost[layer] < 1
        # the singular values are split evenly between the factors
        b, a = result.state[f"{layer}.lora_B.weight"], result.state[f"{layer}.lora_A.weight"]
        torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-5, atol=0)


def test_global_factors_cut_to_each_site_rank() -> None:
    updates = [(site_state(i, r), 1.0, 2.0 * r) for i, r in enumerate([4, 8, 16])]
    glob = exact(updates, rank=16, alpha=32.0).state
    for site_rank, site_alpha in [(4, 8.0), (8, 16.0), (16, 32.0)]:
        cut = to_site_rank(glob, 32.0, site_rank, site_alpha)
        for layer in LAYERS:
            assert cut.state[f"{layer}.lora_A.weight"].shape == (site_rank, IN)
            assert cut.state[f"{layer}.lora_B.weight"].shape == (OUT, site_rank)
            u, s, vh = torch.linalg.svd(product(glob, layer, 32.0))
            best = u[:, :site_rank] @ torch.diag(s[:site_rank]) @ vh[:site_rank]
            got = product(cut.state, layer, site_alpha)
            torch.testing.assert_close(got, best, rtol=0, atol=2e-6)
            lost = float((s[site_rank:] ** 2).sum() / (s**2).sum())
            assert cut.energy_lost[layer] == pytest.approx(lost, abs=1e-9)
        torch.testing.assert_close(cut.state[HEAD_W], glob[HEAD_W], rtol=0, atol=0)


def test_a_site_rank_above_the_global_rank_keeps_every_rank_trainable() -> None:
    glob = exact([(site_state(0, 4), 1.0, 8.0)], rank=4, alpha=8.0).state
    cut = to_site_rank(glob, 8.0, 12)
    for layer in LAYERS:
        torch.testing.assert_close(
            product(cut.state, layer, 8.0), product(glob, layer, 8.0), rtol=0, atol=2e-6
        )
        a, b = cut.state[f"{layer}.lora_A.weight"], cut.state[f"{layer}.lora_B.weight"]
        assert (b[:, 4:] == 0).all()
        gram = a @ a.T  # all 12 rows non-zero and mutually orthogonal
        torch.testing.assert_close(gram, torch.diag(gram.diagonal()), rtol=0, atol=1e-5)
        torch.testing.assert_close(gram.diagonal()[4:], torch.full((8,), 1 / 3), rtol=1e-5, atol=0)


def test_ffa_is_exact_when_a_is_shared() -> None:
    shared = site_state(99, 8)
    updates = [(site_state(i, 8, a=shared), w) for i, w in enumerate([1.0, 2.0, 5.0])]
    out = ffa(updates)
    dense = dense_mean([(s, w, 16.0) for s, w in updates])
    for layer in LAYERS:
        a_key = f"{layer}.lora_A.weight"
        assert torch.equal(out[a_key], shared[a_key])
        torch.testing.assert_close(product(out, layer, 16.0), dense[layer], rtol=0, atol=1e-6)
    head = sum(s[HEAD_W].double() * w for s, w in updates) / 8
    torch.testing.assert_close(out[HEAD_W], head.float())


def test_ffa_refuses_an_a_that_moved_by_one_ulp() -> None:
    shared = site_state(99, 8)
    moved = site_state(1, 8, a=shared)
    a_key = f"{LAYERS[1]}.lora_A.weight"
    moved[a_key][0, 0] = torch.nextafter(moved[a_key][0, 0], torch.tensor(1.0))
    with pytest.raises(ValueError, match=re.escape(f"{a_key}: A differs")):
        ffa([(site_state(0, 8, a=shared), 1.0), (moved, 1.0)])
    with pytest.raises(ValueError, match="nothing"):
        ffa([])


def test_fresh_adapters_with_zero_b_give_zeros_not_nan() -> None:
    fresh = site_state(0, 8)
    for k in fresh:
        if ".lora_B." in k:
            fresh[k].zero_()
    for keep_trainable in (True, False):
        result = exact(
            [(fresh, 1.0, 16.0), (fresh, 3.0, 16.0)], 8, 16.0, keep_trainable=keep_trainable
        )
        assert all(torch.isfinite(t).all() for t in result.state.values())
        for layer in LAYERS:
            a, b = result.state[f"{layer}.lora_A.weight"], result.state[f"{layer}.lora_B.weight"]
            assert (b == 0).all() and result.energy_lost[layer] == 0.0
            assert (product(result.state, layer, 16.0) == 0).all()
            if keep_trainable:  # B = 0 with A != 0, as PEFT initialises a fresh adapter
                torch.testing.assert_close(a @ a.T, torch.eye(8) / 3, rtol=0, atol=1e-6)
            else:
                assert (a == 0).all()
    b, a, lost = factorize(torch.zeros(OUT, IN), 4, 8.0, keep_trainable=False)
    assert (b == 0).all() and (a == 0).all() and lost == 0.0
    assert b.shape == (OUT, 4) and a.shape == (4, IN)


def test_exact_rejects_bad_input() -> None:
    s4, s8 = site_state(0, 4), site_state(1, 8)
    with pytest.raises(ValueError, match="weight"):
        exact([(s4, 0.0, 8.0)], 4, 8.0)
    with pytest.raises(ValueError, match="alpha"):
        exact([(s4, 1.0, 0.0)], 4, 8.0)
    with pytest.raises(ValueError, match="nothing"):
        exact([], 4, 8.0)
    with pytest.raises(ValueError, match="rank"):
        exact([(s4, 1.0, 8.0)], 0, 8.0)
    wide = {**s8, f"{LAYERS[0]}.lora_A.weight": torch.zeros(8, IN + 1)}
    with pytest.raises(ValueError, match=re.escape(f"{LAYERS[0]}: LoRA layer is {OUT}x{IN + 1}")):
        exact([(s4, 1.0, 8.0), (wide, 1.0, 16.0)], 4, 8.0)
    with pytest.raises(ValueError, match="tensor names"):
        exact([(s4, 1.0, 8.0), ({k: v for k, v in s8.items() if k != HEAD_B}, 1.0, 16.0)], 4, 8.0)
    with pytest.raises(ValueError, match=re.escape(f"{HEAD_W}: shape")):
        exact([(s4, 1.0, 8.0), ({**s8, HEAD_W: torch.zeros(4, IN)}, 1.0, 16.0)], 4, 8.0)
