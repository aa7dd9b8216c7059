"""Server optimizers: parity with Flower's strategies, checkpoint/resume, input checks."""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from fedslm.server_opt import (
    ServerAdam,
    ServerOptimizer,
    ServerSGD,
    ServerSGDM,
    ServerYogi,
    make_server_optimizer,
)

State = dict[str, torch.Tensor]
SHAPES = {"x.lora_A.weight": (4, 6), "x.lora_B.weight": (5, 4), "head.bias": (3,)}


def random_state(seed: int, scale: float = 1.0) -> State:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in SHAPES.items()}


def plus(a: State, b: State) -> State:
    return {k: a[k] + b[k] for k in a}


def trajectory(
    opt: ServerOptimizer, rounds: int, start: int = 0, glob: State | None = None
) -> list[State]:
    """Global states after each round; round t's aggregate is global + a fixed random delta."""
    glob = glob if glob is not None else random_state(0)
    out = []
    for t in range(start, start + rounds):
        glob = opt.step(glob, plus(glob, random_state(100 + t, 0.1)))
        out.append(glob)
    return out


# -- parity with Flower 1.41 ----------------------------------------------------------------


def flower_trajectory(
    strategy: Any, rounds: int, server_round: Callable[[int], int], monkeypatch: pytest.MonkeyPatch
) -> list[dict[str, np.ndarray]]:
    """Drive a Flower strategy's server step on the same inputs ``trajectory`` uses.

    Flower's FedAvg aggregation of the replies is replaced by "the reply is the aggregate", so
    what is compared is exactly the server optimizer; ``current_arrays`` is set as Flower's
    ``configure_train`` sets it each round.
    """
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy.fedavg import FedAvg as FlowerFedAvg
    from flwr.serverapp.strategy.fedavgm import FedAvgM as FlowerFedAvgM

    monkeypatch.setattr(FlowerFedAvg, "aggregate_train", lambda self, rnd, replies: (replies, None))
    glob = {k: v.numpy() for k, v in random_state(0).items()}
    out = []
    for t in range(rounds):
        if isinstance(strategy, FlowerFedAvgM):
            if strategy.current_arrays is None:  # FedAvgM keeps its own copy after round 1
                strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in glob.items()})
        else:
            strategy.current_arrays = {k: v.copy() for k, v in glob.items()}
        delta = random_state(100 + t, 0.1)
        aggregate = ArrayRecord({k: Array(glob[k] + delta[k].numpy()) for k in glob})
        record, _ = strategy.aggregate_train(server_round(t + 1), aggregate)
        glob = {k: record[k].numpy() for k in glob}
        out.append(glob)
    return out


