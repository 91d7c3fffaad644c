"""Faithfulness table of a clip: Score-CAM variants and Grad-CAM, like the article's Tables 1 and 3.

    python scripts/make_sample_video.py cat.mp4
    python scripts/eval_faithfulness.py cat.mp4                  # efficientnet_lite0 @128, bn2
    python scripts/eval_faithfulness.py cat.mp4 --every 2 --frames 24 --target dominant

Every method explains the same frames for the same targets (each frame's top-1 class, or with
``--target dominant`` the clip's most frequent one) at the same layer. Per method: Average Drop
and Increase (x100; lower AD, higher AI is better), insertion (higher is better) and deletion
(lower is better) AUCs, stability of consecutive frames' maps (Pearson r, IoU of the hottest
10 %), and milliseconds per frame for the maps alone (the metric passes are not timed).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from scorecam_stream import ScoreCAM, load_model
from scorecam_stream.gradcam import GradCAM
from scorecam_stream.metrics import average_drop_increase, insertion_deletion, stability
from scorecam_stream.targets import TopCounts
from scorecam_stream.video import read_frames
from scorecam_stream.workers import keep_freed_memory

Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, targets) -> maps


def methods(model: torch.nn.Module, layer: torch.nn.Module, args) -> dict[str, Method]:
    """Return the compared methods by table name, each (x, targets) -> maps (N, S, S)."""

    def engine(**options) -> Method:
        cam = ScoreCAM(model, layer, batch_size=args.batch_size, channels_last=True, **options)
        return lambda x, t: cam(x, t).maps

    grad = GradCAM(model, layer, batch_size=args.batch_size)
    return {
        "Score-CAM (article)": engine(),
        "Score-CAM (pytorch-grad-cam variant)": engine(
            score="logit", channel_softmax=True, combine="raw"
        ),
        f"Faster Score-CAM (max_channels={args.max_channels})": engine(
            max_channels=args.max_channels
        ),
        "Grad-CAM": lambda x, t: grad(x, t).maps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", help="video file (scripts/make_sample_video.py makes one)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layer", default=None)
    parser.add_argument("--size", type=int, default=128, help="model input side")
    parser.add_argument("--every", type=int, default=4, help="take every Nth frame")
    parser.add_argument("--frames", type=int, default=12, help="at most this many frames")
    parser.add_argument("--target", choices=("top1", "dominant"), default="top1")
    parser.add_argument("--steps", type=int, default=28, help="insertion/deletion steps")
    parser.add_argument("--max-channels", type=int, default=128, help="Faster Score-CAM's N")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()

    loaded = load_model(args.model, layer=args.layer, input_size=args.size)
    model = loaded.model
    frames = [f.image for i, f in enumerate(read_frames(args.clip)) if i % args.every == 0]
    x = loaded.preprocess_batch(frames[: args.frames])  # (N, 3, S, S)
    with torch.inference_mode():
        logits = model(x)
    targets = logits.argmax(1)  # (N,) the same targets for every method
    if args.target == "dominant":  # the clip's most frequent top-1 class, in every frame
        counts = TopCounts()
        counts.add(logits)
        targets = torch.full_like(targets, counts.dominant())
    names = sorted({loaded.class_name(int(t)) for t in targets})
    pairs = int((targets[1:] == targets[:-1]).sum())  # stability's consecutive pairs
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"threads {args.threads}"
    )
    print(
        f"clip {args.clip}: {len(x)} frames (every {args.every}th), model {args.model}, layer "
        f"{loaded.layer_name}, input {args.size}, steps {args.steps}; targets: {', '.join(names)}; "
        f"stability over {pairs} pairs of consecutive frames with the same target"
    )
    print()
    print("| method | AD % ↓ | AI % ↑ | insertion ↑ | deletion ↓ | stability r | top-10% IoU "
          "| ms/frame |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, method in methods(model, loaded.layer, args).items():
        method(x[:1], targets[:1])  # warm-up (and Score-CAM's zero-image score is cached)
        began = time.perf_counter()
        maps = method(x, targets)
        ms = (time.perf_counter() - began) * 1000 / len(x)
        drop, increase = average_drop_increase(model, x, maps, targets, args.batch_size)
        ins, dele = insertion_deletion(model, x, maps, targets, args.steps, args.batch_size)
        stable = stability(maps, targets)
        r = "-" if stable["correlation"] is None else f"{stable['correlation']:.3f}"
        iou = "-" if stable["iou"] is None else f"{stable['iou']:.3f}"
        print(
            f"| {name} | {100 * drop.mean():.1f} | {100 * increase.mean():.1f} | "
            f"{ins.mean():.3f} | {dele.mean():.3f} | {r} | {iou} | {ms:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
