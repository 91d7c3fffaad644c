"""Video benchmark: engine-only vs end-to-end frames/s on the same clip, in one run.

    python scripts/bench_video.py                 # makes a sample clip, cpu-demo settings
    python scripts/bench_video.py clip.mp4 --config configs/cpu-demo.yaml --frames 24

engine-only: the frames are decoded and preprocessed beforehand (not timed), then explained one
by one. end-to-end: the whole pipeline (decode, explain, render, encode with audio) with the
same worker. The ratio says how much of the engine's speed the I/O overlap keeps.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from make_sample_video import make_sample_video  # scripts/ is on sys.path

from scorecam_stream import pipeline, video
from scorecam_stream.cli import parse_config
from scorecam_stream.records import FrameTask
from scorecam_stream.workers import LocalExplainer, Worker

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", nargs="?", help="input video (default: a new sample clip)")
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu-demo.yaml"))
    parser.add_argument("--frames", type=int, default=24, help="frames to process")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_video-"))
    clip = args.clip
    if clip is None:
        clip = str(workdir / "sample.mp4")
        make_sample_video(Path(clip))  # 4 s, 320 x 240, 12 fps, with a tone
    out = workdir / "out.mp4"
    config = parse_config(
        [
            clip,
            "--config",
            args.config,
            "--max-frames",
            str(args.frames),
            "-o",
            str(out),
            "--overwrite",
            "--quiet",
        ]
    )
    worker = Worker(config.model, config.engine)
    explainer = LocalExplainer(worker, config.explain.topk)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"clip {clip}, {args.frames} frames, model {config.model.spec} "
        f"layer {worker.loaded.layer_name} input {worker.loaded.input_size}"
    )

    frames = list(video.read_frames(clip, max_frames=args.frames))
    tasks = [FrameTask(f.index, worker.loaded.preprocess(f.image)) for f in frames]
    worker.explain(tasks[0])  # warm-up (and the zero image's score is cached)
    began = time.perf_counter()
    for task in tasks:
        worker.explain(task)
    engine_rate = len(tasks) / (time.perf_counter() - began)
    print(f"engine only    {engine_rate:7.3f} frames/s")

    began = time.perf_counter()
    summary = pipeline.run(config, explainer=explainer)
    e2e_rate = summary.frames / (time.perf_counter() - began)
    print(f"end to end     {e2e_rate:7.3f} frames/s  ({summary.frames} frames written to {out})")
    print(f"ratio          {e2e_rate / engine_rate:7.3f}")


if __name__ == "__main__":
    main()
