"""Server optimizers on adapter states (Reddi et al. 2021, "Adaptive Federated Optimization").

Each round the coordinator aggregates the sites' adapters and calls
``step(global_state, aggregated_state)``; the pseudo-gradient is ``delta = aggregated - global``
and the optimizer moves the global state along it. Each is named for the step it takes (the
``federation.server_optimizer.name``), with the paper's name of the whole algorithm:

- ``sgd`` (FedAvg): ``global + lr · delta`` (lr 1: the aggregated state itself, bitwise);
- ``sgdm`` (FedAvgM): ``m = momentum · m + delta``, ``global + lr · m`` (Hsu et al. 2019);
- ``adam`` (FedAdam): ``m = b1 m + (1-b1) delta``, ``v = b2 v + (1-b2) delta²``,
  ``global + eta_t · m / (sqrt(v) + tau)``;
- ``yogi`` (FedYogi): as adam with ``v = v - (1-b2) delta² sign(v - delta²)``, ``eta_t = eta``.

The formulas, defaults, zero initial m and v, and where tau enters are Flower 1.41's
(``flwr.serverapp.strategy``; a test runs both). One difference: FedAdam's bias correction
``eta_t = eta · sqrt(1 - b2^t) / (1 - b1^t)`` uses t = steps taken, counting this one (Adam's
convention), where Flower uses t = server round + 1. Buffers are float64; states are returned
in the global state's dtype. ``state_dict()`` holds plain tensors and numbers, so a checkpoint
taken after any step resumes bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from fedslm.config import RENAMED_SERVER_OPTIMIZERS

AdapterState = dict[str, torch.Tensor]
Buffers = dict[str, torch.Tensor]


class ServerOptimizer:
    """Base class: checks inputs, counts steps, saves and restores buffers and settings."""

    kind: ClassVar[str] = ""
    buffer_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **hyperparameters: float) -> None:
        self.hyperparameters = {k: float(v) for k, v in hyperparameters.items()}
        self.steps = 0
        self.buffers: dict[str, Buffers] = {name: {} for name in self.buffer_names}

    def step(self, global_state: AdapterState, aggregated_state: AdapterState) -> AdapterState:
        """The new global state after one server step from ``global_state``."""
        _check_same_shapes(global_state, aggregated_state)
        for name, buffer in self.buffers.items():
            if buffer:  # a buffer built for other tensors cannot continue on these
                _check_same_shapes(buffer, global_state, what=f"{self.kind} {name} buffer")
        self.steps += 1
        delta = {
            k: aggregated_state[k].to(torch.float64) - v.to(torch.float64)
            for k, v in global_state.items()
        }
        moves = self._moves(delta)
        return {k: (v.to(torch.float64) + moves[k]).to(v.dtype) for k, v in global_state.items()}

    def _moves(self, delta: Buffers) -> Buffers:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Kind, settings, step count and float64 buffers (copies), for a checkpoint."""
        return {
            "kind": self.kind,
            "hyperparameters": dict(self.hyperparameters),
            "steps": self.steps,
            "buffers": {
                name: {k: t.clone() for k, t in buf.items()} for name, buf in self.buffers.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state_dict()``; its kind and settings must be this optimizer's.
        A checkpoint of an earlier fedslm names the kind in its old spelling (fedadam...)."""
        kind = RENAMED_SERVER_OPTIMIZERS.get(state["kind"], state["kind"])
        if kind != self.kind:
            raise ValueError(f"checkpoint is for server optimizer {kind}, not {self.kind}")
        saved = {k: float(v) for k, v in state["hyperparameters"].items()}
        if saved != self.hyperparameters:
            raise ValueError(
                f"{self.kind} checkpoint settings {saved} differ from {self.hyperparameters}"
            )
        if set(state["buffers"]) != set(self.buffer_names):
            raise ValueError(f"{self.kind} checkpoint buffers: {sorted(state['buffers'])}")
        self.steps = int(state["steps"])
        self.buffers = {
            name: {k: t.to(torch.float64).clone() for k, t in buf.items()}
            for name, buf in state["buffers"].items()
        }


class ServerSGD(ServerOptimizer):
    """``global + lr · (aggregated - global)``; lr 1 (default) returns the aggregated state:
    FedAvg."""

    kind = "sgd"

    def __init__(self, lr: float = 1.0) -> None:
        _check_positive(lr=lr)
        super().__init__(lr=lr)

    def step(self, global_state: AdapterState, aggregated_state: AdapterState) -> AdapterState:
        """The new global state; with lr 1 a copy of ``aggregated_state``, bit for bit."""
        if self.hyperparameters["lr"] != 1.0:
            return super().step(global_state, aggregated_state)
        _check_same_shapes(global_state, aggregated_state)
        self.steps += 1
        # global + (aggregated - global) need not round back to aggregated: skip the arithmetic
        return {k: aggregated_state[k].to(v.dtype).clone() for k, v in global_state.items()}

    def _moves(self, delta: Buffers) -> Buffers:
        lr = self.hyperparameters["lr"]
        return {k: lr * d for k, d in delta.items()}


class ServerSGDM(ServerOptimizer):
    """Server SGD with momentum (FedAvgM): ``m = momentum · m + delta``, then
    ``global + lr · m``."""

    kind = "sgdm"
    buffer_names = ("momentum",)

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        _check_positive(lr=lr)
        _check_unit(momentum=momentum)
        super().__init__(lr=lr, momentum=momentum)

    def _moves(self, delta: Buffers) -> Buffers:
        lr, mu = self.hyperparameters["lr"], self.hyperparameters["momentum"]
        m = self.buffers["momentum"]
        self.buffers["momentum"] = {k: mu * m[k] + d if m else d for k, d in delta.items()}
        return {k: lr * v for k, v in self.buffers["momentum"].items()}


class ServerAdam(ServerOptimizer):
    """Adam on the pseudo-gradient, FedAdam (Flower's defaults: eta 0.1, b1 0.9, b2 0.99,
    tau 1e-3)."""

    kind = "adam"
    buffer_names = ("m", "v")

    def __init__(
        self,
        eta: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: bool = True,
    ) -> None:
        _check_positive(eta=eta, tau=tau)
        _check_unit(beta1=beta1, beta2=beta2)
        super().__init__(
            eta=eta, beta1=beta1, beta2=beta2, tau=tau, bias_correction=float(bias_correction)
        )

    def _second_moment(self, v: torch.Tensor | None, d2: torch.Tensor) -> torch.Tensor:
        b2 = self.hyperparameters["beta2"]
        return (1 - b2) * d2 if v is None else b2 * v + (1 - b2) * d2

    def _eta(self) -> float:
        h = self.hyperparameters
        if not h.get("bias_correction"):
            return h["eta"]
        t = self.steps
        return h["eta"] * math.sqrt(1 - h["beta2"] ** t) / (1 - h["beta1"] ** t)

    def _moves(self, delta: Buffers) -> Buffers:
        h = self.hyperparameters
        m, v = self.buffers["m"], self.buffers["v"]
        b1 = h["beta1"]
        m = {k: (b1 * m[k] if m else 0.0) + (1 - b1) * d for k, d in delta.items()}
        v = {k: self._second_moment(v.get(k), d * d) for k, d in delta.items()}
        self.buffers["m"], self.buffers["v"] = m, v
        eta = self._eta()
        return {k: eta * m[k] / (v[k].sqrt() + h["tau"]) for k in delta}


class ServerYogi(ServerAdam):
    """Yogi on the pseudo-gradient, FedYogi: v moves towards delta² additively (Flower's
    defaults: eta 0.01, b1 0.9, b2 0.99, tau 1e-3; no bias correction)."""

    kind = "yogi"

    def __init__(
        self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(eta, beta1, beta2, tau, bias_correction=False)

    def _second_moment(self, v: torch.Tensor | None, d2: torch.Tensor) -> torch.Tensor:
        v = torch.zeros_like(d2) if v is None else v
        return v - (1 - self.hyperparameters["beta2"]) * d2 * torch.sign(v - d2)


SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    c.kind: c for c in (ServerSGD, ServerSGDM, ServerAdam, ServerYogi)
}


def make_server_optimizer(kind: str, **hyperparameters: Any) -> ServerOptimizer:
    """The server optimizer called ``kind`` (sgd, sgdm, adam, yogi)."""
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {kind!r}; use one of {list(SERVER_OPTIMIZERS)}")
    return SERVER_OPTIMIZERS[kind](**hyperparameters)


def _check_same_shapes(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str = "state"
) -> None:
    if expected.keys() != got.keys():
        diff = sorted(set(expected) ^ set(got))[:3]
        raise ValueError(f"server step: {what} tensor names differ: {diff}")
    for k, t in expected.items():
        if t.shape != got[k].shape:
            raise ValueError(
                f"server step: {what} {k}: shape {tuple(got[k].shape)} != {tuple(t.shape)}"
            )


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _check_unit(**values: float) -> None:
    for name, value in values.items():
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
