"""Batch benchmark: N short clips as N single runs vs one batch run, with the same Ray workers.

    python scripts/bench_batch.py                          # 6 clips x 8 frames, 2 CPU workers
    python scripts/bench_batch.py --clips 12 --frames 16 --workers 4 --out bench.json
    python scripts/bench_batch.py --config configs/vgg16-gpu.yaml --gpus 4

Rows, each a real ``scorecam-video`` process (so Ray start-up, model loads, decoding and
encoding are all in the wall time, as a user sees them):
a. one single-input run per clip, one after the other, each with ``--workers N``;
b. one batch run of every clip with ``--workers N --shards-per-frame 1`` (the workers start
   once; whole frames per worker, the batch's default when videos >= workers);
c. the same batch with ``--shards-per-frame N`` (each frame's channels split over the N
   workers, the single run's default);
d. the batch of row b with ``--video-tasks`` (each video's decode/encode loop a Ray task).
The clips are synthetic (a gradient with a moving block and a still photo patch, 320 x 240,
12 fps, no audio), each a little different. ``--max-inflight-videos`` is passed to the batch
rows when given (default: the command's own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
W, H, FPS = 320, 240, 12


def make_clip(path: Path, frames: int, seed: int) -> None:
    """Write a synthetic H.264 clip of ``frames`` frames; ``seed`` moves its content."""
    y, x = np.mgrid[0:H, 0:W]
    base = np.stack([x * 255 // W, y * 255 // H, np.full_like(x, 40 + 20 * seed)], axis=-1)
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264", rate=FPS, width=W, height=H)
        stream.options = {"crf": "18"}
        for i in range(frames):
            image = base.copy()
            left = (seed * 37 + i * 9) % (W - 64)
            image[H // 3 : H // 3 + 64, left : left + 64] = (230, 200 - 10 * seed, 60)
            frame = av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))


def timed(command: list[str]) -> float:
    """Return the wall time of ``command`` (which must succeed)."""
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--frames", type=int, default=8, help="frames per clip")
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu-demo.yaml"))
    parser.add_argument("--input-size", type=int, default=96, help="model input side")
    parser.add_argument("--workers", type=int, default=2, help="CPU Ray workers")
    parser.add_argument("--gpus", type=int, default=0, help="GPU Ray workers instead")
    parser.add_argument("--max-inflight-videos", type=int, help="for the batch rows")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_batch-"))
    clips = []
    for i in range(args.clips):
        clip = workdir / f"clip{i:02d}.mp4"
        make_clip(clip, args.frames, i)
        clips.append(str(clip))
    command = [sys.executable, "-m", "scorecam_stream.cli", "--config", args.config, "--quiet"]
    command += ["--input-size", str(args.input_size)]
    command += ["--gpus", str(args.gpus)] if args.gpus else ["--workers", str(args.workers)]
    batch = ["--max-inflight-videos", str(args.max_inflight_videos)]
    batch = batch if args.max_inflight_videos else []
    load_before = os.getloadavg()

    def fresh(name: str) -> Path:
        out = workdir / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        return out

    rows: dict[str, float] = {}
    out = fresh("single")
    rows["a. single runs, one after the other"] = sum(
        timed([*command, clip, "-o", str(out / Path(clip).name)]) for clip in clips
    )
    n = str(args.gpus or args.workers)
    rows["b. one batch run, --shards-per-frame 1"] = timed(
        [*command, *clips, "-o", f"{fresh('whole')}/", "--shards-per-frame", "1", *batch]
    )
    rows[f"c. one batch run, --shards-per-frame {n}"] = timed(
        [*command, *clips, "-o", f"{fresh('split')}/", "--shards-per-frame", n, *batch]
    )
    rows["d. row b with --video-tasks"] = timed(
        [
            *command,
            *clips,
            "-o",
            f"{fresh('tasks')}/",
            "--shards-per-frame",
            "1",
            "--video-tasks",
            *batch,
        ]
    )
    load_after = os.getloadavg()

    frames = args.clips * args.frames
    workers = f"{args.gpus} GPU" if args.gpus else f"{args.workers} CPU"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}"
        f"; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    print(
        f"{args.clips} clips x {args.frames} frames ({W}x{H}), {args.config}, input "
        f"{args.input_size}, {workers} workers"
        + (f", --max-inflight-videos {args.max_inflight_videos}" if batch else "")
    )
    print(f"{'run':42s} {'wall s':>8s} {'frames/s':>9s}")
    for label, seconds in rows.items():
        print(f"{label:42s} {seconds:8.1f} {frames / seconds:9.3f}")
    if args.out:
        result = {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_before": load_before[0],
            "load_after": load_after[0],
            "clips": args.clips,
            "frames_per_clip": args.frames,
            "config": args.config,
            "input_size": args.input_size,
            "workers": workers,
            "max_inflight_videos": args.max_inflight_videos,
            "rows": [
                {"run": label, "seconds": seconds, "frames_per_s": frames / seconds}
                for label, seconds in rows.items()
            ],
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
