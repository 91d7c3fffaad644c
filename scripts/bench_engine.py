"""Engine benchmark: raw forward rate vs masked-pass rate, and per-frame time vs pytorch-grad-cam.

All figures in one run, on the same frames, model, layer, batch size and thread count:

    python scripts/bench_engine.py                     # efficientnet_lite0 @160, layer bn2
    python scripts/bench_engine.py --size 224 --frames 4 --threads 2

efficiency = (masked passes the engine ran per second) / (raw forward images per second, in the
same memory format, measured just before and after): how much of the model's raw speed the
engine keeps (masking, upsampling, bookkeeping cost). Figures of the fastest of --repeat rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam draws a tqdm bar per frame

import numpy as np
import torch

from scorecam_stream import ScoreCAM, load_model


def sample_frames(count: int) -> list[np.ndarray]:
    """Return ``count`` real photo crops (scikit-image's chelsea and coffee)."""
    from skimage import data

    photos = [data.chelsea(), data.coffee()]
    frames = []
    for i in range(count):
        photo = photos[i % 2]
        h, w = photo.shape[:2]
        dy, dx = (i * 13) % (h // 4), (i * 29) % (w // 4)
        frames.append(np.ascontiguousarray(photo[dy : dy + 3 * h // 4, dx : dx + 3 * w // 4]))
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layer", default=None)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=8, help="raw forward batches timed")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--skip-grad-cam", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, layer=args.layer, input_size=args.size)
    model, layer = loaded.model, loaded.layer
    x = loaded.preprocess_batch(sample_frames(args.frames))  # (N, 3, S, S)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}, threads {args.threads}"
    )
    print(
        f"model {args.model} layer {loaded.layer_name} input {args.size} "
        f"frames {args.frames} batch {args.batch_size}"
    )

    # Raw forward: batches of batch_size model inputs, no hooks, no masking.
    batch = x.repeat((args.batch_size + len(x) - 1) // len(x), 1, 1, 1)[: args.batch_size]

    def raw_rate(channels_last: bool) -> float:
        """Return raw forward images/s, model and input in the given memory format."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        inputs = batch.contiguous(memory_format=fmt)
        with torch.inference_mode():
            model(inputs)  # warm-up
            start = time.perf_counter()
            for _ in range(args.rounds):
                model(inputs)
            seconds = time.perf_counter() - start
        model.to(memory_format=torch.contiguous_format)  # the engine converts if asked
        return args.rounds * args.batch_size / seconds

    variants = {
        "article, defaults (channels_last on CPU)": {},
        "article, channels_last off": dict(channels_last=False),
        "variant pytorch-grad-cam, defaults": dict(variant="pytorch-grad-cam"),
    }
    engines = {
        title: ScoreCAM(model, layer, batch_size=args.batch_size, **options)
        for title, options in variants.items()
    }
    for engine in engines.values():
        engine(x[:1])  # warm-up, and the zero image's score is cached
    with torch.inference_mode():
        targets = model(x).argmax(1).tolist()
    cam = None
    if not args.skip_grad_cam:
        from pytorch_grad_cam import ScoreCAM as GradCamScoreCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = GradCamScoreCAM(model=model, target_layers=[layer])  # its defaults: batch 16
        cam(input_tensor=x[:1], targets=[ClassifierOutputTarget(targets[0])])  # warm-up

    # On a shared machine the load drifts: every ratio is taken between runs made one right
    # after the other (raw forwards just before and after each engine run; pytorch-grad-cam
    # right after ours), and each figure is the best of --repeat rounds.
    best: dict[str, dict[str, float]] = {title: {} for title in engines}
    theirs = float("inf")
    masked = {}
    for _ in range(args.repeat):
        for title, engine in engines.items():
            before = raw_rate(engine.channels_last)
            start = time.perf_counter()
            result = engine(x)
            seconds = time.perf_counter() - start
            after = raw_rate(engine.channels_last)
            kc = engine.base(x[:1]).num_channels
            masked[title] = (len(x) * kc - int(result.skipped.sum()), len(x) * kc)
            rate = masked[title][0] / seconds
            if seconds / len(x) < best[title].get("seconds", float("inf")):
                # the fastest round's figures, its efficiency against its own raw forwards
                raw = (before + after) / 2
                best[title] = dict(
                    seconds=seconds / len(x), rate=rate, raw=raw, efficiency=rate / raw
                )
        if cam is not None:
            start = time.perf_counter()
            for i in range(len(x)):
                cam(input_tensor=x[i : i + 1], targets=[ClassifierOutputTarget(targets[i])])
            theirs = min(theirs, (time.perf_counter() - start) / len(x))

    for title, b in best.items():
        run, total = masked[title]
        print(f"engine, {title}:")
        print(f"  masked passes run    {run} of {total} ({total - run} constant channels skipped)")
        print(f"  raw forward          {b['raw']:8.1f} images/s (around the engine's runs)")
        print(f"  masked images/s      {b['rate']:8.1f}   efficiency {b['efficiency']:.2f}")
        print(f"  time per frame       {b['seconds']:8.3f} s")
    if cam is not None:
        print(f"pytorch-grad-cam ScoreCAM (defaults) {theirs:8.3f} s per frame")
        for title, b in best.items():
            print(f"  speed-up of ours, {title}: {theirs / b['seconds']:.2f}x")


if __name__ == "__main__":
    main()
