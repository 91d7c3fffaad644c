"""Sections c (end to end) and d (Ray) of scripts/gpu_check.py, which runs them.

Kept apart so that PyAV (the pipeline's video module) and Ray are imported only when these
sections run.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from make_sample_video import make_sample_video  # PyAV
from skimage import data

from scorecam_stream import pipeline, video
from scorecam_stream.cli import parse_config
from scorecam_stream.models import resize_frame
from scorecam_stream.records import FrameTask
from scorecam_stream.workers import Explainer, LocalExplainer, Worker

Row = dict[str, object]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BusySampler:
    """Samples the GPU's utilization (% of time a kernel ran) with nvidia-smi while it is open."""

    def __init__(self, device: torch.device) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        if device.type != "cuda":
            return
        command = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        if uuid is not None:
            command += ["-i", f"GPU-{uuid}"]
        try:
            self._proc = subprocess.Popen(
                [*command, "-lms", "100"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:  # no nvidia-smi: no busy figure
            return
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(float(line.strip()) / 100)

    def close(self) -> float | None:
        """Stop sampling; return the mean busy fraction (None: not measured)."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._thread.join(timeout=10)
        return float(np.mean(self.samples)) if self.samples else None


@dataclass
class Clip:
    """The generated clip and the settings every run of c and d shares."""

    path: Path
    workdir: Path
    args: list[str]  # scorecam-video options, without input and output


def make_clip(plan: Any, device: torch.device, weights: Path) -> Clip:
    """Return the generated clip (the plan's size, with a tone) and the run's options."""
    workdir = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    clip = workdir / "clip.mp4"
    make_sample_video(clip, seconds=plan.clip_frames / 25, fps=25, size=plan.clip_size)
    args = [
        "--model",
        plan.arch if plan.arch == "vgg16" else f"torchvision:{plan.arch}",
        "--layer",
        plan.layer,
        "--weights",
        str(weights),
        "--input-size",
        str(plan.size),
        "--device",
        device.type,
        "--dtype",
        "bf16",
        "--batch-size",
        str(plan.compile_batch),
        "--overwrite",
        "--quiet",
    ]
    return Clip(clip, workdir, args)


def run_in_process(
    clip: Clip,
    name: str,
    extra: list[str],
    make_explainer: Callable[[Any], Explainer],
    device: torch.device,
) -> tuple[Row, Path]:
    """Return (row, maps file) of a pipeline run with a warmed-up explainer, and GPU busy."""
    maps = clip.workdir / f"{name}.npz"
    argv = [str(clip.path), "-o", str(clip.workdir / f"{name}.mp4"), "--save-maps", str(maps)]
    config = parse_config([*argv, *clip.args, *extra])
    explainer = make_explainer(config)
    size = explainer.meta.input_size
    warm = torch.from_numpy(resize_frame(data.chelsea(), size))
    list(explainer.explain([(None, FrameTask(-1 - i, warm)) for i in range(4)]))  # warm-up
    sync(device)
    busy = BusySampler(device)
    try:
        summary = pipeline.run(config, explainer=explainer)
    finally:
        fraction = busy.close()
        explainer.close()
    return {"frames_per_s": summary.frames / summary.seconds, "gpu_busy": fraction}, maps


def section_end_to_end(plan: Any, device: torch.device, state: dict, weights: Path) -> list[Row]:
    """Rows: the command's wall rate, the warmed-up pipeline's rate and GPU busy, the engine's."""
    clip = state["clip"] = make_clip(plan, device, weights)
    rows: list[Row] = []
    # 1. the command as a user runs it (the wall time includes start-up and model loading)
    out = clip.workdir / "cli.mp4"
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "scorecam_stream.cli", str(clip.path), "-o", str(out), *clip.args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"scorecam-video exited {done.returncode}: {done.stderr.strip()[-500:]}")
    rows.append(
        {"run": "scorecam-video (wall, with start-up)", "frames_per_s": plan.clip_frames / wall}
    )
    # 2. the same run in this process, worker warmed up: the steady rate, and how busy the GPU was
    workers: list[Worker] = []

    def local(config):
        workers.append(Worker(config.model, config.engine))
        return LocalExplainer(workers[-1], config.explain.topk)

    row, maps = run_in_process(clip, "single", [], local, device)
    state["single_maps"] = maps
    rows.append({"run": "end to end, single process", **row})
    # 3. the engine alone on the same frames (decoded and resized beforehand)
    worker = workers[0]
    tasks = [
        FrameTask(f.index, torch.from_numpy(resize_frame(f.image, plan.size)))
        for f in video.read_frames(str(clip.path))
    ]
    sync(device)
    began = time.perf_counter()
    for task in tasks:
        worker.explain(task)
    sync(device)
    engine_rate = len(tasks) / (time.perf_counter() - began)
    rows.append({"run": "engine only, same frames", "frames_per_s": engine_rate})
    rows[1]["vs_engine"] = rows[1]["frames_per_s"] / engine_rate
    # 4. the output's encoder: libx264 at the live preset against NVENC (--encoder h264_nvenc)
    rows += [encoder_row(name, plan.clip_size, clip.workdir) for name in ("libx264", "h264_nvenc")]
    return rows


def encoder_row(name: str, size: tuple[int, int], workdir: Path, frames: int = 100) -> Row:
    """Row: the frames per second ``--encoder name`` writes at ``size`` and the encoder used."""
    width, height = size
    photo = cv2.resize(data.chelsea(), (width + frames, height))
    writer = video.VideoWriter(
        str(workdir / f"{name}.mp4"),
        width,
        height,
        Fraction(1, 25),
        25,
        encoder=name,
        realtime=True,
    )
    began = time.perf_counter()
    for i in range(frames):  # a pan: every frame differs
        writer.write(np.ascontiguousarray(photo[:, i : i + width]), i, Fraction(1, 25))
    writer.close()
    rate = frames / (time.perf_counter() - began)
    return {
        "run": f"write {width}x{height}, --encoder {name}",
        "used": writer.encoder,
        "frames_per_s": rate,
    }


# ---------------------------------------------------------------------- d. Ray


def section_ray(plan: Any, device: torch.device, state: dict, weights: Path) -> list[Row]:
    """Rows: frames/s of --gpus 1 and --gpus 1 --workers-per-gpu 2, maps vs the single process."""
    import ray  # imported only here

    from scorecam_stream.distributed import RayExplainer

    clip = state.get("clip") or make_clip(plan, device, weights)
    single = np.load(state["single_maps"])["maps"] if "single_maps" in state else None
    gpu = device.type == "cuda"
    runs = [["--gpus", "1"], ["--gpus", "1", "--workers-per-gpu", "2"]]
    if not gpu:  # the smoke test: CPU workers stand in for the GPU ones
        runs = [["--workers", "1"], ["--workers", "2"]]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    rows: list[Row] = []
    try:
        for extra in runs:

            def make(config):
                return RayExplainer(
                    config.model, config.engine, config.distributed, config.explain.topk
                )

            name = "ray" + "".join(extra).replace("-", "_")
            row, maps = run_in_process(clip, name, extra, make, device)
            if single is not None:
                ours = np.load(maps)["maps"]
                row["maps_rel_error_vs_single"] = float(
                    np.linalg.norm(ours - single) / max(np.linalg.norm(single), 1e-12)
                )
            rows.append({"run": " ".join(extra), **row})
    finally:
        ray.shutdown()
    return rows
