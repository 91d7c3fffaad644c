"""Live-stream benchmark: a local 25 fps source, explained live by one process and by Ray workers.

    python scripts/bench_live.py                           # 30 s source, exact and 0.99, 2 workers
    python scripts/bench_live.py --fidelity 1 0.99 0.95 --no-ray   # reuse, in-process only
    python scripts/bench_live.py --streams 2 --fidelity 0.99   # two sources in one run
    python scripts/bench_live.py --seconds 60 --workers 4 --config configs/vgg16-gpu.yaml --gpus

A synthetic clip (the quick start's pan/zoom over a cat photo) is sent as MPEG-TS over UDP to
127.0.0.1 at real-time pace, and ``scorecam-video udp://... --jsonl`` explains it live. Each row
reports, over the steady state (from the first map on; start-up is reported apart):
- explained: the fraction of the source's frames that got their own map;
- maps/s: explained frames per second of source;
- latency p50/p95: from a frame's arrival at the reader to its map being ready;
- output fps: frames written per second of source (a real-time copy writes them all).
Splitting each frame's passes over N workers makes each map ready ~N times sooner: lower
latency and more frames explained. ``--streams N``: N sources explained in one run sharing the
model (or the workers), a row per stream.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from fractions import Fraction
from multiprocessing.synchronize import Event
from pathlib import Path

import av
import numpy as np
import torch
from make_sample_video import pan_zoom_frames  # scripts/ is on sys.path

from scorecam_stream.cli import main as scorecam_video

REPO = Path(__file__).resolve().parents[1]


def free_udp_port() -> int:
    """Return a UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def encode_source(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Encode ``frames`` once as MPEG-TS (H.264, zero latency): a camera's work, done beforehand."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="mpegts") as output:
        stream = output.add_stream(
            "libx264",
            rate=fps,
            width=width,
            height=height,
            options={"tune": "zerolatency", "g": str(fps), "bf": "0", "preset": "veryfast"},
        )
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))


def send(url: str, source: str, seconds: float, ready: Event) -> None:
    """Send the encoded ``source`` to ``url`` in real time, looped for ``seconds``.

    Runs in its own process, as a camera would: only packets are copied, nothing is encoded.
    The loops' timestamps follow on, so the receiver sees one steady stream.
    """
    with av.open(url, "w", format="mpegts") as output:
        ready.set()
        began, offset, loop_span, stream = time.monotonic(), 0, 0, None
        while True:
            with av.open(source) as clip:
                template = clip.streams.video[0]
                stream = stream or output.add_stream_from_template(template)
                for packet in clip.demux(template):
                    if packet.pts is None:  # the demuxer's flush packet
                        continue
                    loop_span = max(loop_span, packet.pts + (packet.duration or 0))
                    at = float((packet.pts + offset) * template.time_base)
                    if at >= seconds:
                        return
                    delay = began + at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    packet.pts += offset
                    packet.dts = None if packet.dts is None else packet.dts + offset
                    packet.stream = stream
                    output.mux(packet)
            offset += loop_span


def run_live(
    source: Path, seconds: float, fps: int, options: list[str], scratch: Path, streams: int = 1
) -> list[dict]:
    """Explain ``streams`` live copies of ``source`` in one run; return each one's figures."""
    urls = [f"udp://127.0.0.1:{free_udp_port()}" for _ in range(streams)]
    spawn = multiprocessing.get_context("spawn")  # a clean process: no torch threads forked
    ready = [spawn.Event() for _ in urls]
    senders = [
        spawn.Process(target=send, args=(url, str(source), seconds, event))
        for url, event in zip(urls, ready, strict=True)
    ]
    if streams == 1:
        jsonls = [scratch / "live.jsonl"]
        outputs = ["-o", str(scratch / "live" / "cam.m3u8"), "--jsonl", str(jsonls[0])]
    else:  # several streams in one run: DIR/<name>.m3u8 and DIR/<name>.jsonl
        names = [f"s{i}" for i in range(streams)]
        jsonls = [scratch / "jsonl" / f"{name}.jsonl" for name in names]
        outputs = ["-o", f"{scratch / 'out'}/", "--jsonl", f"{scratch / 'jsonl'}/"]
        outputs += [flag for name in names for flag in ("--name", name)]
    for sender, event in zip(senders, ready, strict=True):
        sender.start()
        event.wait()  # the sender process is up (it imports this script first)
    with RssSampler() as rss:
        code = scorecam_video([*urls, *outputs, "--overwrite", "--quiet", *options])
    for sender in senders:
        sender.join()
    if code != 0:
        raise SystemExit(f"scorecam-video exited {code} for {options}")
    return [{**_figures(jsonl, seconds, fps), "rss": rss.summary()} for jsonl in jsonls]


