"""Ray scaling benchmark: end-to-end frames/s in-process, with 1 Ray worker and with N, one run.

    python scripts/bench_scaling.py                        # CPU: 1 thread per worker, 2 workers
    python scripts/bench_scaling.py clip.mp4 --frames 16 --workers 4
    python scripts/bench_scaling.py --config configs/vgg16-gpu.yaml --gpus 4

Every row runs the whole pipeline (decode, explain, render, encode with audio) on the same clip
and frames. Workers are started and warmed up (model loaded, a frame explained) before the clock
starts: the figures are steady-state throughput, not start-up. On CPU the single-process run and
every Ray worker get the same torch thread count (``--threads``, default 1), so the rows compare
like with like; a last row gives the single process all the machine's cores, the default a user
gets without Ray. With ``--gpus N`` the rows are the single process on cuda:0, 1 GPU worker and
N GPU workers, and the per-GPU efficiency is reported.

Targets (2-core CPU machine): Ray overhead with 1 worker <= 10%; 2 workers >= 1.8x one worker.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch
from make_sample_video import make_sample_video  # scripts/ is on sys.path

from scorecam_stream import pipeline, video
from scorecam_stream.cli import parse_config
from scorecam_stream.config import Config
from scorecam_stream.distributed import RayExplainer
from scorecam_stream.records import FrameTask
from scorecam_stream.workers import Explainer, LocalExplainer, Worker

REPO = Path(__file__).resolve().parents[1]


def warm_up(explainer: Explainer, config: Config, worker: Worker, count: int) -> None:
    """Explain the first ``count`` frames (not timed): every worker loads and caches its state."""
    frames = video.read_frames(config.input, max_frames=count)
    items = [(None, FrameTask(f.index, worker.loaded.preprocess(f.image))) for f in frames]
    for _ in explainer.explain(items):
        pass


def timed(config: Config, make: Callable[[], Explainer], worker: Worker, warm: int) -> float:
    """Return the end-to-end frames/s of one pipeline run with the explainer ``make`` builds."""
    explainer = make()
    try:
        warm_up(explainer, config, worker, warm)
        began = time.perf_counter()
        summary = pipeline.run(config, explainer=explainer)  # lent: closed below, not timed
        return summary.frames / (time.perf_counter() - began)
    finally:
        explainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", nargs="?", help="input video (default: a new sample clip)")
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu-demo.yaml"))
    parser.add_argument("--frames", type=int, default=8, help="frames per run")
    parser.add_argument("--workers", type=int, default=2, help="CPU workers of the last Ray row")
    parser.add_argument("--gpus", type=int, default=0, help="GPU workers instead (GPU machines)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU worker")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_scaling-"))
    clip = args.clip
    if clip is None:
        clip = str(workdir / "sample.mp4")
        make_sample_video(Path(clip))  # 4 s, 320 x 240, 12 fps, with a tone
    flags = [clip, "--config", args.config, "--max-frames", str(args.frames)]
    flags += ["-o", str(workdir / "out.mp4"), "--overwrite", "--quiet"]
    if args.gpus:
        flags += ["--device", "cuda"]
    config = parse_config(flags)
    worker = Worker(config.model, config.engine)  # for preprocessing, and the in-process row
    n = args.gpus or args.workers
    cpus = os.cpu_count() or 1
    print(
        f"machine: {platform.machine()}, {cpus} cpus, torch {torch.__version__}, "
        f"ray {ray.__version__}"
        + (f", {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}" if args.gpus else "")
    )
    print(
        f"clip {clip}, {args.frames} frames, model {config.model.spec} layer "
        f"{worker.loaded.layer_name} input {worker.loaded.input_size}, batch "
        f"{config.engine.batch_size}, max channels {config.engine.max_channels}"
    )

    def ray_explainer(workers: int) -> Callable[[], Explainer]:
        if args.gpus:
            dist = dataclasses.replace(config.distributed, gpus=workers)
        else:
            dist = dataclasses.replace(
                config.distributed, workers=workers, threads_per_worker=args.threads
            )
        return lambda: RayExplainer(config.model, config.engine, dist, config.explain.topk)

    def local() -> Explainer:
        return LocalExplainer(worker, config.explain.topk)

    ray.init(
        address="local",
        num_cpus=max(cpus, n),
        num_gpus=args.gpus or 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    threads = torch.get_num_threads()
    rows: list[tuple[str, float]] = []
    try:
        if not args.gpus:
            torch.set_num_threads(args.threads)
        label = "single process, cuda:0" if args.gpus else f"single process, {args.threads} thr"
        rows.append((label, timed(config, local, worker, warm=2)))
        unit = "GPU" if args.gpus else f"worker x {args.threads} thr"
        rows.append((f"Ray, 1 {unit}", timed(config, ray_explainer(1), worker, warm=2)))
        rows.append((f"Ray, {n} {unit}", timed(config, ray_explainer(n), worker, warm=2 * n)))
        if not args.gpus and threads != args.threads:
            torch.set_num_threads(threads)
            rows.append((f"single process, {threads} thr", timed(config, local, worker, warm=2)))
    finally:
        ray.shutdown()

    for label, rate in rows:
        print(f"{label:32s} {rate:7.3f} frames/s")
    single, one, many = rows[0][1], rows[1][1], rows[2][1]
    print(f"Ray overhead, 1 worker          {1 - one / single:7.1%}  (target <= 10%)")
    print(f"speed-up, {n} workers vs 1        {many / one:7.2f}x  (target >= {0.9 * n:.1f}x)")
    if args.gpus:
        print(f"per-GPU efficiency, {n} GPUs     {many / (n * one):7.1%}")


if __name__ == "__main__":
    main()
