"""A live worker for real cameras: outputs checked first, records visible as they go, restarts,
size changes and reconnects of the source.

Sources are synthetic MPEG-TS clips sent on 127.0.0.1 only (UDP, a TCP server of the test's
own) or through a pipe; each test is bounded to a few seconds of stream.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from clips import LIVE_FPS as FPS
from clips import SLOW, free_udp_port, picture, read_timing, send_mpegts, udp_source
from helpers import SCRIPT, records, wait_for_records

from scorecam_stream import video
from scorecam_stream.cli import main
from scorecam_stream.live_source import LiveSource
from scorecam_stream.render import RenderOptions
from scorecam_stream.stages import DrawItem, Encoder
from scorecam_stream.video import Frame, Timeline, VideoWriter, probe

# --- A: every output is checked (or made) before the input opens and the model loads ---------


def test_a_live_run_makes_its_outputs_missing_directories(tmp_path, monkeypatch):
    clip = tmp_path / "in.ts"
    send_mpegts(str(clip), 0.4, FPS, realtime=False)
    monkeypatch.chdir(tmp_path)
    args = [str(clip), "--live", "-o", "live/cam.m3u8", "--jsonl", "logs/day/run.jsonl"]
    assert main([*args, "--hls-time", "1", *SLOW]) == 0
    playlist = (tmp_path / "live" / "cam.m3u8").read_text().splitlines()
    assert playlist[-1] == "#EXT-X-ENDLIST"
    assert (tmp_path / "logs" / "day" / "run.jsonl").read_text().count("\n") >= 1


@pytest.mark.parametrize(
    ("source", "output", "message"),
    [
        ("udp://127.0.0.1:9", ["-o", "afile/cam.m3u8"], "directory afile is not a directory"),
        ("udp://127.0.0.1:9", ["--jsonl", "afile/x/r.jsonl"], "cannot create output directory"),
        ("udp://127.0.0.1:9", ["-o", "-", "--preview", "afile/p.png"], "not a directory"),
        ("in.ts", ["-o", "out/in.mp4"], "output directory out does not exist"),  # not live
    ],
)
def test_an_output_that_cannot_be_written_fails_before_the_input_opens(
    tmp_path, monkeypatch, capsys, source, output, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file where a directory should be")
    opened: list[str] = []

    def reader(path: str, *_: object) -> None:
        opened.append(path)
        raise AssertionError("the input was opened before the outputs were checked")

    monkeypatch.setattr(video, "VideoReader", reader)
    # A live source that sends nothing: opening it would wait; the model would load after.
    assert main([source, *output, *SLOW]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert opened == []


# --- B: a live run's records are readable as it goes, and kept when it is killed -------------


def test_a_killed_live_run_keeps_the_records_it_made(tmp_path):
    out, jsonl = tmp_path / "cam.mp4", tmp_path / "cam.jsonl"
    with udp_source(30.0) as (url, stop, _sent):
        process = subprocess.Popen(
            [SCRIPT, url, "-o", out, "--jsonl", jsonl, *SLOW],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for_records(process, tmp_path, count=2, timeout=90, live_jsonl=jsonl)
            seen = jsonl.read_text().splitlines()[:2]
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        stop.set()
    lines = jsonl.read_text().splitlines()
    assert lines[:2] == seen  # what was there when it was killed is still there, whole
    records = [json.loads(line) for line in lines]
    assert all("index" in r and "summary" not in r for r in records)
    assert not out.exists()  # the video (an mp4, useless unfinished) stays all-or-nothing


# --- C: a source that restarts (timestamps from 0 again), at the same size or another -------


@contextlib.contextmanager
def restarting_udp_source(
    segments: list[tuple[float, tuple[int, int]]],
) -> Iterator[tuple[str, list[int]]]:
    """Send clips one after another to one UDP port, each by a new muxer and encoder (a camera
    that reboots: its timestamps start again); yield (url, [frames sent by each])."""
    url = f"udp://127.0.0.1:{free_udp_port()}"
    sent: list[int] = []

    def send() -> None:
        time.sleep(0.5)  # the reader listens before the first packet goes out
        for seconds, size in segments:
            sent.append(send_mpegts(url, seconds, FPS, size=size))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield url, sent
    finally:
        thread.join(timeout=30)


def _run_through_restart(tmp_path: Path, second_size: tuple[int, int]) -> tuple[list, dict, Path]:
    """Return (records, summary, output) of a live run whose source restarts half-way."""
    out, jsonl = tmp_path / "cam.mp4", tmp_path / "cam.jsonl"
    with restarting_udp_source([(2.0, (128, 96)), (2.0, second_size)]) as (url, sent):
        args = [url, "-o", str(out), "--jsonl", str(jsonl), "--read-timeout", "1"]
        assert main([*args, "--reconnect", "0", *SLOW]) == 0
    explained, summary = records(jsonl)
    assert summary["discontinuities"] == 1
    # Every frame of the second run arrives (the reader was listening): the break is there.
    restart = summary["frames_in"] - sent[1]
    after = [r["index"] for r in explained if r["index"] >= restart]
    # One record says so, the first explained after the restart. ``restart`` counts every frame
    # of the second run as arrived; UDP may lose some under load, which only moves the real
    # restart later: one flag, at or after it, and none before.
    flagged = [r["index"] for r in explained if r["discontinuity"]]
    assert len(flagged) == 1 and flagged[0] >= restart and after
    return explained, summary, out


def test_a_source_restart_is_a_discontinuity_the_output_plays_through(tmp_path):
    _explained, summary, out = _run_through_restart(tmp_path, (128, 96))
    time_base, pts = read_timing(out)
    assert summary["frames_written"] == summary["frames_in"] == len(pts) > 2 * FPS
    # Strictly increasing, one frame interval apart across the restart too: nothing squeezed
    # (and no frame lost).
    steps = {round((b - a) * time_base * FPS, 6) for a, b in itertools.pairwise(pts)}
    assert steps == {1.0}


def test_a_source_that_restarts_at_another_size_is_scaled_to_the_output(tmp_path):
    _explained, summary, out = _run_through_restart(tmp_path, (160, 120))
    info = probe(str(out))
    assert (info.width, info.height) == (128, 96)
    with av.open(str(out)) as container:
        sizes = {(f.width, f.height) for f in container.decode(video=0)}
    assert sizes == {(128, 96)}
    assert summary["frames_written"] == info.frame_count > 2 * FPS  # both halves written


def _ts_with_audio(seconds: float) -> bytes:
    """Return MPEG-TS bytes of ``seconds`` of H.264 video and AAC audio, both from 0."""
    import io

    buffer, rate = io.BytesIO(), 48000
    with av.open(buffer, "w", format="mpegts") as output:
        video_out = output.add_stream("libx264", rate=FPS, width=128, height=96)
        video_out.options = {"g": str(FPS // 2), "bf": "0"}
        audio_out = output.add_stream("aac", rate=rate)
        audio_out.layout = "mono"
        for i in range(round(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(picture(i, 128, 96), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            output.mux(video_out.encode(frame))
        tone = np.sin(np.arange(round(seconds * rate)) * 2 * np.pi * 440 / rate)
        for at in range(0, len(tone), 1024):
            chunk = tone[None, at : at + 1024].astype(np.float32)
            sound = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
            sound.pts, sound.sample_rate, sound.time_base = at, rate, Fraction(1, rate)
            output.mux(audio_out.encode(sound))
        output.mux(video_out.encode(None))
        output.mux(audio_out.encode(None))
    return buffer.getvalue()


def test_audio_plays_on_through_a_restart(tmp_path):
    # A camera that reboots with its microphone on: both tracks start again from 0.
    clip, out = tmp_path / "cam.ts", tmp_path / "cam.mp4"
    clip.write_bytes(_ts_with_audio(1.5) + _ts_with_audio(1.5))
    assert main([str(clip), "--live", "-o", str(out), *SLOW]) == 0
    with av.open(str(out)) as container:
        packets = [p for p in container.demux(audio=0) if p.pts is not None]
        audio_tb = container.streams.audio[0].time_base
    times = [float(p.pts * audio_tb) for p in packets]
    assert times == sorted(set(times))  # strictly increasing across the restart
    assert times[-1] - times[0] == pytest.approx(3.0, abs=0.15)  # both halves, end to end
    time_base, pts = read_timing(out)
    assert len(pts) == 2 * round(1.5 * FPS)
    steps = {round((b - a) * time_base * FPS, 6) for a, b in itertools.pairwise(pts)}
    assert steps == {1.0}


def _stamped(pts: list[int], arrivals: list[float]) -> list[Frame]:
    image = np.zeros((2, 2, 3), np.uint8)
    tb = Fraction(1, 90000)
    pairs = zip(pts, arrivals, strict=True)
    return [Frame(0, image, p, tb, float(p * tb), (), arrival) for p, arrival in pairs]


def test_the_timeline_continues_through_resets_and_jumps_and_keeps_real_gaps():
    step = 3600  # 25 fps at 90 kHz
    pts = [0, step, 2 * step, 0, step, 10**9, 10**9 + step, 10**9 + 5 * step]
    arrivals = [0.0, 0.04, 0.08, 0.12, 0.16, 0.20, 0.24, 0.40]  # the last: 4 frames missed
    timeline = Timeline(25.0, wall_clock=True)
    out = list(timeline.frames(_stamped(pts, arrivals)))
    assert [f.index for f in out] == list(range(8))
    assert [f.pts for f in out] == [step * k for k in (0, 1, 2, 3, 4, 5, 6, 10)]
    assert timeline.discontinuities == [3, 5]  # a reset, then a jump far ahead of the clock
    # Not real time (a file played as live): only going back is a break.
    paced = Timeline(25.0, wall_clock=False)
    assert [f.pts for f in paced.frames(_stamped([0, step, 10**9], [0.0] * 3))] == [
        0, step, 10**9
    ]  # fmt: skip
    assert paced.discontinuities == []
    paced.mark()  # a reopened source: its next frame follows on, whatever its timestamp
    (after,) = paced.frames(_stamped([10**9 + 100 * step], [0.0]))
    assert after.pts == 10**9 + step and paced.discontinuities == [3]


# --- D: a network source that drops is reopened, the output goes on ---------------------------


@contextlib.contextmanager
def dropping_tcp_server(
    segments: list[bytes], seconds: float, down: float, late: float = 0.0
) -> Iterator[str]:
    """Serve MPEG-TS on 127.0.0.1 to one client per segment, at ``seconds`` a segment, then
    drop it; the server is down (refusing) for ``down`` s between segments and after the last,
    and for ``late`` s before the first. Yield the tcp:// URL."""
    first = socket.create_server(("127.0.0.1", 0))  # SO_REUSEADDR: the port is taken again
    port = first.getsockname()[1]
    if late:
        first.close()  # refusing until the server comes up

    def serve() -> None:
        server = first
        for i, data in enumerate(segments):
            if i or late:
                time.sleep(down if i else late)
                server = socket.create_server(("127.0.0.1", port))
            with server:
                server.settimeout(30)
                client, _ = server.accept()
            with client:
                chunk = 188 * 7
                began = time.monotonic()
                for at in range(0, len(data), chunk):
                    time.sleep(max(0.0, began + seconds * at / len(data) - time.monotonic()))
                    client.sendall(data[at : at + chunk])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        thread.join(timeout=30)


