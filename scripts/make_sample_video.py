"""Write a short H.264 mp4 that pans and zooms over scikit-image's cat, with a 440 Hz AAC tone.

python scripts/make_sample_video.py out.mp4 [--seconds 4] [--fps 12] [--size 320x240]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from skimage import data

from scorecam_stream.errors import ScoreCamError
from scorecam_stream.video import VideoWriter, atomic_output

log = logging.getLogger("make_sample_video")

TONE_HZ = 440.0
SAMPLE_RATE = 48000
AUDIO_CHUNK = 1024  # samples per AAC frame


def size_arg(text: str) -> tuple[int, int]:
    """Return (width, height) parsed from ``WIDTHxHEIGHT``."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}") from None
    if width < 16 or height < 16:
        raise argparse.ArgumentTypeError(f"size must be at least 16x16, got {text!r}")
    return width, height


def pan_zoom_frames(count: int, width: int, height: int) -> list[np.ndarray]:
    """Return ``count`` (height, width, 3) RGB views panning right over the cat while zooming in."""
    cat = data.chelsea()  # (300, 451, 3) uint8 RGB
    source_h, source_w = cat.shape[:2]
    aspect = width / height
    frames = []
    for i in range(count):
        t = i / max(count - 1, 1)
        zoom = 1.0 + 0.4 * t
        # The largest crop of the output's aspect, shrunk by the zoom, drifting over the face.
        crop_h = min(source_h, source_w / aspect) / zoom
        crop_w = crop_h * aspect
        center_x = np.clip(source_w * (0.4 + 0.15 * t), crop_w / 2, source_w - crop_w / 2)
        center_y = np.clip(source_h * (0.5 - 0.05 * t), crop_h / 2, source_h - crop_h / 2)
        left = round(center_x - crop_w / 2)
        top = round(center_y - crop_h / 2)
        crop = cat[top : top + int(crop_h), left : left + int(crop_w)]
        frames.append(cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA))
    return frames


def write_tone(path: Path, seconds: float) -> None:
    """Write ``seconds`` of a mono 440 Hz sine as AAC in an .m4a file."""
    samples = np.sin(2 * np.pi * TONE_HZ * np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE)
    samples = (0.3 * samples).astype(np.float32)
    with av.open(str(path), "w") as output:
        stream = output.add_stream("aac", rate=SAMPLE_RATE)
        stream.layout = "mono"
        for first in range(0, len(samples), AUDIO_CHUNK):
            frame = av.AudioFrame.from_ndarray(
                samples[None, first : first + AUDIO_CHUNK], format="fltp", layout="mono"
            )
            frame.sample_rate = SAMPLE_RATE
            frame.pts = first
            frame.time_base = Fraction(1, SAMPLE_RATE)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))


def make_sample_video(
    path: Path,
    seconds: float = 4.0,
    fps: int = 12,
    size: tuple[int, int] = (320, 240),
    overwrite: bool = False,
) -> int:
    """Write the sample clip to ``path``; return the number of video frames."""
    width, height = size
    count = max(1, round(seconds * fps))
    time_base = Fraction(1, fps)
    with tempfile.TemporaryDirectory() as scratch:
        tone = Path(scratch) / "tone.m4a"
        write_tone(tone, count / fps)
        with (
            av.open(str(tone)) as sound,
            atomic_output(path, overwrite) as temporary,
            VideoWriter(
                str(temporary),
                width,
                height,
                time_base,
                fps,
                audio=sound.streams.audio[0],
                name=str(path),
            ) as out,
        ):
            for index, image in enumerate(pan_zoom_frames(count, width, height)):
                out.write(image, index, time_base)
            out.add_audio(sound.demux(sound.streams.audio[0]))
    return count


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, write the clip and return the exit code (2 for a user error)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="the .mp4 to write")
    parser.add_argument("--seconds", type=float, default=4.0, help="length (default 4)")
    parser.add_argument("--fps", type=int, default=12, help="frame rate (default 12)")
    parser.add_argument("--size", type=size_arg, default=(320, 240), help="WxH (default 320x240)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.seconds <= 0 or args.fps <= 0:
            raise ScoreCamError("--seconds and --fps must be positive")
        count = make_sample_video(args.output, args.seconds, args.fps, args.size, args.overwrite)
    except ScoreCamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log.info(
        "wrote %s: %d frames at %d fps with a %g Hz tone", args.output, count, args.fps, TONE_HZ
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
