"""The ``scorecam-video`` argument parser: every option, its group and its help text.

Options not given stay absent from the parsed namespace, so that a config file fills them
(:mod:`scorecam_stream.cli` merges the two). ``scripts/gen_cli_docs.py`` writes docs/cli.md
from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from . import __version__
from .errors import ScoreCamError

PROG = "scorecam-video"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ScoreCamErrors (exit 2, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise ScoreCamError(message)


def _bool_flag(parser: argparse._ActionsContainer, name: str, help_text: str) -> None:
    parser.add_argument(
        f"--{name}",
        dest=name.replace("-", "_"),
        action=argparse.BooleanOptionalAction,
        help=help_text,
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; options not given stay absent (config files fill them)."""
    p = _Parser(
        prog=PROG,
        argument_default=argparse.SUPPRESS,
        description="Score-CAM heatmaps over every frame of a video (or an image).",
    )
    p.add_argument(
        "input",
        nargs="*",
        help="video file, stream URL (udp/srt/rtsp/rtmp/http...), - for stdin, or image; "
        "several files, directories (their videos) or glob patterns for a batch",
    )
    p.add_argument(
        "-o",
        "--output",
        help="output file, DIR/name.m3u8 (HLS), udp://, srt://, tcp://, rtmp:// or - "
        "(default: <input>.scorecam.mp4 beside it); with several inputs a directory (DIR/)",
    )
    p.add_argument("--config", help="YAML file of settings (keys are the flags, e.g. batch_size)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    g = p.add_argument_group("many inputs (a batch of files, or several live streams)")
    g.add_argument(
        "--inputs", metavar="LIST", help="a file of inputs, one a line (# comments, blank lines)"
    )
    g.add_argument(
        "--summary", metavar="FILE.jsonl", help="one JSON record per video (status, frames...)"
    )
    g.add_argument(
        "--max-inflight-videos",
        type=int,
        metavar="N",
        help="videos in progress at once (default 2 with --gpus/--workers, else 1)",
    )
    g.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="several live streams: each one's name, in input order, for -o DIR/NAME.m3u8 and "
        "--jsonl DIR/NAME.jsonl (default: from the URL's host, port and path)",
    )
    _bool_flag(
        g,
        "video-tasks",
        "run each video's decode/encode as a Ray task on any node (with --gpus/--workers/"
        "--address; its input and outputs must be reachable from every node)",
    )
    g = p.add_argument_group("input and live mode")
    _bool_flag(
        g,
        "live",
        "read at the source's pace and explain the newest frame when free "
        "(default: on for network, pipe and device inputs)",
    )
    g.add_argument("--input-format", help="FFmpeg input format, e.g. v4l2 for /dev/video0")
    g.add_argument(
        "--input-option",
        action="append",
        metavar="KEY=VALUE",
        help="FFmpeg demuxer/protocol option, repeatable (e.g. rtsp_transport=tcp)",
    )
    g.add_argument(
        "--read-timeout",
        type=float,
        help="seconds without data after which the input has ended (default 10 for live)",
    )
    g.add_argument(
        "--reconnect",
        type=int,
        metavar="N",
        help="reopen a live network input that breaks off or ends, up to N attempts per outage "
        "(default 10 for network inputs; 0: off)",
    )
    g.add_argument(
        "--reconnect-delay",
        type=float,
        metavar="SECONDS",
        help="wait before the first attempt, doubled for each next one up to 30 s (default 1)",
    )
    g.add_argument("--duration", type=float, help="stop after this many seconds of source")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", help="vgg16 (default), efficientnet_lite0, torchvision:NAME, timm:NAME"
    )
    g.add_argument("--weights", help="local state dict instead of downloaded weights")
    g.add_argument("--layer", help="target layer, dotted path (default: per model / auto)")
    g.add_argument("--input-size", type=int, help="model input side S (frames resized to SxS)")
    g.add_argument("--device", help="cpu, cuda or cuda:N")
    g.add_argument("--mean", type=rgb_triple, help="R,G,B input mean (default: the model's own)")
    g.add_argument("--std", type=rgb_triple, help="R,G,B input std (default: the model's own)")
    g.add_argument(
        "--fit", help="non-square frames: squash (default), pad or crop to the square input"
    )
    g = p.add_argument_group("Score-CAM")
    g.add_argument("--batch-size", type=int, help="masked inputs per forward (default 32)")
    g.add_argument(
        "--dtype",
        help="masked passes in fp32 (default, exact), fp16 (the GPU preset: Lite0 maps measured "
        "within r 0.999 and 2 %% of fp32's at 128 px, up to 3.7 %% off at 96 px) or bf16 (not "
        "exact: maps 5-39 %% of their norm away from fp32's); see docs/precision.md",
    )
    g.add_argument(
        "--variant", help="article (default) or pytorch-grad-cam (that library's ScoreCAM)"
    )
    g.add_argument("--score", help="softmax (default), logit or logit_delta")
    _bool_flag(g, "channel-softmax", "softmax of the scores across channels")
    g.add_argument("--combine", help="normalized (default) or raw")
    _bool_flag(g, "skip-constant", "skip constant channels' passes (exact; default on)")
    g.add_argument("--max-channels", type=int, help="Faster Score-CAM: top-N variance channels")
    _bool_flag(g, "channels-last", "channels-last memory format (default on)")
    _bool_flag(g, "compile", "torch.compile the masked passes (fixed-shape chunks; CUDA graphs)")
    g = p.add_argument_group("targets and time")
    g.add_argument("--target", help="top1 (default), dominant, a class id or a class name")
    g.add_argument("--topk", type=int, help="K maps per frame (top-K classes; first rendered)")
    g.add_argument("--every", type=int, help="explain every Nth frame, reuse the map between")
    g.add_argument("--smooth", type=float, help="moving average of maps, weight of the past")
    g.add_argument(
        "--fidelity",
        type=float,
        help="reuse masked passes across frames, keeping this correlation with the exact maps "
        "(measured at keyframes); 1 = exact (default for files; 0.99 for live inputs)",
    )
    g.add_argument("--start", type=float, help="first second to process")
    g.add_argument("--end", type=float, help="second to stop at")
    g.add_argument("--max-frames", type=int, help="process at most N frames")
    g = p.add_argument_group("rendering and outputs")
    g.add_argument("--layout", help="overlay (default) or side-by-side")
    g.add_argument("--colormap", help="OpenCV colormap name (default jet)")
    g.add_argument("--alpha", type=float, help="heatmap weight in the blend, [0, 1]")
    g.add_argument("--scale", help="display scale: running (default, no flicker) or frame")
    g.add_argument("--crf", type=int, help="H.264 quality, 0-51 (default 20)")
    g.add_argument(
        "--encoder",
        help="video encoder: libx264 (default), or e.g. h264_nvenc, h264_qsv "
        "(libx264 if it cannot open here)",
    )
    g.add_argument("--save-maps", help="write the maps, targets and times to FILE.npz")
    g.add_argument("--jsonl", help="write one JSON record per frame to FILE")
    g.add_argument("--preview", help="write a contact sheet of ~8 frames to FILE.png")
    g.add_argument("--hls-time", type=float, help="HLS output: segment seconds (default 2)")
    g.add_argument(
        "--output-size",
        type=size_pair,
        metavar="WxH",
        help="scale the output video's frames to W x H as --fit says (default: the input's)",
    )
    g.add_argument(
        "--hls-list-size", type=int, help="HLS output: segments in the playlist (default 6)"
    )
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--quiet", action="store_true", help="no progress bar, errors only")
    g = p.add_argument_group("faithfulness metrics")
    g.add_argument(
        "--metrics",
        action="store_true",
        help="score each map: Average Drop/Increase, insertion/deletion; table at the end",
    )
    g.add_argument("--baseline", help="gradcam: also its maps and metrics, side by side")
    g.add_argument("--metric-steps", type=int, help="insertion/deletion steps (default 28)")
    g = p.add_argument_group("monitoring")
    g.add_argument(
        "--prometheus-port",
        type=int,
        metavar="PORT",
        help="live runs: serve Prometheus metrics at http://ADDR:PORT/metrics while running",
    )
    g.add_argument(
        "--prometheus-addr",
        metavar="ADDR",
        help="the address the metrics are served on (default 0.0.0.0: every interface)",
    )
    g = p.add_argument_group("distributed (Ray)")
    g.add_argument("--gpus", type=int, help="N Ray workers, one GPU each")
    g.add_argument(
        "--workers-per-gpu", type=int, help="K workers share each GPU (1/K each; default 1)"
    )
    g.add_argument("--workers", type=int, help="N Ray workers on CPU")
    g.add_argument(
        "--address",
        help="join a Ray cluster: auto, HOST:PORT or ray://... "
        "(default: $RAY_ADDRESS with --gpus/--workers, else a local instance)",
    )
    g.add_argument("--max-inflight-frames", type=int, help="frames in flight at once")
    g.add_argument("--shards-per-frame", type=int, help="channel shards per frame")
    g.add_argument("--startup-timeout", type=float, help="seconds to wait for workers")
    g.add_argument(
        "--max-shard-retries", type=int, help="retries of a failing shard before giving up"
    )
    g.add_argument(
        "--threads-per-worker", type=int, help="torch threads of each CPU worker (default: CPUs/N)"
    )
    return p


def rgb_triple(text: str) -> tuple[float, float, float]:
    """Return the three floats of ``R,G,B`` (argparse turns a ValueError into a usage error)."""
    parts = [p for p in str(text).replace(" ", ",").split(",") if p]
    if len(parts) != 3:
        raise ValueError(f"expected R,G,B, got {text!r}")
    r, g, b = (float(p) for p in parts)
    return r, g, b


def size_pair(text: str) -> tuple[int, int]:
    """Return (width, height) of ``WxH`` (argparse turns a ValueError into a usage error)."""
    parts = str(text).lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"expected WIDTHxHEIGHT, got {text!r}")
    width, height = (int(p) for p in parts)
    return width, height