def test_a_tcp_source_that_drops_is_reconnected_and_the_output_goes_on(tmp_path):
    segments, sent = [], 0
    for i in range(2):
        clip = tmp_path / f"part{i}.ts"
        sent += send_mpegts(str(clip), 2.0, FPS, realtime=False)
        segments.append(clip.read_bytes())
    out, jsonl = tmp_path / "cam.mp4", tmp_path / "cam.jsonl"
    with dropping_tcp_server(segments, seconds=2.0, down=0.5) as url:
        args = [url, "-o", str(out), "--jsonl", str(jsonl), "--read-timeout", "2"]
        # Attempts after 0.2, 0.4, 0.8 s: the first is refused (the server is down for 0.5 s).
        assert main([*args, "--reconnect", "3", "--reconnect-delay", "0.2", *SLOW]) == 0
    _explained, summary = records(jsonl)
    assert summary["reconnects"] == 1 and summary["discontinuities"] == 1
    assert summary["stopped_by"] == "reconnect failed"  # after the second drop, nobody answers
    # TCP loses nothing: every frame of both connections is written, one interval apart.
    time_base, pts = read_timing(out)
    assert summary["frames_written"] == len(pts) == sent
    steps = {round((b - a) * time_base * FPS, 6) for a, b in itertools.pairwise(pts)}
    assert steps == {1.0}


