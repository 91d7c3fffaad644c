"""Faithfulness of saliency maps: Average Drop/Increase, insertion/deletion, temporal stability.

Pure torch, batched, on whatever device the model is on. ``x`` is the preprocessed
(normalised) batch (N, 3, S, S), ``maps`` (N, S, S) raw maps >= 0 at any scale, ``targets``
(N,) class ids; a score is the softmax probability of the target.

- Average Drop / Increase (Chattopadhay et al., 2018; the Score-CAM article's Table 1): the
  input is multiplied by the map scaled to [0, 1], on the normalised tensor, as torch-cam's
  ClassificationMetric does. ``100 * mean(drop)`` and ``100 * mean(increase)`` are the
  paper's AD and AI.
- Insertion / deletion (Petsiuk et al., 2018, RISE; the article's Table 3): pixels ranked by
  map value are deleted (set to 0) from ``x``, or inserted into a blurred ``x``, ``step``
  pixels at a time; the area under the score curve.
- Stability: how alike the maps of consecutive frames with the same target are.
- Agreement: how alike two computations of the same frames' maps are (reduced precision
  against fp32: :func:`map_agreement`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .model_state import model_device, model_state

BLUR_KERNEL = 11  # RISE's insertion baseline: Gaussian blur, kernel 11, sigma 5
BLUR_SIGMA = 5.0
HOT_FRACTION = 0.1  # stability's IoU compares the hottest 10 % of pixels
# What a reduced precision must keep to be used by default (issue 20, DESIGN.md): each frame's
# map correlates >= 0.999 with fp32's and differs from it by <= 2 % of its norm.
AGREEMENT_CORRELATION = 0.999
AGREEMENT_ERROR = 0.02


def average_drop_increase(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (drop, increase), each (N,) float32 on CPU.

    ``drop = max(0, p - p_e) / p`` and ``increase = 1.0 if p_e > p else 0.0``, with ``p`` the
    score of ``x`` and ``p_e`` the score of ``x * m``, ``m`` the map min-max scaled to [0, 1]
    per frame (a constant map gives m = 0).
    """
    x, maps, targets = _check(model, x, maps, targets)
    m = _unit_scale(maps)[:, None]  # (N, 1, S, S)
    p = _scores(model, x, targets, batch_size)
    p_e = _scores(model, x * m, targets, batch_size)
    # p underflows to 0 only for a hopeless target: nothing to drop then.
    drop = torch.where(p > 0, (p - p_e).clamp(min=0) / p, torch.zeros_like(p))
    increase = (p_e > p).float()
    return drop.cpu(), increase.cpu()


def insertion_deletion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 28,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (insertion AUC, deletion AUC), each (N,) float32 on CPU.

    Pixels are ranked by map value, highest first (ties in row-major order); ``ceil(S*S /
    steps)`` change per step, so each curve has ``steps + 1`` points. Deletion sets the ranked
    pixels of ``x`` to 0; insertion copies them from ``x`` into a Gaussian blur of ``x``.
    AUC = (sum of the points - first/2 - last/2) / steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x, maps, targets = _check(model, x, maps, targets)
    n, _, s, _ = x.shape
    rank = pixel_ranks(maps)  # (N, S*S) position of each pixel in the order
    step = math.ceil(s * s / steps)
    blurred = gaussian_blur(x)
    # Every (frame, step) point of both curves, scored in chunks: (frame, pixels changed).
    frames = torch.arange(n, device=x.device).repeat_interleave(steps + 1)
    changed = (torch.arange(steps + 1, device=x.device) * step).clamp(max=s * s).repeat(n)
    curves = {}
    for name, start, source in (("deletion", x, None), ("insertion", blurred, x)):
        scores = torch.empty(frames.numel(), device=x.device)
        for i in range(0, frames.numel(), batch_size):
            f, k = frames[i : i + batch_size], changed[i : i + batch_size]
            # (B, 1, S, S) True where the pixel is among the first k of its frame's order
            mask = (rank[f] < k[:, None]).view(-1, 1, s, s)
            if source is None:
                images = start[f].masked_fill(mask, 0.0)  # (B, 3, S, S)
            else:
                images = torch.where(mask, source[f], start[f])
            scores[i : i + batch_size] = _scores(model, images, targets[f], batch_size)
        curve = scores.view(n, steps + 1)
        curves[name] = (curve.sum(1) - curve[:, 0] / 2 - curve[:, -1] / 2) / steps
    return curves["insertion"].cpu(), curves["deletion"].cpu()


