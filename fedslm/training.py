"""The local training loop and evaluation: explicit PyTorch, no trainer framework.

One function trains for a given number of steps (with or without DP) and one evaluates.
Both take a model and tokenised data; neither knows about sites, rounds or Flower.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedslm.batching import Encoded, collate, poisson_batches, sequential_batches
from fedslm.losses import correct_predictions, per_example_loss
from fedslm.privacy.dp_sgd import dp_optimizer, fill_empty_grad_samples


@dataclass(frozen=True)
class DPSettings:
    """Noise and clipping for DP-SGD. ``expected_batch_size`` is ``q * N``."""

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int


@dataclass(frozen=True)
class TrainResult:
    """What one call of ``train_steps`` did."""

    steps: int
    mean_loss: float
    examples: int
    empty_batches: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Mean per-example loss and accuracy (class or next-token) over a data set."""

    loss: float
    accuracy: float
    examples: int


StepCallback = Callable[[int, int, float], None]  # (step, steps, loss)


class Proximal:
    """FedProx's pull toward the round's starting point, as a step of its own after each
    optimizer step: ``w -= lr * mu * (w - w_start)``.

    Under DP the term cannot go into the loss: Opacus builds the update from per-example
    gradients only and would drop it. Its gradient ``mu (w - w_start)`` uses no data, so
    applying it after the noised step is post-processing and costs no privacy. Decoupled like
    AdamW's weight decay; with SGD it equals the usual FedProx step up to order.
    """

    def __init__(self, mu: float, lr: float, params: list[torch.nn.Parameter]) -> None:
        self.mu, self.lr = mu, lr
        self.params = params
        self.anchors = [p.detach().clone() for p in params]

    @torch.no_grad()
    def step(self) -> None:
        """Move every parameter a fraction ``lr * mu`` of the way back to its anchor."""
        for p, anchor in zip(self.params, self.anchors, strict=True):
            p.sub_(p - anchor, alpha=self.lr * self.mu)


def make_optimizer(
    params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """A fresh optimizer over ``params``; state is not carried across rounds."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train_steps(
    model: torch.nn.Module,
    data: Encoded,
    *,
    steps: int,
    sample_rate: float,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    dp: DPSettings | None,
    seed: int,
    on_step: StepCallback | None = None,
    proximal: Proximal | None = None,
) -> TrainResult:
    """Run ``steps`` optimizer steps on Poisson-sampled batches of ``data``.

    With ``dp`` set, ``model`` must be wrapped by ``per_sample_module`` and ``optimizer`` is
    wrapped here into a DP optimizer; every step, empty batches included, is clipped and noised.
    Without DP an empty batch is skipped. ``seed`` fixes batch sampling and noise. ``proximal``
    (FedProx) pulls the weights back toward where the round started after every step.
    """
    sampler = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if dp is not None:
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        optimizer = dp_optimizer(
            optimizer, dp.noise_multiplier, dp.max_grad_norm, dp.expected_batch_size, noise_gen
        )
    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    examples = empty = 0
    for step, index in enumerate(poisson_batches(len(data), sample_rate, steps, sampler), 1):
        before = [p.detach().clone() for p in params] if step == 1 and dp is not None else None
        optimizer.zero_grad(set_to_none=True)
        if not index:
            empty += 1
            if dp is None:
                continue
            fill_empty_grad_samples(params)
        else:
            batch = collate(data, index, device)
            labels = batch.pop("labels")
            loss = per_example_loss(model(**batch).logits, labels).mean()
            with warnings.catch_warnings():
                # Opacus' hooks fire on module outputs when the inputs (frozen embeddings) need
                # no grad; that is the intended LoRA setup, not a problem.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            losses.append(float(loss.detach()))
            examples += len(index)
        optimizer.step()
        if before is not None:
            _assert_updated(params, before)
        if proximal is not None:
            proximal.step()
        if on_step is not None:
            on_step(step, steps, losses[-1] if losses else math.nan)
    return TrainResult(
        steps=steps,
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
        examples=examples,
        empty_batches=empty,
        seconds=time.perf_counter() - start,
    )


def _assert_updated(params: list[torch.nn.Parameter], before: list[torch.Tensor]) -> None:
    """Fail loudly if DP-SGD did not reach the weights (field notes: LoRA tensors that never
    change while epsilon grows, when Opacus is attached before parameters move)."""
    for p, old in zip(params, before, strict=True):
        if p.grad is None:
            raise RuntimeError(
                "DP-SGD produced no gradient for a trainable tensor; the model "
                "was probably moved or rewrapped after Opacus was attached"
            )
        if p.grad.abs().sum() > 0 and torch.equal(p.detach(), old):
            raise RuntimeError("a trainable tensor did not change after the first DP-SGD step")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Encoded, batch_size: int, device: torch.device
) -> EvalResult:
    """Mean per-example loss and accuracy of ``model`` on ``data``, in eval mode."""
    model.eval()
    total_loss = 0.0
    correct = counted = 0
    for index in sequential_batches(len(data), batch_size):
        batch = collate(data, index, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        total_loss += float(per_example_loss(logits, labels).sum())
        c, n = correct_predictions(logits, labels)
        correct += c
        counted += n
    n = len(data)
    return EvalResult(
        total_loss / n if n else math.nan, correct / counted if counted else math.nan, n
    )