def test_a_source_not_up_yet_is_waited_for(tmp_path, capsys):
    clip = tmp_path / "part.ts"
    sent = send_mpegts(str(clip), 1.0, FPS, realtime=False)
    out, jsonl = tmp_path / "cam.mp4", tmp_path / "cam.jsonl"
    with dropping_tcp_server([clip.read_bytes()], seconds=1.0, down=0.0, late=0.5) as url:
        args = [url, "-o", str(out), "--jsonl", str(jsonl), "--read-timeout", "2"]
        # Tried at 0, 0.3 and 0.9 s: refused twice at most, then up.
        args += ["--reconnect", "3", "--reconnect-delay", "0.3"]
        assert main([*args, *SLOW[:-1]]) == 0  # not --quiet: warnings shown
    assert "Connection refused; trying again in 0.3 s (attempt 1 of 3)" in capsys.readouterr().err
    _explained, summary = records(jsonl)
    assert summary["frames_written"] == probe(str(out)).frame_count == sent
    assert summary["reconnects"] == 0  # opened late, not reopened


def test_a_source_that_never_comes_up_is_one_error_after_the_attempts(tmp_path, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]  # closed: connections are refused
    url, out = f"tcp://127.0.0.1:{port}", tmp_path / "cam.mp4"
    args = [url, "-o", str(out), "--reconnect-delay", "0.1", *SLOW[:-1]]  # warnings shown
    assert main([*args, "--reconnect", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "error:" in line] == [err[-1]]
    assert "refused" in err[-1] and sum("trying again" in line for line in err) == 2
    assert main([*args, "--reconnect", "0"]) == 2  # at once
    assert not any("trying again" in line for line in capsys.readouterr().err.splitlines())
    assert not out.exists()


def _send_with_a_silence(url: str, before: float, silence: float, after: float) -> int:
    """Send MPEG-TS to ``url`` in real time with one encoder and muxer: ``before`` s, nothing
    for ``silence`` s (timestamps go on: a network outage), ``after`` s. Return frames sent."""
    count, resume = round((before + after) * FPS), round(before * FPS)
    with av.open(url, "w", format="mpegts") as output:
        stream = output.add_stream(
            "libx264", rate=FPS, width=128, height=96,
            options={"tune": "zerolatency", "g": str(FPS // 2), "bf": "0"},
        )  # fmt: skip
        began = time.monotonic()
        for i in range(count):
            pts = i + (round(silence * FPS) if i >= resume else 0)
            time.sleep(max(0.0, began + pts / FPS - time.monotonic()))
            frame = av.VideoFrame.from_ndarray(picture(i, 128, 96), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, FPS)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    return count


def test_a_udp_source_that_falls_silent_and_comes_back_goes_on(tmp_path):
    out, jsonl = tmp_path / "cam.mp4", tmp_path / "cam.jsonl"
    url = f"udp://127.0.0.1:{free_udp_port()}"
    sender = threading.Thread(
        target=lambda: (time.sleep(0.5), _send_with_a_silence(url, 1.5, 2.5, 1.5)), daemon=True
    )
    sender.start()
    args = [url, "-o", str(out), "--jsonl", str(jsonl), "--read-timeout", "1"]
    try:
        assert main([*args, "--reconnect", "3", *SLOW]) == 0
    finally:
        sender.join(timeout=30)
    _explained, summary = records(jsonl)
    # Listened to again after 1 s of silence (and again, as nothing came in the next second).
    assert summary["reconnects"] == 1 and summary["stopped_by"] == "reconnect failed"
    # The same stream went on: no discontinuity, the silence kept as the gap it was.
    assert summary["discontinuities"] == 0
    time_base, pts = read_timing(out)
    gaps = [float((b - a) * time_base) for a, b in itertools.pairwise(pts)]
    assert min(gaps) > 0 and max(gaps) >= 2.5
    assert summary["frames_written"] == len(pts) > 1.5 * FPS  # frames of both sides of it


# --- E: the output's size ----------------------------------------------------------------------


def test_output_size_scales_a_live_output(tmp_path):
    clip = tmp_path / "in.ts"
    sent = send_mpegts(str(clip), 0.8, FPS, size=(128, 96), realtime=False)
    out = tmp_path / "big.mp4"
    assert main([str(clip), "--live", "-o", str(out), "--output-size", "200x100", *SLOW]) == 0
    info = probe(str(out))
    assert (info.width, info.height, info.frame_count) == (200, 100, sent)


def test_encoder_option_reaches_a_live_runs_file_output(tmp_path):
    clip = tmp_path / "in.ts"
    sent = send_mpegts(str(clip), 0.8, FPS, size=(128, 96), realtime=False)
    out = tmp_path / "cam.mp4"
    assert main([str(clip), "--live", "-o", str(out), "--encoder", "libx265", *SLOW]) == 0
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "hevc"
    assert probe(str(out)).frame_count == sent


@pytest.mark.parametrize(
    ("value", "message"),
    [("200", "--output-size"), ("axb", "--output-size"), ("8x8", "16 to 8192")],
)
def test_a_bad_output_size_is_one_line(tmp_path, capsys, value, message):
    assert main([str(tmp_path / "in.ts"), "--output-size", value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_live_output_can_switch_to_a_faster_preset_and_still_decodes(tmp_path):
    playlist = tmp_path / "hls" / "cam.m3u8"
    playlist.parent.mkdir()
    tb = Fraction(1, 90000)
    writer = VideoWriter(str(playlist), 128, 96, tb, FPS, hls_time=0.5)
    file_writer = VideoWriter(str(tmp_path / "cam.mp4"), 128, 96, tb, FPS)
    chosen = []
    for i in range(60):
        if i in (20, 40, 50):
            chosen.append(writer.speed_up())
        writer.write(picture(i, 128, 96), i * 3600, tb)
        file_writer.write(picture(i, 128, 96), i * 3600, tb)
    writer.close()
    assert chosen == ["superfast", "ultrafast", None]  # then there is no faster one
    assert file_writer.speed_up() is None  # a file's stream headers are written once
    file_writer.close()
    with av.open(str(playlist)) as container:
        pts = [frame.pts for frame in container.decode(video=0)]
    assert len(pts) == 60 and pts == sorted(set(pts))  # every frame, across both switches


def test_the_live_source_says_when_the_encoder_falls_behind_before_dropping():
    release = threading.Event()

    def frames() -> Iterator[Frame]:
        for i in range(12):
            yield Frame(i, np.zeros((2, 2, 3), np.uint8), i, Fraction(1, 25), i / 25)
            if i == 0:
                release.wait(10)  # until the output side has taken frame 0

    dropped_when_told: list[int] = []
    source = LiveSource(
        frames(), backlog=8, read_timeout=None,
        on_behind=lambda: dropped_when_told.append(source.dropped),
    )  # fmt: skip
    assert next(source.output_frames()).index == 0  # then the encoder is stuck
    release.set()  # and the frames pile up
    while not source.ended:
        time.sleep(0.01)
    assert dropped_when_told == [0] and source.dropped > 0  # told once, before the first drop


@pytest.mark.parametrize(("realtime", "speed"), [(False, 1.0), (True, 2.0)])
def test_a_live_output_is_paced_and_catches_up_with_a_live_source(
    tmp_path, monkeypatch, realtime, speed
):
    class Clock:  # the writer's time: sleeping moves it on
        now = 100.0

        def monotonic(self) -> float:
            return self.now

        def sleep(self, seconds: float) -> None:
            self.now += seconds

    clock = Clock()
    monkeypatch.setattr(video.writer, "time", clock)
    tb = Fraction(1, FPS)
    with VideoWriter(str(tmp_path / "cam.m3u8"), 64, 48, tb, FPS, realtime=realtime) as writer:
        for i in range(50):  # 2 s of video, handed over at once (a queue at start-up)
            writer.write(picture(i, 64, 48), i, tb)
    # A file played live goes out in real time; a live source's backlog at twice that.
    assert clock.now - 100.0 == pytest.approx(49 / FPS / speed)


def test_the_explainer_waits_while_the_encoder_is_far_behind():
    more = threading.Event()

    def frames() -> Iterator[Frame]:
        for i in range(8):
            yield Frame(i, np.zeros((2, 2, 3), np.uint8), i, Fraction(1, 25), i / 25)
            if i == 5:
                more.wait(10)

    source = LiveSource(frames(), backlog=8, read_timeout=None)
    output = source.output_frames()
    assert next(output).index == 0  # the encoder runs, then stalls: frames 1-5 wait for it
    while source.frames_in < 6:
        time.sleep(0.01)
    given: list[Frame | None] = []
    explainer = threading.Thread(target=lambda: given.append(source.newest_after(0)))
    explainer.start()
    explainer.join(0.5)
    assert explainer.is_alive() and source.holds == 1  # 5 waiting > half the backlog: held
    assert next(output).index == 1
    explainer.join(5)
    assert [f.index for f in given if f] == [5]  # 4 waiting: the newest frame goes out
    more.set()
    assert [f.index for f in output] == [2, 3, 4, 5, 6, 7] and source.dropped == 0


def test_the_encoder_takes_a_faster_preset_when_told(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="scorecam_stream")  # a run before may have set it
    tb = Fraction(1, 90000)
    writers: list[VideoWriter] = []

    def open_writer(image: np.ndarray) -> VideoWriter:
        writers.append(VideoWriter(str(tmp_path / "cam.m3u8"), 128, 96, tb, FPS))
        return writers[-1]

    behind = threading.Event()
    behind.set()  # as the live source does when frames pile up for the encoder
    items = [
        DrawItem(Frame(i, picture(i, 128, 96), i * 3600, tb, i / FPS), None, "") for i in range(10)
    ]
    encoder = Encoder(items, RenderOptions(), open_writer, speed_up=behind)
    encoder.finish()
    assert writers[0].preset == "superfast" and not behind.is_set()
    assert "x264 preset superfast now" in caplog.text
