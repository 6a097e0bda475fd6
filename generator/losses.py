"""Differentiable pieces of the VQGAN+CLIP objective.

The formulas follow Katherine Crowson's 2021 VQGAN+CLIP notebook: spherical
distance between CLIP embeddings, straight-through quantisation, and two
gradient tricks (``replace_grad``, ``clamp_with_grad``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


class _ReplaceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_forward: Tensor, x_backward: Tensor) -> Tensor:  # type: ignore[override]
        ctx.shape = x_backward.shape
        return x_forward

    @staticmethod
    def backward(ctx, grad_in: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, grad_in.sum_to_size(ctx.shape)


def replace_grad(x_forward: Tensor, x_backward: Tensor) -> Tensor:
    """Return ``x_forward``'s values with the gradient routed to ``x_backward``."""
    return _ReplaceGrad.apply(x_forward, x_backward)


class _ClampWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, low: float, high: float) -> Tensor:  # type: ignore[override]
        ctx.low = low
        ctx.high = high
        ctx.save_for_backward(x)
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad_in: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        # Gradient descent moves x by -grad: keep the gradient only where that
        # move brings an out-of-range value back toward [low, high].
        moves_inward = grad_in * (x - x.clamp(ctx.low, ctx.high)) >= 0
        return grad_in * moves_inward, None, None


def clamp_with_grad(x: Tensor, low: float, high: float) -> Tensor:
    """Clamp ``x`` to ``[low, high]`` but pass gradients that push clamped values back into range.

    A plain ``clamp`` has zero gradient outside the range, so pixels stuck at
    0 or 1 would never recover.
    """
    return _ClampWithGrad.apply(x, low, high)


def vector_quantize(x: Tensor, codebook: Tensor) -> Tensor:
    """Replace each vector of ``x`` (..., D) by its nearest codebook row.

    The forward value is the codebook vector, and the gradient flows to ``x``
    unchanged (the straight-through estimator of VQ-VAE).
    """
    distances = (
        x.pow(2).sum(dim=-1, keepdim=True)
        + codebook.pow(2).sum(dim=1)
        - 2 * x @ codebook.T
    )
    quantized = codebook[distances.argmin(dim=-1)]
    return x + (quantized - x).detach()


def quantize_latent(z: Tensor, codebook: Tensor) -> Tensor:
    """Quantise a latent (N, D, H, W) channel-wise against ``codebook`` (n_embed, D)."""
    channels_last = z.movedim(1, -1)
    return vector_quantize(channels_last, codebook).movedim(-1, 1)


def spherical_distance(a: Tensor, b: Tensor) -> Tensor:
    """Squared great-circle distance between the directions of ``a`` and ``b`` along the last axis.

    Equals ``2 * arcsin(|a - b| / 2) ** 2`` for unit vectors, i.e. half the
    squared angle between them, in [0, pi**2 / 2].
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    return (a - b).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


@dataclass
class PromptTarget:
    """A CLIP embedding to pull the image toward (weight > 0) or push it from (weight < 0).

    ``stop`` is the spherical distance below which the prompt stops pulling.
    """

    label: str
    embedding: Tensor
    weight: float
    stop: float = float("-inf")

    def loss(self, image_embeddings: Tensor) -> Tensor:
        """Return the weighted distance of the cutout embeddings (cutn, dim), mean over cutouts."""
        sign = 1.0 if self.weight > 0 else -1.0
        distances = spherical_distance(image_embeddings, self.embedding.unsqueeze(0)) * sign
        # The forward value stays the true distance, but the gradient is cut
        # where the distance is already below the stop value.
        stop = torch.full_like(distances, self.stop)
        distances = replace_grad(distances, torch.maximum(distances, stop))
        return abs(self.weight) * distances.mean()
