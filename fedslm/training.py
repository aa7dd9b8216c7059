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
from typing import Any

import torch

from fedslm.batching import IGNORE, Encoded, collate, poisson_batches, sequential_batches
from fedslm.losses import (
    correct_predictions,
    lm_logits_at_labels,
    lm_loss_at_labels,
    masked_token_mean,
    per_example_loss,
)
from fedslm.privacy.dp_sgd import dp_optimizer, fill_empty_grad_samples
from fedslm.schedule import Schedule


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
    params: list[torch.nn.Parameter],
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """A fresh optimizer over ``params``; state is not carried across rounds."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


BatchLoss = Callable[[list[int]], torch.Tensor]  # row indices -> per-example losses [len]


def encoded_loss(model: torch.nn.Module, data: Encoded, device: torch.device) -> BatchLoss:
    """Per-example losses of ``model`` on rows of tokenised ``data``."""

    def loss(index: list[int]) -> torch.Tensor:
        batch = collate(data, index, device)
        labels = batch.pop("labels")
        if labels.dim() == 2:  # causal LM: logits only where a label follows
            return lm_loss_at_labels(model, batch, labels)
        return per_example_loss(model(**batch).logits, labels)

    return loss


def train_steps(
    model: torch.nn.Module,
    data: Encoded | int,
    *,
    steps: int,
    sample_rate: float,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    dp: DPSettings | None,
    seed: int,
    on_step: StepCallback | None = None,
    proximal: Proximal | None = None,
    physical_batch_size: int | None = None,
    schedule: Schedule | None = None,
    first_step: int = 0,
    batch_loss: BatchLoss | None = None,
) -> TrainResult:
    """Run ``steps`` optimizer steps on Poisson-sampled logical batches of ``data``.

    ``data`` is tokenised rows (or, with ``batch_loss``, just their number). A logical batch is
    processed in micro-batches of ``physical_batch_size`` rows (default: all at once) and makes
    one optimizer step. With ``dp`` set, ``model`` must be wrapped by ``per_sample_module`` and
    ``optimizer`` is wrapped here into a DP optimizer: every micro-batch's per-example gradients
    are clipped and summed, and noise is added once per logical batch, exactly as if the whole
    batch had been clipped at once; every step, empty batches included, is clipped and noised.
    Without DP an empty batch is skipped. ``schedule`` sets the learning rate of job-wide step
    ``first_step + i``. ``seed`` fixes batch sampling and noise. ``proximal`` (FedProx) pulls
    the weights back toward where the round started after every step.
    """
    rows = data if isinstance(data, int) else len(data)
    if batch_loss is None:
        assert not isinstance(data, int), "tokenised data or a batch_loss is needed"
        batch_loss = encoded_loss(model, data, device)
    sampler = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = optimizer.param_groups
    if dp is not None:
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        optimizer = dp_optimizer(
            optimizer, dp.noise_multiplier, dp.max_grad_norm, dp.expected_batch_size, noise_gen
        )
    model.train()
    start = time.perf_counter()
    losses: list[float] = []
    examples = empty = 0
    batches = poisson_batches(rows, sample_rate, steps, sampler)
    checked = False
    for step, index in enumerate(batches, 1):
        if schedule is not None:
            for group in groups:
                group["lr"] = schedule.at(first_step + step - 1)
        optimizer.zero_grad(set_to_none=True)
        if not index:
            empty += 1
            if dp is None:
                continue
            fill_empty_grad_samples(params)
        else:
            losses.append(_accumulate(batch_loss, index, physical_batch_size, optimizer, dp))
            examples += len(index)
        before = None if checked or dp is None else [p.detach().clone() for p in params]
        optimizer.step()
        if before is not None:
            _assert_updated(params, before)
            checked = True
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


def _accumulate(
    batch_loss: BatchLoss,
    index: list[int],
    physical: int | None,
    optimizer: torch.optim.Optimizer,
    dp: DPSettings | None,
) -> float:
    """Forward and backward one logical batch in micro-batches; returns its mean loss.

    Under DP each micro-batch but the last is clipped and added to the optimizer's running sum
    (Opacus' skipped step); the caller's ``step`` then clips the last one, adds the noise once
    and divides by the expected batch size. Without DP the gradients of the micro-batches add
    up in ``.grad``, each scaled so the total is the mean over the logical batch.
    """
    size = physical or len(index)
    chunks = [index[i : i + size] for i in range(0, len(index), size)]
    total = 0.0
    for i, chunk in enumerate(chunks):
        losses = batch_loss(chunk)
        total += float(losses.detach().sum())
        # under DP Opacus rescales a mean loss to per-example gradients of this micro-batch
        loss = losses.mean() if dp is not None else losses.sum() / len(index)
        with warnings.catch_warnings():
            # Opacus' hooks fire on module outputs when the inputs (frozen embeddings) need
            # no grad; that is the intended LoRA setup, not a problem.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        if dp is not None and i < len(chunks) - 1:
            optimizer.signal_skip_step(do_skip=True)  # type: ignore[attr-defined]
            optimizer.step()  # clips this micro-batch into the running sum; no noise, no step
            optimizer.zero_grad(set_to_none=True)  # drops its per-example grads, keeps the sum
    return total / len(index)


class ScaledHead(torch.nn.Module):
    """A linear head on precomputed features, logits scaled as the model's head scales them
    (``fedslm.models.pooled.MeanPoolClassifier.head``)."""

    def __init__(self, linear: torch.nn.Linear, scale: float) -> None:
        super().__init__()
        self.linear, self.scale = linear, scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of features."""
        return self.scale * self.linear(features)


def inner_model(model: Any) -> Any:
    """The model inside PEFT's wrapper (``model`` itself when unwrapped). Typed ``Any``: what
    it holds (the mean-pooling classifier's ``features``/``head``, a family's classifier) is
    known only at run time."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def encode_features(
    model: torch.nn.Module, data: Encoded, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The features a mean-pooling classifier's head reads, for every row of ``data``, in eval
    mode (no dropout): ``[rows, hidden]`` on ``device``."""
    inner = inner_model(model)
    if not hasattr(inner, "features"):
        raise ValueError("a linear probe needs model.pooling 'mean'")
    was_training = inner.training
    inner.eval()
    out = []
    for index in sequential_batches(len(data), batch_size):
        batch = collate(data, index, device)
        out.append(inner.features(batch["input_ids"], batch["attention_mask"]))
    inner.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 1, device=device)


