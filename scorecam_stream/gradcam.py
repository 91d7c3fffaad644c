"""Grad-CAM (Selvaraju et al., 2017): the gradient baseline the faithfulness metrics compare with.

At the same target layer as Score-CAM: one forward and one backward per batch. The weight of
channel k is the spatial mean of d(target logit)/dA_k; map = ReLU(sum_k w_k A_k), upsampled
bilinearly to the input size. That is pytorch-grad-cam's GradCAM, up to its final min-max
rescaling (maps here are left at their own scale, like Score-CAM's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model_state import forward_hook, model_device, model_state
from .targets import resolve as resolve_targets


@dataclass(frozen=True)
class GradCAMResult:
    """Grad-CAM maps (N, S, S) >= 0, targets (N,) and their softmax probabilities (N,)."""

    maps: torch.Tensor
    targets: torch.Tensor
    probs: torch.Tensor


class GradCAM:
    """Grad-CAM for one model and one target layer; ``cam(x, targets)`` gives a GradCAMResult.

    ``batch_size``: frames per forward/backward.
    """

    def __init__(self, model: nn.Module, layer: nn.Module, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not any(m is layer for m in model.modules()):
            raise ValueError("layer is not a module of model")
        self.model = model
        self.layer = layer
        self.batch_size = batch_size

    def __call__(
        self, x: torch.Tensor, targets: int | Sequence[int] | torch.Tensor | None = None
    ) -> GradCAMResult:
        """Return the Grad-CAM maps of ``x`` (N, 3, S, S) for ``targets`` (None: each top-1)."""
        device = model_device(self.model, default=x.device)
        x = x.detach().to(device, torch.float32)
        n = x.shape[0]
        wanted = None
        if targets is not None:
            wanted = torch.as_tensor(targets, dtype=torch.int64, device=device).reshape(-1)
            wanted = wanted.expand(n) if wanted.numel() == 1 else wanted
            if wanted.shape[0] != n:
                raise ValueError(f"targets must be one class or (N,) with N={n}")
        maps, chosen, probs = [], [], []
        for i in range(0, n, self.batch_size):
            part = None if wanted is None else wanted[i : i + self.batch_size]
            m, t, p = self._batch(x[i : i + self.batch_size], part)
            maps.append(m)
            chosen.append(t)
            probs.append(p)
        return GradCAMResult(torch.cat(maps), torch.cat(chosen), torch.cat(probs))

    def _batch(
        self, x: torch.Tensor, targets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (maps (B, S, S), targets (B,), probs (B,)) of one chunk."""
        captured: list[torch.Tensor] = []

        def keep(_module, _inputs, output):
            captured.append(output)

        # The input asks for gradients so that the layer's output has a graph even when the
        # model's parameters are frozen.
        x = x.clone().requires_grad_(True)
        with model_state(self.model, grad=True), forward_hook(self.layer, keep):
            logits = self.model(x).float()  # (B, C)
            if len(captured) != 1 or captured[0].dim() != 4:
                raise ValueError("target layer must run once with a 4-D output")
            acts = captured[0]  # (B, K, h, w)
            targets = resolve_targets(logits.detach(), targets)[0][:, 0]  # (B,) top-1 if None
            picked = logits.gather(1, targets[:, None])  # (B, 1) target logits
            # Frames are independent in eval mode: one backward of the sum gives every frame's
            # own gradient.
            (grads,) = torch.autograd.grad(picked.sum(), acts)
        weights = grads.float().mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
        cam = (weights * acts.detach().float()).sum(dim=1, keepdim=True).clamp(min=0)
        maps = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        probs = logits.detach().softmax(dim=1).gather(1, targets[:, None])[:, 0]
        return maps[:, 0].detach(), targets.detach(), probs
