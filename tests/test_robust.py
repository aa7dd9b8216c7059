"""Update screening, clipping, coordinate median and trimmed mean."""

from __future__ import annotations

import math

import pytest
import torch

from fedslm.robust import (
    Screening,
    clip_update,
    coordinate_median,
    screen_updates,
    trimmed_mean,
)

A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.classifier.weight"
State = dict[str, torch.Tensor]


def reference(rank: int = 4) -> State:
    g = torch.Generator().manual_seed(0)
    return {
        A: torch.randn(rank, 6, generator=g),
        B: torch.zeros(5, rank),
        HEAD: torch.randn(3, 6, generator=g),
    }


def update(seed: int, scale: float = 0.01, ref: State | None = None) -> State:
    """The reference plus a small random step (the norm rule compares these steps)."""
    ref = ref or reference()
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in ref.items()}


def sites(n: int) -> list[tuple[str, State]]:
    return [(f"site-{i}", update(i)) for i in range(n)]


def reasons(screening: Screening) -> dict[str, str]:
    return dict(screening.rejected)


def test_good_updates_pass_with_their_norms() -> None:
    result = screen_updates(reference(), sites(4))
    assert [s for s, _ in result.accepted] == ["site-0", "site-1", "site-2", "site-3"]
    assert result.rejected == []
    delta = {k: v - reference()[k] for k, v in update(2).items()}
    expected = math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values()))
    assert result.norms["site-2"] == pytest.approx(expected, rel=1e-6)


def test_non_finite_values_are_rejected_naming_site_and_tensor() -> None:
    bad = update(9)
    bad[HEAD][0, 0] = float("nan")
    bad[HEAD][1, 1] = float("inf")
    result = screen_updates(reference(), [*sites(2), ("site-bad", bad)])
    assert [s for s, _ in result.accepted] == ["site-0", "site-1"]
    assert reasons(result)["site-bad"] == f"site-bad: tensor {HEAD}: 2 non-finite values"


def test_wrong_shapes_and_names_are_rejected() -> None:
    wide = {**update(1), HEAD: torch.zeros(3, 7)}
    short = {k: v for k, v in update(2).items() if k != HEAD}
    extra = {**update(3), "m.extra": torch.zeros(1)}
    result = screen_updates(reference(), [("w", wide), ("s", short), ("e", extra)])
    assert result.accepted == []
    why = reasons(result)
    assert why["w"] == f"w: tensor {HEAD}: shape (3, 7), expected (3, 6)"
    assert why["s"] == f"s: missing tensors ['{HEAD}']"
    assert why["e"] == "e: unexpected tensors ['m.extra']"


def test_other_ranks_only_when_allowed_and_consistent() -> None:
    rank8 = update(1, ref=reference(rank=8))
    result = screen_updates(reference(), [("r8", rank8)])
    assert reasons(result)["r8"].startswith(f"r8: tensor {A}: shape (8, 6), expected (4, 6)")
    result = screen_updates(reference(), [("r8", rank8)], allow_rank_change=True)
    assert [s for s, _ in result.accepted] == ["r8"]
    torn = {**rank8, B: torch.zeros(5, 6)}
    result = screen_updates(reference(), [("torn", torn)], allow_rank_change=True)
    assert f"{A} has rank 8" in reasons(result)["torn"]
    wrong_in = {**rank8, A: torch.zeros(8, 7)}
    result = screen_updates(reference(), [("in", wrong_in)], allow_rank_change=True)
    assert reasons(result)["in"] == f"in: tensor {A}: shape (8, 7), expected (4, 6)"


def test_an_outlying_update_norm_is_rejected() -> None:
    loud = update(7, scale=0.5)  # 50x the others' step
    result = screen_updates(reference(), [*sites(4), ("site-loud", loud)])
    assert [s for s, _ in result.accepted] == [f"site-{i}" for i in range(4)]
    why = reasons(result)["site-loud"]
    assert why.startswith("site-loud: update norm") and "10 x the median" in why
    assert "largest change: " in why
    # 5x is within the default factor of 10; a stricter factor catches it
    mild = [*sites(4), ("site-mild", update(7, scale=0.05))]
    assert screen_updates(reference(), mild).rejected == []
    strict = screen_updates(reference(), mild, factor=3.0)
    assert [s for s, _ in strict.rejected] == ["site-mild"]


def test_the_norm_rule_needs_three_updates_and_a_nonzero_median() -> None:
    loud = ("site-loud", update(7, scale=5.0))
    assert screen_updates(reference(), [*sites(1), loud]).rejected == []
    assert [s for s, _ in screen_updates(reference(), [*sites(2), loud]).rejected] == ["site-loud"]
    idle = [(f"idle-{i}", reference()) for i in range(3)]
    assert screen_updates(reference(), [*idle, loud]).rejected == []


def test_clip_update() -> None:
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    clipped, norm = clip_update(delta, 1.0)
    assert norm == 5.0
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.8]]))
    same, norm = clip_update(delta, 5.0)
    assert norm == 5.0 and all(torch.equal(same[k], delta[k]) for k in delta)
    assert same["a"] is not delta["a"]
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"a": torch.tensor([float("nan")])}, 1.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_update(delta, 0.0)


def test_coordinate_median_on_known_values() -> None:
    def s(x: float, y: float) -> State:
        return {"w": torch.tensor([float(x), float(y)])}

    odd = coordinate_median([s(1, 10), s(5, -2), s(3, 0)])
    torch.testing.assert_close(odd["w"], torch.tensor([3.0, 0.0]))
    even = coordinate_median([s(1, 0), s(2, 0), s(3, 0), s(100, 1)])
    torch.testing.assert_close(even["w"], torch.tensor([2.5, 0.0]))
    assert even["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="nothing"):
        coordinate_median([])
    with pytest.raises(ValueError, match="shape"):
        coordinate_median([s(1, 2), {"w": torch.zeros(3)}])


def test_trimmed_mean_on_known_values() -> None:
    states = [{"w": torch.tensor([v, -v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    torch.testing.assert_close(trimmed_mean(states, 0.2)["w"], torch.tensor([3.0, -3.0]))
    torch.testing.assert_close(trimmed_mean(states, 0.0)["w"], torch.tensor([22.0, -22.0]))
    torch.testing.assert_close(trimmed_mean(states, 0.5)["w"], torch.tensor([3.0, -3.0]))
    with pytest.raises(ValueError, match="none left"):
        trimmed_mean(states[:2], 0.5)
    with pytest.raises(ValueError, match="none left"):
        trimmed_mean(states[:4], 0.5)
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(states, -0.1)