@torch.no_grad()
def evaluate_head(
    model: torch.nn.Module, features: torch.Tensor, data: Encoded, batch_size: int
) -> EvalResult:
    """``evaluate`` of a mean-pooling classifier from its encoder's ``features`` of ``data``
    (``encode_features``): the same batches and sums, the head alone. Equal to ``evaluate``
    bit for bit while the encoder is the one that computed the features."""
    inner = inner_model(model)
    inner.eval()
    labels = torch.tensor(data.targets, device=features.device)
    total_loss = 0.0
    correct = counted = 0
    for index in sequential_batches(len(data), batch_size):
        logits = inner.head(features[index])
        total_loss += float(per_example_loss(logits, labels[index]).sum())
        c, n = correct_predictions(logits, labels[index])
        correct += c
        counted += n
    n = len(data)
    return EvalResult(
        total_loss / n if n else math.nan, correct / counted if counted else math.nan, n
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
        if labels.dim() == 2:  # causal LM: next-token loss and accuracy on labelled tokens
            logits, targets = lm_logits_at_labels(model, batch, labels)
            total_loss += float(masked_token_mean(logits, targets).sum())
            mask = targets != IGNORE
            c, n = int(((logits.argmax(-1) == targets) & mask).sum()), int(mask.sum())
        else:
            logits = model(**batch).logits
            total_loss += float(per_example_loss(logits, labels).sum())
            c, n = correct_predictions(logits, labels)
        correct += c
        counted += n
    n = len(data)
    return EvalResult(
        total_loss / n if n else math.nan, correct / counted if counted else math.nan, n
    )