class RssSampler:
    """Samples this process's resident memory every few seconds while in a ``with`` block."""

    def __init__(self, every: float = 5.0) -> None:
        self.samples: list[tuple[float, float]] = []  # (seconds since the start, MB)
        self._every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        began, page = time.monotonic(), os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as statm:
                resident = int(statm.read().split()[1]) * page / 2**20
            self.samples.append((time.monotonic() - began, resident))
            if self._stop.wait(self._every):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        """Return RSS at minute 2, then every 5 minutes and at the end; the peak for short runs."""
        late = [(at, mb) for at, mb in self.samples if at >= 120]
        if not late:
            return f"peak {max(mb for _, mb in self.samples):.0f} MB (run under 2 min)"
        marks = [late[0]]
        for minute in range(5, int(late[-1][0] // 60) + 1, 5):
            marks.append(next((at, mb) for at, mb in late if at >= 60 * minute))
        marks.append(late[-1])
        labels = {f"{at / 60:.0f} min": mb for at, mb in marks}  # the end may round onto a mark
        series = ", ".join(f"{label} {mb:.0f}" for label, mb in labels.items())
        return f"MB: {series} (max after 2 min {max(mb for _, mb in late):.0f})"


def _figures(jsonl: Path, seconds: float, fps: int) -> dict:
    """Return one stream's figures from its jsonl records and summary."""
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    records, summary = lines[:-1], lines[-1]["summary"]
    first = records[0]
    steady = records[1:]  # from the first map on: start-up (model load, workers) apart
    span = (records[-1]["pts_seconds"] - first["pts_seconds"]) or float("nan")
    source_frames = records[-1]["index"] - first["index"]
    latencies = np.array([r["latency_ms"] for r in steady]) if steady else np.array([np.nan])
    return {
        "frames_in": summary["frames_in"],
        "frames_written": summary["frames_written"],
        "startup_s": first["index"] / fps + first["latency_ms"] / 1000,  # source start -> map 1
        "explained_fraction": len(steady) / source_frames if source_frames else float("nan"),
        "maps_per_s": len(steady) / span,
        "latency_p50_ms": float(np.percentile(latencies, 50)),
        "latency_p95_ms": float(np.percentile(latencies, 95)),
        "output_fps": summary["frames_written"] / seconds,
        "dropped": summary["frames_dropped"],
        "passes_per_map": summary.get("passes_per_frame"),
        "fidelity_min": summary.get("fidelity_min"),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark rows and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="source length (default 30)")
    parser.add_argument("--fps", type=int, default=25, help="source frame rate (default 25)")
    parser.add_argument("--size", default="320x240", help="source WxH (default 320x240)")
    parser.add_argument("--config", default=str(REPO / "configs" / "cpu-demo.yaml"))
    parser.add_argument("--workers", type=int, default=2, help="Ray workers in the last row")
    parser.add_argument("--gpus", action="store_true", help="the workers are GPU workers")
    parser.add_argument(
        "--fidelity",
        type=float,
        nargs="+",
        default=[1.0, 0.99],
        help="one in-process row per --fidelity (default 1.0 = exact, and 0.99)",
    )
    parser.add_argument("--no-ray", action="store_true", help="in-process rows only")
    parser.add_argument(
        "--streams", type=int, default=1, help="live sources explained together in each run"
    )
    parser.add_argument("--output-size", help="WxH: scale the output (scorecam-video's option)")
    parser.add_argument(
        "--clip-seconds",
        type=float,
        default=30.0,
        help="the source clip's length; it is looped for --seconds (default 30)",
    )
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    clip_frames = round(min(args.seconds, args.clip_seconds) * args.fps)
    base = ["--config", args.config, "--read-timeout", "2"]
    if args.output_size:
        base += ["--output-size", args.output_size]
    rows = {f"1 process, fidelity {f:g}": [*base, "--fidelity", str(f)] for f in args.fidelity}
    if args.no_ray:
        pass
    elif args.gpus:
        rows[f"{args.workers} GPU workers"] = [*base, "--gpus", str(args.workers)]
    else:
        threads = max(1, torch.get_num_threads() // args.workers)
        rows[f"{args.workers} Ray workers x {threads} thread(s)"] = [
            *base,
            "--workers",
            str(args.workers),
            "--threads-per-worker",
            str(threads),
        ]
    print(
        f"# {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; source {args.seconds:g} s at {args.fps} fps, {args.size}; "
        f"{Path(args.config).name}" + (f"; output {args.output_size}" if args.output_size else "")
    )
    print(
        f"{'run':<28} {'startup s':>9} {'explained':>9} {'maps/s':>7} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'out fps':>8} {'dropped':>7} {'passes/map':>10} "
        f"{'min r':>6}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "source.ts"
        encode_source(source, pan_zoom_frames(clip_frames, width, height), args.fps)
        for row, options in rows.items():
            figures = run_live(source, args.seconds, args.fps, options, Path(scratch), args.streams)
            for i, r in enumerate(figures):
                name = row if args.streams == 1 else f"{row}, s{i}"
                print(
                    f"{name:<28} {r['startup_s']:>9.1f} {r['explained_fraction']:>9.1%} "
                    f"{r['maps_per_s']:>7.2f} {r['latency_p50_ms']:>8.0f} "
                    f"{r['latency_p95_ms']:>8.0f} {r['output_fps']:>8.2f} {r['dropped']:>7d} "
                    f"{r['passes_per_map'] or float('nan'):>10.1f} "
                    f"{r['fidelity_min'] if r['fidelity_min'] is not None else float('nan'):>6.3f}"
                    f"  rss {r['rss']}"
                )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