# (our kind and settings, Flower's class and settings, Flower's server_round for our step t)
PARITY = {
    "sgdm": (
        ("sgdm", {"lr": 0.7, "momentum": 0.9}),
        ("FedAvgM", {"server_learning_rate": 0.7, "server_momentum": 0.9}),
        lambda t: t,
    ),
    "sgd-lr": (("sgd", {"lr": 0.5}), ("FedAvgM", {"server_learning_rate": 0.5}), lambda t: t),
    # Flower's FedAdam bias-corrects with exponent server_round + 1; ours with the step count t
    "adam": (("adam", {}), ("FedAdam", {}), lambda t: t - 1),
    "adam-set": (
        ("adam", {"eta": 0.03, "beta1": 0.5, "beta2": 0.9, "tau": 1e-2}),
        ("FedAdam", {"eta": 0.03, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2}),
        lambda t: t - 1,
    ),
    "yogi": (("yogi", {}), ("FedYogi", {}), lambda t: t),
    "yogi-set": (
        ("yogi", {"eta": 0.05, "beta1": 0.0, "beta2": 0.5, "tau": 1e-4}),
        ("FedYogi", {"eta": 0.05, "beta_1": 0.0, "beta_2": 0.5, "tau": 1e-4}),
        lambda t: t,
    ),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_matches_flower(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.serverapp.strategy as flower

    (kind, settings), (flower_kind, flower_settings), server_round = PARITY[case]
    strategy = getattr(flower, flower_kind)(**flower_settings)
    theirs = flower_trajectory(strategy, 5, server_round, monkeypatch)
    ours = trajectory(make_server_optimizer(kind, **settings), 5)
    for mine, their in zip(ours, theirs, strict=True):
        for k, v in mine.items():
            np.testing.assert_allclose(v.numpy(), their[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_flower_defaults_are_ours() -> None:
    import flwr.serverapp.strategy as flower

    adam, yogi, avgm = flower.FedAdam(), flower.FedYogi(), flower.FedAvgM()
    for theirs, ours in ((adam, ServerAdam()), (yogi, ServerYogi())):
        h = ours.hyperparameters
        assert (theirs.eta, theirs.beta_1, theirs.beta_2, theirs.tau) == (
            h["eta"],
            h["beta1"],
            h["beta2"],
            h["tau"],
        )
    assert avgm.server_learning_rate == ServerSGD().hyperparameters["lr"] == 1.0


# -- checkpoint and resume -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "sgdm", "adam", "yogi"])
def test_resume_from_a_checkpoint_is_bitwise_identical(kind: str) -> None:
    settings = {"sgd": {"lr": 0.8}}.get(kind, {})
    straight = trajectory(make_server_optimizer(kind, **settings), 3)

    first = make_server_optimizer(kind, **settings)
    (after_one,) = trajectory(first, 1)
    buffer = io.BytesIO()
    torch.save({"opt": first.state_dict(), "global": after_one}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors and numbers only
    first.step(after_one, after_one)  # moving on must not change what was saved

    resumed = make_server_optimizer(kind, **settings)
    resumed.load_state_dict(saved["opt"])
    rest = trajectory(resumed, 2, start=1, glob=saved["global"])
    for a, b in zip(straight[1:], rest, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_only_loads_into_the_same_optimizer() -> None:
    adam = ServerAdam()
    trajectory(adam, 1)
    with pytest.raises(ValueError, match="adam, not yogi"):
        ServerYogi().load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="settings"):
        ServerAdam(eta=0.2).load_state_dict(adam.state_dict())


@pytest.mark.parametrize(
    ("old", "kind"),
    [("fedavg", "sgd"), ("fedavgm", "sgdm"), ("fedadam", "adam"), ("fedyogi", "yogi")],
)
def test_a_checkpoint_of_an_earlier_version_resumes(old: str, kind: str) -> None:
    """Run folders written before the rename hold server_optimizer.pt with kind 'fedadam'...:
    resuming one continues bit for bit, and a different optimizer still refuses it."""
    straight = trajectory(make_server_optimizer(kind), 3)
    first = make_server_optimizer(kind)
    (after_one,) = trajectory(first, 1)
    saved = {**first.state_dict(), "kind": old}  # as the earlier version wrote it
    resumed = make_server_optimizer(kind)
    resumed.load_state_dict(saved)
    rest = trajectory(resumed, 2, start=1, glob=after_one)
    for a, b in zip(straight[1:], rest, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = "yogi" if kind == "adam" else "adam"
    with pytest.raises(ValueError, match=f"checkpoint is for server optimizer {kind}, not {other}"):
        make_server_optimizer(other).load_state_dict(saved)


# -- plain server SGD (FedAvg) and input checks ---------------------------------------------


def test_sgd_with_lr_one_is_the_aggregated_state() -> None:
    glob, agg = random_state(0), random_state(1)
    out = ServerSGD().step(glob, agg)
    assert all(torch.equal(out[k], agg[k]) for k in agg)
    assert out["head.bias"] is not agg["head.bias"]
    half = ServerSGD(lr=0.5).step(glob, agg)
    for k in agg:
        torch.testing.assert_close(half[k], (glob[k] + agg[k]) / 2)


def test_steps_refuse_mismatched_states() -> None:
    glob = random_state(0)
    with pytest.raises(ValueError, match="names differ"):
        ServerAdam().step(glob, {k: v for k, v in glob.items() if k != "head.bias"})
    with pytest.raises(ValueError, match=re.escape("head.bias: shape (4,) != (3,)")):
        ServerSGD().step(glob, {**glob, "head.bias": torch.zeros(4)})
    adam = ServerAdam()
    trajectory(adam, 1)
    smaller = {k: v for k, v in glob.items() if k != "head.bias"}
    with pytest.raises(ValueError, match="adam m buffer"):
        adam.step(smaller, smaller)
    with pytest.raises(ValueError, match="unknown server optimizer"):
        make_server_optimizer("fedadam")  # config names only; the old spellings end at the config
    with pytest.raises(ValueError, match="momentum"):
        ServerSGDM(momentum=1.0)
