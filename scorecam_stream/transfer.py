"""Host <-> device copies: pinned and non-blocking to and from CUDA; frames normalised there.

Used by the engine (model inputs in, results out) and the worker (uint8 frames in). Plain
``.to(device)`` from pageable memory blocks the host until the copy is done; from pinned memory
it is queued behind the GPU's work, so the host goes on preparing the next chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Return ``t`` on ``device``; host -> CUDA goes through pinned memory without blocking."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_host(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Return ``tensors`` copied to the CPU: CUDA ones into pinned memory, one sync for all."""
    out: list[torch.Tensor | None] = []
    devices = set()
    for t in tensors:
        if t is None or t.device.type != "cuda":
            out.append(None if t is None else t.cpu())
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.append(host.copy_(t, non_blocking=True))
        devices.add(t.device)
    for device in devices:  # the copies were queued on the current streams: wait once
        torch.cuda.current_stream(device).synchronize()
    return out


def normalize_on_device(
    frames: torch.Tensor,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: torch.device | str,
) -> torch.Tensor:
    """Return the model input (N, 3, S, S) float32 on ``device`` of resized uint8 frames.

    ``frames`` is (N, S, S, 3) or (S, S, 3) uint8, as ``models.resize_frame`` gives them: a
    quarter of the bytes of the float input travel (host -> GPU, driver -> worker), and the
    float maths runs on the device in the same order as ``models.preprocess_frame``'s, so on
    the CPU the two agree to the bit.
    """
    if frames.dtype != torch.uint8 or frames.shape[-1] != 3 or frames.dim() not in (3, 4):
        raise ValueError(
            f"expected uint8 frames (N, S, S, 3), got {frames.dtype} {tuple(frames.shape)}"
        )
    x = to_device(frames if frames.dim() == 4 else frames[None], device)
    x = x.to(torch.float32) * (1.0 / 255.0)  # (N, S, S, 3)
    x -= torch.tensor(mean, dtype=torch.float32, device=x.device)
    x /= torch.tensor(std, dtype=torch.float32, device=x.device)
    return x.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
