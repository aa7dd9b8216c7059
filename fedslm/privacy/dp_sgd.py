"""DP-SGD with Opacus: per-sample gradients, clipping and noise.

Two pieces, in the build order the field notes require (model on device, LoRA, optimizer,
then Opacus): ``per_sample_module`` wraps the model once (its hooks live as long as the model),
and ``dp_optimizer`` wraps each round's fresh optimizer.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer


def per_sample_module(model: torch.nn.Module) -> GradSampleModule:
    """Wrap ``model`` so each backward pass fills ``p.grad_sample`` for every trainable tensor."""
    return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)


def dp_optimizer(
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator | None,
) -> DPOptimizer:
    """Clip each example's gradient to ``max_grad_norm``, add Gaussian noise of std
    ``noise_multiplier * max_grad_norm`` to the sum, divide by ``expected_batch_size``.

    Dividing by the expected rather than the actual batch size keeps the sensitivity fixed
    under Poisson sampling.
    """
    return DPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )


def fill_empty_grad_samples(params: list[torch.nn.Parameter]) -> None:
    """Give every trainable tensor zero per-sample gradients for an empty Poisson batch.

    A forward pass on zero rows fails, but the step must still happen: the accountant counts it
    and the optimizer adds its noise.
    """
    for p in params:
        # Opacus reads per-sample gradients from this attribute, which torch does not declare
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
