"""Temporal reuse (``--fidelity``): masked passes saved against the fidelity of EVERY frame's map.

    python scripts/bench_reuse.py                                  # Lite0 @96, bn2, 3 clips
    python scripts/bench_reuse.py --size 128 --frames 40 --json docs/bench_reuse.json

Clips that move the way video does, built from real photos (scikit-image's): a pan, a zoom, a
fixed camera with a subject walking across, and a pan that cuts to another photo (a class
change). For every frame the exact run
computes every live channel's masked pass (constant channels skipped, as the exact engine
does) and the exact map. Each ``--fidelity`` F then runs the per-stream reuse state
(:class:`scorecam_stream.reuse.StreamState`) over the same frames: it plans which passes to run,
and takes their logits from the exact run's passes of that frame (the same masked inputs; only
the batching differs, ~1e-6), so every F is compared with the exact map on every frame, not
just on its keyframes. Reported per clip and F: masked passes per frame and their ratio to
exact, Pearson correlation with the exact map (mean, worst frame, frames below 0.95), top-10 %
IoU, insertion and deletion AUC of the reuse maps minus the exact maps' (every
``--metric-every``-th frame), and the same for a control: the exact map with random errors in
its channel scores, as far from it as that frame's reuse map (cIns/cDel: the metric's own
noise for maps that close). ``--starts 0 7 19`` also runs each clip joined at those frames
(the controller takes another course: one run's worst frame is luck as much as the rule).
``--check`` reruns one clip end to end through the worker (real passes) to confirm.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

from scorecam_stream.config import EngineConfig, ModelConfig
from scorecam_stream.metrics import insertion_deletion
from scorecam_stream.models import resize_frame
from scorecam_stream.records import FrameTask
from scorecam_stream.reuse import (
    PROBE_GRID,
    FrameView,
    ReuseOptions,
    StreamState,
    correlation,
    maps_of,
)
from scorecam_stream.reuse_view import maps_of_scores, scores_of
from scorecam_stream.weighting import Weighting
from scorecam_stream.workers import LocalExplainer, Worker

W, H = 320, 240


def crop(image: np.ndarray, cx: float, cy: float, zoom: float) -> np.ndarray:
    """Return a W x H view of ``image`` centred at (cx, cy) (fractions), ``zoom`` x closer."""
    h, w = image.shape[:2]
    ch = min(h, w * H / W) / zoom
    cw = ch * W / H
    x0 = int(np.clip(cx * w - cw / 2, 0, w - cw))
    y0 = int(np.clip(cy * h - ch / 2, 0, h - ch))
    view = image[y0 : y0 + int(ch), x0 : x0 + int(cw)]
    return cv2.resize(view, (W, H), interpolation=cv2.INTER_AREA)


def still_camera(background: np.ndarray, subject: np.ndarray, t: np.ndarray) -> list:
    """Return frames of a fixed camera: ``background`` still, ``subject`` walking across.

    ``t`` is the walk's progress (0: left edge, 1: right edge); past 1 the subject walks back.
    """
    scene = crop(background, 0.5, 0.5, 1.0)
    side = H // 3
    patch = cv2.resize(subject, (side, side), interpolation=cv2.INTER_AREA)
    frames = []
    for s in 1 - np.abs(1 - np.asarray(t) % 2):
        frame = scene.copy()
        x0, y0 = int(20 + s * (W - side - 40)), H // 2 - side // 4
        frame[y0 : y0 + side, x0 : x0 + side] = patch
        frames.append(frame)
    return frames


def clips(frames: int) -> dict[str, list[np.ndarray]]:
    """Return the bench's clips: name -> RGB frames (H, W, 3) uint8, ~25 fps motion.

    pan: a camera panning over a photo (its width in ~6 s); zoom: zooming in 1.3x; still: a
    fixed camera, a subject walking across (a third of the frame's height); cut: a pan that
    cuts to another photo half-way (another class).
    """
    astronaut, cat, coffee, rocket = data.astronaut(), data.chelsea(), data.coffee(), data.rocket()
    half = frames // 2
    t = np.linspace(0, 1, frames)
    pace = frames / 150  # the share of the way a ~6 s move covers in this many frames
    return {
        "pan": [crop(astronaut, 0.4 + 0.5 * pace * s, 0.45, 1.6) for s in t],
        "zoom": [crop(cat, 0.45, 0.45, 1.0 + 0.3 * s) for s in t],
        "still": still_camera(coffee, cat, t * pace * 3),
        "cut": [crop(coffee, 0.4 + 0.5 * pace * s, 0.5, 1.3) for s in t[:half]]
        + [crop(rocket, 0.5, 0.3 + 0.5 * pace * s, 1.5) for s in t[half:]],
    }


@dataclass
class Frame:
    x: torch.Tensor  # (S, S, 3) uint8 model input, as the pipeline sends it
    view: FrameView
    targets: torch.Tensor  # (1,)
    logits: torch.Tensor  # (K, C): every channel's masked-pass logits (constant: zero image)
    exact: torch.Tensor  # (S, S) the exact map


def exact_run(worker: Worker, images: list[np.ndarray]) -> tuple[list[Frame], float]:
    """Return every frame's exact passes and map, and the seconds the passes took."""
    out = []
    seconds = 0.0
    weighting = worker.engine.weighting
    for i, image in enumerate(images):
        x = torch.from_numpy(resize_frame(image, worker.loaded.meta.input_size, "squash"))
        targets, _, view = worker.view(i, x, None, 1)
        live = view.live.nonzero().flatten()
        began = time.perf_counter()
        fresh = worker.channel_logits(i, x, live)
        seconds += time.perf_counter() - began
        logits = view.zero_logits.expand(len(view.live), -1).clone()
        logits[live] = fresh
        out.append(Frame(x, view, targets, logits, maps_of(weighting, view, logits, targets)[0]))
    return out, seconds


def iou_top(a: torch.Tensor, b: torch.Tensor, share: float = 0.1) -> float:
    """Return the IoU of the top ``share`` pixels of two maps."""
    k = max(1, int(a.numel() * share))
    ta = set(a.flatten().topk(k).indices.tolist())
    tb = set(b.flatten().topk(k).indices.tolist())
    return len(ta & tb) / len(ta | tb)


def control_map(weighting: Weighting, f: Frame, corr: float, seed: int) -> torch.Tensor:
    """Return the exact map of ``f`` with random errors in its channel scores, as far from it.

    Every live channel's score gets Gaussian noise, scaled (by bisection) so that the map's
    correlation with the exact one is ``corr``: what insertion and deletion do with a map that
    is off by as much as a reuse map, but by chance. Their spread is the metric's own noise.
    """
    scores = scores_of(weighting, f.view, f.logits, f.targets)
    noise = torch.randn(scores.shape, generator=torch.Generator().manual_seed(seed))
    noise = noise * f.view.live[:, None] * scores.std()
    low, high = 0.0, 64.0
    for _ in range(30):
        scale = (low + high) / 2
        noisy = maps_of_scores(weighting, f.view, scores + scale * noise)[0]
        low, high = (scale, high) if correlation(f.exact, noisy) > corr else (low, scale)
    return maps_of_scores(weighting, f.view, scores + low * noise)[0]


def reuse_run(
    worker: Worker, frames: list[Frame], fidelity: float, every: int, starts: list[int]
) -> dict:
    """Return the figures of the reuse state at ``fidelity`` over the exact run's frames.

    One stream per start frame in ``starts`` (a clip joined later: the controller and the
    cache take another course), the figures over all of them.
    """
    passes = exact_passes = keyframes = 0
    corr, iou, ins, dele, c_ins, c_dele = [], [], [], [], [], []
    for start in starts:
        state = StreamState(worker.engine.weighting, ReuseOptions(fidelity=fidelity))
        for i, f in enumerate(frames[start:]):
            plan = state.plan(f.view, f.targets)
            while plan.channels.numel():
                state.absorb(plan, f.logits[plan.channels])
            outcome = state.finish(plan)
            passes += outcome.passes
            exact_passes += outcome.passes + outcome.reused
            keyframes += outcome.keyframe
            reused_map = outcome.maps[0]
            corr.append(correlation(f.exact, reused_map))
            iou.append(iou_top(f.exact, reused_map))
            if i % every == 0:
                x = worker.model_input(f.x[None])
                control = control_map(worker.engine.weighting, f, corr[-1], seed=start + i)
                maps = torch.stack([f.exact, reused_map, control]).to(x.device)
                model = worker.loaded.model
                target = f.targets[:1].expand(3).to(x.device)
                i_auc, d_auc = insertion_deletion(model, x.expand(3, -1, -1, -1), maps, target)
                ins.append(float(i_auc[1] - i_auc[0]))
                dele.append(float(d_auc[1] - d_auc[0]))
                c_ins.append(float(i_auc[2] - i_auc[0]))
                c_dele.append(float(d_auc[2] - d_auc[0]))
    return {
        "fidelity": fidelity,
        "starts": starts,
        "frames": len(corr),
        "passes_per_frame": passes / len(corr),
        "exact_per_frame": exact_passes / len(corr),
        "fewer_passes": exact_passes / max(passes, 1),
        "keyframes": keyframes,
        "corr_mean": float(np.mean(corr)),
        "corr_min": float(np.min(corr)),
        "below_095": int(np.sum(np.array(corr) < 0.95)),
        "iou10_mean": float(np.mean(iou)),
        "insertion_diff_mean": float(np.mean(ins)),
        "insertion_diff_max_abs": float(np.max(np.abs(ins))),
        "deletion_diff_mean": float(np.mean(dele)),
        "deletion_diff_max_abs": float(np.max(np.abs(dele))),
        "control_insertion_diff_mean": float(np.mean(c_ins)),
        "control_deletion_diff_mean": float(np.mean(c_dele)),
        "metric_frames": len(ins),
    }


def check_end_to_end(worker: Worker, images: list[np.ndarray], fidelity: float) -> dict:
    """Return passes and correlation of a real reuse run (the worker runs the passes)."""
    size = worker.loaded.meta.input_size
    xs = [torch.from_numpy(resize_frame(im, size, "squash")) for im in images]
    explainer = LocalExplainer(worker)
    items = [(i, FrameTask(i, x)) for i, x in enumerate(xs)]
    began = time.perf_counter()
    exact = [r for _, r in explainer.explain(items)]
    t_exact = time.perf_counter() - began
    began = time.perf_counter()
    reused = [r for _, r in explainer.explain(items, ReuseOptions(fidelity=fidelity))]
    t_reuse = time.perf_counter() - began
    corr = [
        correlation(torch.from_numpy(a.maps[0]), torch.from_numpy(b.maps[0]))
        for a, b in zip(exact, reused, strict=True)
    ]
    return {
        "fidelity": fidelity,
        "exact_seconds_per_frame": t_exact / len(xs),
        "reuse_seconds_per_frame": t_reuse / len(xs),
        "passes_exact": sum(r.passes for r in exact) / len(xs),
        "passes_reuse": sum(r.passes for r in reused) / len(xs),
        "corr_mean": float(np.mean(corr)),
        "corr_min": float(np.min(corr)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--layer", default="bn2")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--fidelity", type=float, nargs="+", default=[1.0, 0.99, 0.98, 0.95])
    parser.add_argument("--metric-every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--check", action="store_true", help="one clip end to end at 0.99")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--clips", nargs="+", default=["pan", "zoom", "still", "cut"])
    parser.add_argument(
        "--starts",
        type=int,
        nargs="+",
        default=[0],
        help="run each clip from these frames too (one stream each; figures over all)",
    )
    parser.add_argument(
        "--cache", help="keep each clip's exact run here and reuse it (tuning the reuse rule)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ModelConfig(spec="efficientnet_lite0", input_size=args.size, layer=args.layer)
    worker = Worker(model, EngineConfig(batch_size=64))
    rows = []
    print(
        f"EfficientNet-Lite0 @{args.size}, layer {args.layer}, {args.frames} frames per clip, "
        f"streams from frames {args.starts}"
    )
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    header = (
        f"{'clip':6} {'F':>5} {'passes/fr':>9} {'fewer':>6} {'keyfr':>5} {'r mean':>7} "
        f"{'r min':>7} {'<0.95':>5} {'IoU10':>6} {'dIns':>7} {'dDel':>7} {'cIns':>7} {'cDel':>7}"
    )
    print(header)
    for name, images in clips(args.frames).items():
        if name not in args.clips:
            continue
        cached = None
        if args.cache:
            key = f"{name}-{args.size}-{args.layer}-{args.frames}-g{PROBE_GRID}.pt"
            cached = Path(args.cache) / key
        if cached is not None and cached.exists():
            frames, seconds = torch.load(cached, weights_only=False)
        else:
            frames, seconds = exact_run(worker, images)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save((frames, seconds), cached)
        for fidelity in args.fidelity:
            if fidelity >= 1:
                row = {
                    "fidelity": 1.0,
                    "passes_per_frame": float(np.mean([int(f.view.live.sum()) for f in frames])),
                    "fewer_passes": 1.0,
                    "keyframes": len(frames),
                    "corr_mean": 1.0,
                    "corr_min": 1.0,
                    "below_095": 0,
                    "iou10_mean": 1.0,
                    "insertion_diff_mean": 0.0,
                    "deletion_diff_mean": 0.0,
                    "control_insertion_diff_mean": 0.0,
                    "control_deletion_diff_mean": 0.0,
                    "exact_seconds_per_frame": seconds / len(frames),
                }
            else:
                row = reuse_run(worker, frames, fidelity, args.metric_every, args.starts)
            row["clip"] = name
            rows.append(row)
            print(
                f"{name:6} {row['fidelity']:5.2f} {row['passes_per_frame']:9.1f} "
                f"{row['fewer_passes']:5.2f}x {row['keyframes']:5d} {row['corr_mean']:7.4f} "
                f"{row['corr_min']:7.4f} {row['below_095']:5d} {row['iou10_mean']:6.3f} "
                f"{row['insertion_diff_mean']:+7.4f} {row['deletion_diff_mean']:+7.4f} "
                f"{row['control_insertion_diff_mean']:+7.4f} "
                f"{row['control_deletion_diff_mean']:+7.4f}",
                flush=True,
            )
    if args.check:
        images = clips(args.frames)["pan"]
        check = check_end_to_end(worker, images, 0.99)
        print("end to end, pan, F=0.99:", json.dumps(check))
        rows.append({"clip": "pan (end to end)", **check})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"size": args.size, "layer": args.layer, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