def stability(maps: torch.Tensor, targets: torch.Tensor) -> dict[str, float | int | None]:
    """Return ``{"pairs", "correlation", "iou"}`` over consecutive frames with the same target.

    ``correlation`` is the mean Pearson correlation of the two maps (pairs where a map is
    constant, so undefined, are left out), ``iou`` the mean IoU of their hottest 10 % of
    pixels (ranked as in :func:`insertion_deletion`); None when there is no pair.
    """
    maps = torch.as_tensor(maps).detach().float().cpu()
    targets = torch.as_tensor(targets).detach().cpu().reshape(-1)
    if maps.dim() != 3 or targets.shape[0] != maps.shape[0]:
        raise ValueError(f"maps must be (N, S, S) and targets (N,), got {tuple(maps.shape)}")
    same = (targets[1:] == targets[:-1]).nonzero().flatten()  # pair i: frames i, i + 1
    if same.numel() == 0:
        return {"pairs": 0, "correlation": None, "iou": None}
    flat = maps.flatten(1).double()
    corr = _correlations(flat[same], flat[same + 1])
    corr = corr[~corr.isnan()]
    hot = max(1, round(HOT_FRACTION * flat.shape[1]))
    ranks = pixel_ranks(maps)
    hot_a, hot_b = ranks[same] < hot, ranks[same + 1] < hot
    iou = (hot_a & hot_b).sum(1).double() / (hot_a | hot_b).sum(1).double()
    return {
        "pairs": int(same.numel()),
        "correlation": float(corr.mean()) if corr.numel() else None,
        "iou": float(iou.mean()),
    }


def map_agreement(maps: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (correlation, relative error), each (N,) float64 on CPU, of maps against reference.

    Both are (N, ...) maps of the same frames; the correlation is Pearson's over each frame's
    pixels (NaN where a map is constant), the error ``|map - ref| / |ref|`` in the L2 norm.
    """
    a = torch.as_tensor(maps).detach().cpu().flatten(1).double()
    b = torch.as_tensor(reference).detach().cpu().flatten(1).double()
    if a.shape != b.shape:
        raise ValueError(f"maps {tuple(a.shape)} and reference {tuple(b.shape)} differ")
    error = (a - b).norm(dim=1) / b.norm(dim=1)
    return _correlations(a, b), error


def _correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the Pearson correlation (P,) of each row pair of a, b (P, D); NaN if undefined."""
    a_c, b_c = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    denom = a_c.norm(dim=1) * b_c.norm(dim=1)
    corr = (a_c * b_c).sum(1) / denom
    return torch.where(denom > 0, corr, torch.full_like(corr, math.nan))


def pixel_ranks(maps: torch.Tensor) -> torch.Tensor:
    """Return (N, S*S) int64: each pixel's place in its map's order, highest value first.

    Ties keep row-major order (a stable sort), so the order is deterministic.
    """
    flat = maps.flatten(1)
    order = flat.sort(dim=1, descending=True, stable=True).indices  # (N, S*S) pixel ids
    ranks = torch.empty_like(order)
    places = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return ranks.scatter_(1, order, places)


def gaussian_blur(
    x: torch.Tensor, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA
) -> torch.Tensor:
    """Return ``x`` (N, C, H, W) blurred by a separable Gaussian, reflect padding."""
    half = (kernel - 1) / 2
    taps = torch.linspace(-half, half, kernel, device=x.device, dtype=x.dtype)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights = weights / weights.sum()
    c = x.shape[1]
    pad = kernel // 2
    out = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, weights.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(out, weights.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


def _unit_scale(maps: torch.Tensor) -> torch.Tensor:
    """Return each map min-max scaled to [0, 1] (N, S, S); a constant map gives zeros."""
    flat = maps.flatten(1)
    low = flat.amin(1)[:, None, None]
    span = flat.amax(1)[:, None, None] - low
    return torch.where(span > 0, (maps - low) / span.clamp(min=1e-30), torch.zeros_like(maps))


def _scores(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Return the softmax probability (B,) of each image's target, in chunks, no grad."""
    out = torch.empty(images.shape[0], device=images.device)
    with model_state(model):
        for i in range(0, images.shape[0], batch_size):
            logits = model(images[i : i + batch_size]).float()  # (b, C)
            probs = logits.softmax(dim=1)
            out[i : i + batch_size] = probs.gather(1, targets[i : i + batch_size, None])[:, 0]
    return out


def _check(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return x, maps, targets as float32/int64 tensors on the model's device, shapes checked."""
    maps = torch.as_tensor(maps)
    targets = torch.as_tensor(targets).reshape(-1)
    if x.dim() != 4 or maps.shape != (x.shape[0], *x.shape[-2:]):
        raise ValueError(
            f"x must be (N, 3, S, S) and maps (N, S, S), got {tuple(x.shape)} and "
            f"{tuple(maps.shape)}"
        )
    if targets.shape[0] != x.shape[0]:
        raise ValueError(f"targets must be (N,) with N={x.shape[0]}, got {tuple(targets.shape)}")
    device = model_device(model, default=x.device)
    x = x.detach().to(device, torch.float32)
    return x, maps.detach().to(x.device, torch.float32), targets.to(x.device, torch.int64)
