"""Engine benchmark: raw forward rate vs masked-pass rate, and per-frame time vs pytorch-grad-cam.

All figures in one run, on the same frames, model, layer, batch size and thread count:

    python scripts/bench_engine.py                     # efficientnet_lite0 @160, layer bn2
    python scripts/bench_engine.py --size 224 --frames 4 --threads 2

efficiency = (masked passes the engine ran per second) / (raw forward images per second):
how much of the model's raw speed the engine keeps (masking, upsampling, bookkeeping cost).
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


def timed(fn, repeat: int = 1) -> float:
    """Return the best wall time of ``repeat`` calls of fn (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


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
    raw_rate = {}
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        inputs = batch.contiguous(memory_format=fmt)
        with torch.inference_mode():
            model(inputs)  # warm-up
            seconds = timed(
                lambda inputs=inputs: [model(inputs) for _ in range(args.rounds)],
                repeat=args.repeat,
            )
        raw_rate[channels_last] = args.rounds * args.batch_size / seconds
        print(
            f"raw forward{' (channels_last)' if channels_last else ''}: "
            f"{raw_rate[channels_last]:.1f} images/s"
        )

    variants = {
        "article, contiguous": dict(channels_last=False),
        "article, channels_last": dict(channels_last=True),
        "variant pytorch-grad-cam, channels_last": dict(
            variant="pytorch-grad-cam", channels_last=True
        ),
    }
    ours_per_frame = {}
    for title, options in variants.items():
        model.to(memory_format=torch.contiguous_format)  # the engine converts if asked
        engine = ScoreCAM(model, layer, batch_size=args.batch_size, **options)
        engine(x[:1])  # warm-up, and the zero image's score is cached
        result = None

        def run(engine=engine):
            nonlocal result
            result = engine(x)

        seconds = timed(run, repeat=args.repeat)
        kc = engine.base(x[:1]).num_channels
        masked = len(x) * kc - int(result.skipped.sum())
        rate = masked / seconds
        raw = raw_rate[engine.channels_last]
        ours_per_frame[title] = seconds / len(x)
        print(f"engine, {title}:")
        print(
            f"  masked passes run    {masked} of {len(x) * kc} "
            f"({int(result.skipped.sum())} constant channels skipped)"
        )
        print(f"  masked images/s      {rate:8.1f}   efficiency {rate / raw:.2f}")
        print(f"  time per frame       {seconds / len(x):8.3f} s")

    if args.skip_grad_cam:
        return
    from pytorch_grad_cam import ScoreCAM as GradCamScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with torch.inference_mode():
        targets = model(x).argmax(1).tolist()
    model.to(memory_format=torch.contiguous_format)
    cam = GradCamScoreCAM(model=model, target_layers=[layer])  # its defaults: batch 16

    def frame(i: int) -> None:
        cam(input_tensor=x[i : i + 1], targets=[ClassifierOutputTarget(targets[i])])

    frame(0)  # warm-up
    theirs = timed(lambda: [frame(i) for i in range(len(x))], repeat=args.repeat) / len(x)
    print(f"pytorch-grad-cam ScoreCAM (defaults) {theirs:8.3f} s per frame")
    for title, ours in ours_per_frame.items():
        print(f"  speed-up of ours, {title}: {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()
