"""Building blocks of FilterMatch (semi-supervised single-pass nnU-Net training).

Pure tensor functions, tested on their own; the trainer that uses them is a
later step (see the FilterMatch issue):

- :func:`strong_view`: the strong transform T of an unlabeled batch. Geometry
  (in-plane rot90 only where the two in-plane sides are equal, otherwise 180°;
  in-plane flips) is applied to image and pseudo-label alike; intensity
  perturbations (brightness, contrast, gamma, noise, blur) to the image only.
- :func:`mean_entropy`: a case's score for the filter, the **mean** voxel
  entropy (the reference summed it, which favours large images).
- :func:`cases_to_drop`: the fraction q of remaining cases with the lowest
  entropy (the most confident, least informative), ties broken by case id.
- :func:`filter_epochs` and :func:`unlabeled_weight`: the filter schedule (never
  after the last epoch) and the ramped unlabeled-loss weight λ_u.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class StrongAugmentation:
    """Probabilities and strengths of the strong view (each applied per sample)."""

    p_rotate: float = 0.5
    p_flip: float = 0.5
    p_brightness: float = 0.5
    brightness: float = 0.25  # multiplicative factor in [1 - b, 1 + b]
    p_contrast: float = 0.5
    contrast: float = 0.25
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.3
    noise_std: float = 0.1  # relative to the sample's intensity std
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)


def _in_plane_axes(x: torch.Tensor) -> tuple[int, int]:
    """The last two spatial axes of a (B, C, [Z,] Y, X) tensor."""
    if x.ndim not in (4, 5):
        raise ValueError(f"expected a (B, C, Y, X) or (B, C, Z, Y, X) batch, got shape {tuple(x.shape)}")
    return x.ndim - 2, x.ndim - 1


def strong_view(
    images: torch.Tensor, labels: torch.Tensor, config: StrongAugmentation = StrongAugmentation(),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The strong view of a batch: ``images`` (B, C, ...) float, ``labels`` (B, 1, ...) integer.

    Shapes are preserved: a quarter turn is only drawn when the in-plane sides
    are equal, so non-square patches only get 180° turns and flips.
    """
    if images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[2:]:
        raise ValueError(f"image batch {tuple(images.shape)} and label batch {tuple(labels.shape)} do not match")
    a, b = _in_plane_axes(images)
    square = images.shape[a] == images.shape[b]
    out_x, out_y = [], []

    def draw() -> float:
        return float(torch.rand((), generator=generator))

    for x, y in zip(images, labels):
        dims = (a - 1, b - 1)  # per-sample tensors have no batch axis
        if draw() < config.p_rotate:
            k = int(torch.randint(1, 4, (), generator=generator)) if square else 2
            x, y = torch.rot90(x, k, dims), torch.rot90(y, k, dims)
        for axis in dims:
            if draw() < config.p_flip:
                x, y = torch.flip(x, (axis,)), torch.flip(y, (axis,))
        out_x.append(_intensity(x, config, draw, generator))
        out_y.append(y)
    return torch.stack(out_x), torch.stack(out_y)


def _intensity(x: torch.Tensor, c: StrongAugmentation, draw, generator) -> torch.Tensor:
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * draw()

    x = x.clone()
    if draw() < c.p_brightness:
        x = x * uniform(1 - c.brightness, 1 + c.brightness)
    if draw() < c.p_contrast:
        mean = x.mean()
        x = (x - mean) * uniform(1 - c.contrast, 1 + c.contrast) + mean
    if draw() < c.p_gamma:
        lo, hi = x.min(), x.max()
        span = (hi - lo).clamp_min(1e-8)
        x = ((x - lo) / span) ** uniform(*c.gamma) * span + lo
    if draw() < c.p_noise:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + noise * c.noise_std * x.std().clamp_min(1e-8)
    if draw() < c.p_blur:
        x = _gaussian_blur(x, uniform(*c.blur_sigma))
    return x


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the spatial axes of a (C, ...) tensor."""
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    spatial = x.ndim - 1
    conv = F.conv3d if spatial == 3 else F.conv2d
    y = x.unsqueeze(0)  # (1, C, ...)
    channels = x.shape[0]
    for axis in range(spatial):
        shape = [1] * spatial
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).repeat(channels, 1, *([1] * spatial))
        padding = [0] * spatial
        padding[axis] = radius
        y = conv(y, weight, padding=tuple(padding), groups=channels)
    return y.squeeze(0)


def mean_entropy(probabilities: torch.Tensor, normalise: bool = True) -> float:
    """Mean voxel entropy of class probabilities (C, ...); divided by log C when ``normalise``."""
    p = probabilities.clamp_min(1e-12)
    entropy = -(p * p.log()).sum(dim=0)
    value = float(entropy.mean())
    return value / math.log(probabilities.shape[0]) if normalise else value


def cases_to_drop(scores: Mapping[str, float], fraction: float) -> list[str]:
    """The ``floor(fraction * n)`` cases with the lowest entropy (ties: by case id)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], not {fraction}")
    n = int(math.floor(fraction * len(scores) + 1e-9))
    return [case for case, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:n]]


def filter_epochs(start: int, every: int, num_epochs: int) -> list[int]:
    """Epochs (0-based) after which the filter runs: from ``start``, every ``every``
    epochs, never after the last epoch (nothing would use its result)."""
    if every < 1:
        raise ValueError("the filter interval must be at least 1 epoch")
    return [e for e in range(start, num_epochs - 1) if (e - start) % every == 0]


def unlabeled_weight(epoch: int, start: int, weight: float = 1.0, ramp_epochs: int = 0) -> float:
    """λ_u at ``epoch``: 0 during warm-up (before ``start``), then ``weight`` reached
    along a sigmoid ramp (exp(-5 (1 - t)^2)) over ``ramp_epochs`` (0 = hard switch, as the reference)."""
    if epoch < start:
        return 0.0
    if ramp_epochs <= 0:
        return float(weight)
    t = min(1.0, (epoch - start + 1) / ramp_epochs)
    return float(weight * math.exp(-5.0 * (1.0 - t) ** 2))


def pseudo_labels(logits: torch.Tensor) -> torch.Tensor:
    """ŷ = argmax softmax f(x_u), as a (B, 1, ...) label batch; call under ``torch.no_grad()``."""
    return logits.argmax(dim=1, keepdim=True)


def downsample_labels(labels: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Nearest-neighbour label targets for each deep-supervision output shape."""
    return [labels if tuple(labels.shape[2:]) == tuple(s) else
            F.interpolate(labels.float(), size=tuple(s), mode="nearest").to(labels.dtype) for s in shapes]
