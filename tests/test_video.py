"""Round trips and failure modes of scorecam_stream.video, on tiny synthetic clips."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import clips
import cv2
import numpy as np
import pytest
from clips import FPS, REPO, H, W, audio_span, make_clip, picture, read_timing, write_frames
from helpers import assert_same_frames

from scorecam_stream.errors import ScoreCamError
from scorecam_stream.video import (
    VideoInfo,
    VideoReader,
    VideoWriter,
    atomic_output,
    probe,
    read_frames,
    rotate_upright,
    write_image,
)


def copy_through(
    source: Path,
    target: Path,
    audio: bool = False,
    start: float | None = None,
    end: float | None = None,
    **writer_options: object,
) -> VideoInfo:
    """Copy ``source`` (its ``[start, end)`` window) and its audio to ``target`` as the pipeline
    would: the window's start becomes time 0.

    Returns the input's info. The input is opened once: frames and audio from one demux.
    """
    if start is not None:
        writer_options |= {"audio_start": start, "audio_end": end, "time_offset": start}
    with VideoReader(str(source)) as reader:
        info = reader.info
        with VideoWriter(
            str(target),
            info.width,
            info.height,
            info.time_base,
            info.fps,
            audio=reader.audio_stream if audio else None,
            **writer_options,
        ) as writer:
            for frame in reader.frames(start=start, end=end):
                writer.write(frame.image, frame.pts, frame.time_base, frame.audio)
            writer.add_audio(reader.trailing_audio)
    return info


# --- round trips ------------------------------------------------------------------------------


def test_probe_and_read_match_what_was_written(tmp_path: Path) -> None:
    clip = tmp_path / "in.mp4"
    images = make_clip(clip, count=20)
    info = probe(str(clip))
    assert (info.width, info.height, info.rotation) == (W, H, 0)
    assert info.fps == pytest.approx(FPS)
    assert info.frame_count == 20
    assert info.duration == pytest.approx(20 / FPS, abs=0.01)
    assert not info.has_audio and not info.is_image
    frames = list(read_frames(str(clip)))
    time_base, pts = read_timing(clip)
    assert [f.index for f in frames] == list(range(20))
    assert [f.pts for f in frames] == pts
    assert all(f.time_base == time_base == info.time_base for f in frames)
    assert [f.seconds for f in frames] == pytest.approx([i / FPS for i in range(20)])
    for frame, image in zip(frames, images, strict=True):
        assert frame.image.shape == (H, W, 3) and frame.image.dtype == np.uint8
        assert np.abs(frame.image.astype(int) - image).mean() < 4


@pytest.mark.parametrize("extension", [".mp4", ".mkv"])
def test_round_trip_keeps_variable_frame_rate(tmp_path: Path, extension: str) -> None:
    source = tmp_path / "vfr.mkv"
    pts = [0, 40, 100, 110, 300, 320, 700, 1000, 1040, 1500]
    images = make_clip(source, pts=pts, time_base=Fraction(1, 1000))
    target = tmp_path / f"out{extension}"
    copy_through(source, target)
    in_base, in_pts = read_timing(source)
    out_base, out_pts = read_timing(target)
    assert len(out_pts) == len(in_pts) == len(pts)
    # mkv keeps the millisecond base; mp4 may scale it up (1/16000) but not the instants.
    assert [p * out_base for p in out_pts] == [p * in_base for p in in_pts]
    frames = list(read_frames(str(target)))
    for frame, image in zip(frames, images, strict=True):
        assert np.abs(frame.image.astype(int) - image).mean() < 6


def test_round_trip_keeps_pts_and_time_base_exactly(tmp_path: Path) -> None:
    source, target = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_clip(source, count=15)
    copy_through(source, target, crf=18)
    assert read_timing(target) == read_timing(source)
    info = probe(str(target))
    assert (info.width, info.height, info.frame_count) == (W, H, 15)


def test_writer_invents_pts_from_fps_when_missing(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    with VideoWriter(str(target), W, H, Fraction(1, 600), fps=12) as writer:
        for i in range(6):
            writer.write(picture(i), None, Fraction(1, 600))
    frames = list(read_frames(str(target)))
    assert [f.seconds for f in frames] == pytest.approx([i / 12 for i in range(6)])


def test_odd_size_is_padded_by_replicating_the_edge(tmp_path: Path) -> None:
    source, target = tmp_path / "odd.mkv", tmp_path / "out.mp4"
    with av.open(str(source), "w") as output:  # odd sizes need a codec without chroma halving
        stream = output.add_stream("ffv1", rate=FPS, width=63, height=47, pix_fmt="bgr0")
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(picture(i, 63, 47), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    info = copy_through(source, target)
    assert (info.width, info.height) == (63, 47)
    first = next(read_frames(str(source))).image
    assert first.shape == (47, 63, 3)
    out = next(read_frames(str(target))).image
    assert out.shape == (48, 64, 3)
    assert np.abs(out[:47, :63].astype(int) - first).mean() < 4
    # The extra column and row repeat the edge: no black border, no stretching.
    assert np.abs(out[:47, 63].astype(int) - first[:, 62]).mean() < 8
    assert np.abs(out[47, :63].astype(int) - first[46, :]).mean() < 8


# --- audio ------------------------------------------------------------------------------------


def test_aac_audio_is_copied_with_its_duration(tmp_path: Path) -> None:
    source, target = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_clip(source, count=24, audio="aac")
    info = copy_through(source, target, audio=True)
    assert info.has_audio and probe(str(target)).has_audio
    in_codec, _, in_length = audio_span(source)
    out_codec, _, out_length = audio_span(target)
    assert in_codec == out_codec == "aac"
    assert out_length == pytest.approx(in_length, abs=0.1)
    assert len(list(read_frames(str(target)))) == 24


def test_audio_the_output_cannot_hold_is_reencoded_to_aac(tmp_path: Path) -> None:
    source, target = tmp_path / "in.mkv", tmp_path / "out.mp4"
    make_clip(source, count=24, audio="pcm_s16le")
    copy_through(source, target, audio=True)
    _, _, in_length = audio_span(source)
    out_codec, _, out_length = audio_span(target)
    assert out_codec == "aac"
    assert out_length == pytest.approx(in_length, abs=0.1)


def test_audio_window_and_offset_follow_the_video_window(tmp_path: Path) -> None:
    source, target = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_clip(source, count=36, audio="aac", gop=6)
    copy_through(source, target, audio=True, start=1.0, end=2.0)
    frames = list(read_frames(str(target)))
    assert len(frames) == 12
    assert frames[0].seconds == 0
    _, audio_first, audio_length = audio_span(target)
    assert audio_first == pytest.approx(0, abs=0.05)
    assert audio_length == pytest.approx(1.0, abs=0.1)


def test_audio_from_a_silent_input_gives_a_silent_output(tmp_path: Path) -> None:
    source, target = tmp_path / "in.mp4", tmp_path / "out.mp4"
    make_clip(source, count=6)
    copy_through(source, target, audio=True)
    assert not probe(str(target)).has_audio


# --- time windows -----------------------------------------------------------------------------


def test_start_end_and_max_frames(tmp_path: Path) -> None:
    clip = tmp_path / "in.mp4"
    make_clip(clip, count=30, gop=5)  # keyframes every 5 frames, so start needs a real seek
    window = list(read_frames(str(clip), start=1.0, end=1.5))
    assert [f.seconds for f in window] == pytest.approx([i / FPS for i in range(12, 18)])
    assert [f.index for f in window] == list(range(6))
    assert all(1.0 <= f.seconds < 1.5 for f in window)
    assert len(list(read_frames(str(clip), max_frames=7))) == 7
    assert len(list(read_frames(str(clip), start=2.0, max_frames=100))) == 6
    assert list(read_frames(str(clip), start=10.0)) == []
    with pytest.raises(ScoreCamError, match="max-frames must be >= 1"):
        read_frames(str(clip), max_frames=0)  # the configuration's rule: 0 is a mistake


@pytest.mark.parametrize(
    ("start", "end", "max_frames"),
    [(-1.0, None, None), (2.0, 1.0, None), (None, None, -1), (None, 0.0, None), (None, None, 0)],
)
def test_bad_windows_are_user_errors(
    tmp_path: Path, start: float | None, end: float | None, max_frames: int | None
) -> None:
    clip = tmp_path / "in.mp4"
    make_clip(clip, count=3)
    with pytest.raises(ScoreCamError):
        read_frames(str(clip), start=start, end=end, max_frames=max_frames)


# --- rotation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("rotation", "turns"), [(90, 1), (-90, 3), (180, 2)])
def test_rotated_video_is_read_upright(tmp_path: Path, rotation: int, turns: int) -> None:
    clip = tmp_path / "rotated.mp4"
    make_clip(clip, count=3, rotation=rotation)
    info = probe(str(clip))
    assert info.rotation == rotation % 360
    expected = rotate_upright(picture(0), rotation % 360)
    assert (info.height, info.width) == expected.shape[:2]
    frame = next(read_frames(str(clip)))
    assert frame.image.shape == expected.shape
    assert np.abs(frame.image.astype(int) - expected).mean() < 4
    assert np.array_equal(rotate_upright(picture(0), rotation % 360), np.rot90(picture(0), turns))


def test_rotate_upright_turns_counter_clockwise() -> None:
    image = np.zeros((2, 3, 1), np.uint8)
    image[0, 0] = 1  # top-left
    assert rotate_upright(image, 0) is image
    assert rotate_upright(image, 90)[2, 0, 0] == 1  # to bottom-left
    assert rotate_upright(image, 270)[0, 1, 0] == 1  # to top-right
    assert rotate_upright(image, 180)[1, 2, 0] == 1


# --- damaged and unreadable inputs ------------------------------------------------------------


def assert_user_error(path: str, call: Callable[[str], object]) -> None:
    with pytest.raises(ScoreCamError) as caught:
        call(path)
    message = str(caught.value)
    assert "\n" not in message and path in message


READERS = [probe, lambda path: list(read_frames(path))]


@pytest.mark.parametrize("call", READERS, ids=["probe", "read_frames"])
def test_unreadable_inputs_are_one_line_user_errors(
    tmp_path: Path, call: Callable[[str], object]
) -> None:
    make_clip(tmp_path / "whole.mp4", count=20)
    bad = [
        tmp_path / "missing.mp4",
        clips.empty_file(tmp_path),
        clips.text_file(tmp_path),
        clips.truncated_mp4(tmp_path, tmp_path / "whole.mp4"),
        clips.audio_only(tmp_path),
    ]
    for path in (*bad, tmp_path):
        assert_user_error(str(path), call)
    assert_user_error("http://127.0.0.1:9/clip.mp4", call)  # refused at once: nothing listens
    assert_user_error("nosuchprotocol://clip.mp4", call)


def test_truncated_transport_stream_yields_frames_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole, cut = tmp_path / "whole.ts", tmp_path / "cut.ts"
    rng = np.random.default_rng(0)
    with av.open(str(whole), "w") as output:  # noise: frames span many 188-byte TS packets
        stream = output.add_stream("libx264", rate=FPS, width=W, height=H)
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (H, W, 3), dtype=np.uint8), format="rgb24"
            )
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) * 6 // 10])
    with caplog.at_level(logging.WARNING, logger="scorecam_stream.video"):
        frames = list(read_frames(str(cut)))
    assert 5 < len(frames) < 30
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(b.seconds > a.seconds for a, b in itertools.pairwise(frames))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and str(cut) in warnings[0].getMessage()


def test_garbage_in_the_middle_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clip = tmp_path / "damaged.ts"
    make_clip(clip, count=30, gop=5)
    data = bytearray(clip.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = np.random.default_rng(1).bytes(2000)
    clip.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="scorecam_stream.video"):
        frames = list(read_frames(str(clip)))
    assert 20 < len(frames) <= 30  # frames after the damage are still read
    assert frames[-1].seconds == pytest.approx(29 / FPS + frames[0].seconds)
    assert any("damaged" in r.getMessage() for r in caplog.records)


# --- output files -----------------------------------------------------------------------------


def test_atomic_output_moves_the_result_into_place(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    with atomic_output(target, overwrite=False) as temporary:
        temporary.write_bytes(b"video")
        # Linux: the file being written has no name at all, so nothing can be left behind.
        assert os.listdir(tmp_path) == []
    assert target.read_bytes() == b"video"
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_atomic_output_without_unnamed_files_sweeps_what_dead_runs_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(os, "O_TMPFILE")  # as on a system without it
    target = tmp_path / "out.mp4"
    stale = tmp_path / ".out.mp4.tmp-999999999-abc.mp4"  # no such pid
    alive = tmp_path / f".out.mp4.tmp-{os.getpid()}-abc.mp4"  # a live run's: kept
    stale.write_bytes(b"left by a killed run")
    alive.write_bytes(b"being written")
    with atomic_output(target, overwrite=False) as temporary:
        assert temporary.parent == tmp_path and temporary.suffix == ".mp4"
        assert temporary.name.startswith(f".out.mp4.tmp-{os.getpid()}-")
        temporary.write_bytes(b"video")
    assert target.read_bytes() == b"video"
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, "out.mp4"])


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_failure_leaves_no_file(tmp_path: Path, error: type[BaseException]) -> None:
    target = tmp_path / "out.mp4"
    with pytest.raises(error), atomic_output(target, overwrite=False) as temporary:
        temporary.write_bytes(b"half a video")
        raise error()
    assert os.listdir(tmp_path) == []


def test_atomic_output_failure_keeps_the_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old")
    with (
        pytest.raises(ScoreCamError, match="model failed"),
        atomic_output(target, overwrite=True) as temporary,
        VideoWriter(str(temporary), W, H, Fraction(1, FPS), FPS, name=str(target)) as writer,
    ):
        writer.write(picture(0), 0, Fraction(1, FPS))
        raise ScoreCamError("model failed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.mp4"]


def test_atomic_output_overwrite_rules(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    with (
        pytest.raises(ScoreCamError, match="exists; pass --overwrite"),
        atomic_output(target, overwrite=False),
    ):
        pass
    with atomic_output(target, overwrite=True) as temporary:
        write_image(str(temporary), picture(0), name=str(target))
    assert target.read_bytes()[:4] == b"\x89PNG"
    with (
        pytest.raises(ScoreCamError, match="does not exist"),
        atomic_output(tmp_path / "no" / "out.mp4", overwrite=False),
    ):
        pass


def test_writer_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ScoreCamError, match=r"\.avi"):
        VideoWriter(str(tmp_path / "out.avi"), W, H, Fraction(1, FPS), FPS)
    with (
        pytest.raises(ScoreCamError, match="no frames"),
        VideoWriter(str(tmp_path / "out.mp4"), W, H, Fraction(1, FPS), FPS),
    ):
        pass
    with (
        pytest.raises(ScoreCamError, match="does not fit"),
        VideoWriter(str(tmp_path / "out.mp4"), W, H, Fraction(1, FPS), FPS) as writer,
    ):
        writer.write(picture(0, W + 2, H), 0, Fraction(1, FPS))


def _write_encoded(path: Path, caplog, **options) -> tuple[VideoWriter, str]:
    """Write 10 pictures with ``options``; return the writer and the codec the file holds."""
    caplog.set_level(logging.INFO, logger="scorecam_stream")
    with VideoWriter(str(path), W, H, Fraction(1, FPS), FPS, **options) as writer:
        for i in range(10):
            writer.write(picture(i, W, H), i, Fraction(1, FPS))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == 10
        return writer, stream.codec_context.name


def test_another_encoder_writes_the_output(tmp_path: Path, caplog) -> None:
    writer, codec = _write_encoded(tmp_path / "out.mp4", caplog, encoder="mpeg4")
    assert writer.encoder == "mpeg4" and codec == "mpeg4"
    assert "writing with mpeg4" in caplog.text


def test_an_encoder_that_cannot_open_falls_back_to_libx264(tmp_path: Path, caplog) -> None:
    # H.263 has only five picture sizes, none of them W x H: it fails to open on any machine,
    # as a hardware encoder does where its device is absent.
    writer, codec = _write_encoded(tmp_path / "out.mp4", caplog, encoder="h263")
    assert writer.encoder == "libx264" and codec == "h264"
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--encoder h263 cannot open here" in warnings[0]


def test_a_live_source_written_to_a_file_gets_a_real_time_preset(tmp_path: Path, caplog) -> None:
    # x264's default (medium) cannot keep up with 720p at 25 fps on a few cores.
    assert _write_encoded(tmp_path / "a.mp4", caplog)[0].preset == "medium"
    assert _write_encoded(tmp_path / "b.mp4", caplog, realtime=True)[0].preset == "veryfast"


# --- still images -----------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".png", ".jpg"])
def test_still_image_is_probed_and_read_as_one_frame(tmp_path: Path, extension: str) -> None:
    path = tmp_path / f"cat{extension}"
    image = picture(3, 30, 20)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    info = probe(str(path))
    assert info.is_image and info.frame_count == 1
    assert (info.width, info.height) == (30, 20)
    frames = list(read_frames(str(path), start=5.0))  # a window is ignored for a still image
    assert len(frames) == 1
    tolerance = 1 if extension == ".png" else 12
    assert np.abs(frames[0].image.astype(int) - image).mean() < tolerance


@pytest.mark.parametrize("extension", [".png", ".jpg", ".JPEG"])
def test_write_image_round_trip(tmp_path: Path, extension: str) -> None:
    path = tmp_path / f"heatmap{extension}"
    image = picture(5, 31, 21)
    write_image(str(path), image)
    back = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    if extension == ".png":
        assert np.array_equal(back, image)
    else:
        assert np.abs(back.astype(int) - image).mean() < 12
    with pytest.raises(ScoreCamError, match="must end with"):
        write_image(str(tmp_path / "heatmap.gif"), image)


# --- the sample clip script -------------------------------------------------------------------


def test_make_sample_video_script(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "make_sample_video", REPO / "scripts" / "make_sample_video.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    target = tmp_path / "sample.mp4"
    assert script.main([str(target), "--seconds", "1", "--fps", "6", "--size", "64x48"]) == 0
    info = probe(str(target))
    assert (info.width, info.height, info.frame_count, info.has_audio) == (64, 48, 6, True)
    _, _, length = audio_span(target)
    assert length == pytest.approx(1.0, abs=0.1)
    assert script.main([str(target), "--seconds", "1"]) == 2  # exists, no --overwrite


def test_same_frames_tells_a_video_one_frame_off(tmp_path):
    """The tests' picture comparison (helpers.assert_same_frames) is not blind to a shift."""
    video, late = tmp_path / "a.mp4", tmp_path / "late.mp4"
    images = make_clip(video, count=8)
    write_frames(late, [images[0], *images[:-1]])  # every frame one late
    assert_same_frames(video, video)
    with pytest.raises(AssertionError, match="mean difference"):
        assert_same_frames(video, late)
