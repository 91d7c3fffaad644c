"""Live sources end to end: a synthetic clip sent as MPEG-TS over UDP on 127.0.0.1 at real-time
pace (or through a pipe), explained in live mode with a deliberately slow small model.

Each test is bounded in time (a few seconds of stream) and sends only to the loopback address.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from clips import LIVE_FPS as FPS
from clips import SLOW, free_udp_port, read_timing, send_mpegts, udp_source
from helpers import SCRIPT, records, sigint_as_ctrl_c, wait_for_records

from scorecam_stream.cli import main
from scorecam_stream.live_source import LiveSource
from scorecam_stream.video import Frame, probe


@pytest.mark.slow  # a 4 s live source
def test_live_udp_source_gives_a_real_time_copy_with_the_newest_maps(tmp_path):
    out, jsonl = tmp_path / "live.mp4", tmp_path / "live.jsonl"
    with udp_source(4.0) as (url, _, sent):
        args = [url, "-o", str(out), "--jsonl", str(jsonl), "--read-timeout", "1"]
        code = main([*args, "--reconnect", "0", *SLOW])
    assert code == 0
    explained, summary = records(jsonl)
    time_base, pts = read_timing(out)
    # Every frame that arrived is written (the first ones, before the stream's first keyframe
    # reached the reader, never arrive), with its own timestamp: a continuous real-time copy.
    assert summary["frames_in"] == summary["frames_written"] == len(pts)
    assert sent[0] // 2 <= len(pts) <= sent[0]
    steps = {round((b - a) * time_base * FPS, 6) for a, b in itertools.pairwise(pts)}
    assert steps == {1.0}
    # The explainer takes the newest frame when free: some frames, not all, are explained.
    assert 0 < len(explained) == summary["frames_explained"] < len(pts)
    indices = [r["index"] for r in explained]
    assert indices == sorted(set(indices))
    assert sum(r["skipped_frames"] + 1 for r in explained) == indices[-1] + 1
    assert explained[0]["skipped_frames"] == explained[0]["index"]
    # Latency: from the frame's arrival, so it includes the frame's own explanation.
    assert all(r["latency_ms"] >= r["milliseconds"] for r in explained)
    # The first map's latency is start-up (the model loads meanwhile); p50 is the steady state.
    latencies = [r["latency_ms"] for r in explained]
    assert summary["startup_ms"] == latencies[0]
    if len(latencies) > 1:
        assert summary["latency_p50_ms"] == pytest.approx(np.percentile(latencies[1:], 50), 1e-3)
    assert summary["stopped_by"] == "read timeout"


@pytest.mark.slow  # a 5 s live source
def test_duration_stops_after_that_much_source_and_metrics_score_live_maps(tmp_path):
    out = tmp_path / "short.mp4"
    jsonl = tmp_path / "short.jsonl"
    with udp_source(5.0) as (url, _, _sent):
        args = [url, "-o", str(out), "--duration", "1", "--jsonl", str(jsonl), "--metrics"]
        code = main([*args, *SLOW])
    assert code == 0
    explained, summary = records(jsonl)
    assert summary["stopped_by"] == "duration"
    # --metrics in live mode: each explained frame is scored, the means close the jsonl.
    assert all({"average_drop", "insertion", "deletion", "increase"} <= set(r) for r in explained)
    assert summary["scorecam"]["frames"] == len(explained) > 0
    assert summary["frames_written"] == probe(str(out)).frame_count == FPS


@pytest.mark.slow  # a live source and a whole run
def test_no_live_reads_a_udp_source_like_a_file(tmp_path):
    out, jsonl = tmp_path / "all.mp4", tmp_path / "all.jsonl"
    fast = [*SLOW[:5], "8", *SLOW[6:]]  # 8 channels: keeps up with most of the stream
    with udp_source(2.0) as (url, _, sent):
        code = main(
            [url, "-o", str(out), "--no-live", "--read-timeout", "1", "--jsonl", str(jsonl), *fast]
        )
    assert code == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sent[0] // 2 <= len(lines) == probe(str(out)).frame_count
    assert all(r["map_of_frame"] == r["index"] for r in lines)  # every frame explained


@pytest.mark.slow  # a 3 s live source
def test_hls_output_is_closed_and_its_segments_decode(tmp_path):
    playlist = tmp_path / "hls" / "live.m3u8"
    playlist.parent.mkdir()
    with udp_source(3.0) as (url, _, _sent):
        args = [url, "-o", str(playlist), "--hls-time", "1", "--read-timeout", "1"]
        code = main([*args, "--reconnect", "0", *SLOW])
    assert code == 0
    lines = playlist.read_text().splitlines()
    assert lines[0] == "#EXTM3U" and lines[-1] == "#EXT-X-ENDLIST"
    segments = [line for line in lines if line and not line.startswith("#")]
    assert len(segments) >= 2
    frames = 0
    for name in segments:
        with av.open(str(playlist.parent / name)) as container:
            frames += sum(1 for _ in container.decode(video=0))
    assert frames > 2 * FPS
    assert not [p for p in playlist.parent.iterdir() if ".tmp" in p.name]
    # An existing playlist is not replaced without --overwrite.
    clip = tmp_path / "in.ts"
    send_mpegts(str(clip), 0.4, FPS, realtime=False)
    assert main([str(clip), "-o", str(playlist), *SLOW]) == 2


@pytest.mark.slow  # a live run in a process
def test_standard_input_is_read_live(tmp_path):
    source = tmp_path / "in.ts"
    frames = send_mpegts(str(source), 2.0, FPS, realtime=False)
    out, jsonl = tmp_path / "piped.mp4", tmp_path / "piped.jsonl"
    with source.open("rb") as stdin:
        done = subprocess.run(
            [SCRIPT, "-", "-o", out, "--jsonl", jsonl, *SLOW],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    _, summary = records(jsonl)
    assert summary["live"] and summary["frames_written"] == frames
    assert probe(str(out)).frame_count == frames


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow  # a 30 s live source
def test_sigint_finishes_the_output_and_memory_stays_flat(tmp_path):
    out, jsonl = tmp_path / "stopped.mp4", tmp_path / "stopped.jsonl"
    with udp_source(30.0) as (url, stop, _sent):
        process = subprocess.Popen(
            [SCRIPT, url, "-o", out, "--jsonl", jsonl, *SLOW],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=sigint_as_ctrl_c,
        )
        try:
            wait_for_records(process, tmp_path, count=2, timeout=90, live_jsonl=jsonl)
            early = _rss_kib(process.pid)
            wait_for_records(process, tmp_path, count=6, timeout=60, live_jsonl=jsonl)
            late = _rss_kib(process.pid)
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
        stop.set()
    assert process.returncode == 0, err
    assert late - early < 40 * 1024, (early, late)  # no growth with the stream's length
    _, summary = records(jsonl)
    assert summary["stopped_by"] == "signal"
    assert probe(str(out)).frame_count == summary["frames_written"] > FPS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stopped.jsonl", "stopped.mp4"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-option", "novalue"], "KEY=VALUE"),
        (["--read-timeout", "0"], "--read-timeout"),
        (["--duration", "-1"], "--duration"),
        (["--hls-time", "0"], "--hls-time"),
        (["--reconnect", "-1"], "--reconnect must be"),
        (["--reconnect", "two"], "--reconnect: invalid int"),
        (["--reconnect-delay", "0"], "--reconnect-delay must be"),
        (["--reconnect-delay", "nan"], "--reconnect-delay must be"),
        (["-o", "ftp://127.0.0.1/x.ts"], "cannot stream to"),
        (["--input-format", "nosuchformat"], "cannot read"),
    ],
)
def test_bad_live_options_are_one_line_errors(tmp_path, capsys, monkeypatch, args, message):
    clip = tmp_path / "in.ts"
    send_mpegts(str(clip), 0.4, FPS, realtime=False)
    monkeypatch.chdir(tmp_path)
    assert main([str(clip), *args, *SLOW]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ts"]


@pytest.mark.slow  # Ray workers
def test_live_with_ray_workers_splits_each_frame(tmp_path):
    out, jsonl = tmp_path / "ray.mp4", tmp_path / "ray.jsonl"
    with udp_source(6.0) as (url, _, sent):
        code = main(
            [url, "-o", str(out), "--jsonl", str(jsonl), "--read-timeout", "3", "--workers", "2",
             "--reconnect", "0", *SLOW]
        )  # fmt: skip
    assert code == 0
    explained, summary = records(jsonl)
    assert summary["frames_written"] == probe(str(out)).frame_count >= sent[0] // 2
    assert 0 < len(explained) < summary["frames_written"]
    assert all(r["latency_ms"] >= r["milliseconds"] for r in explained)


@pytest.mark.slow  # a live source and a receiver
def test_udp_output_is_a_stream_a_receiver_can_decode(tmp_path):
    clip = tmp_path / "in.ts"
    sent = send_mpegts(str(clip), 1.0, FPS, realtime=False)
    port = free_udp_port()
    received: list[int] = []

    def receive() -> None:
        with (
            av.open(f"udp://127.0.0.1:{port}", timeout=(60, 15)) as container,
            contextlib.suppress(av.FFmpegError),  # the read timeout ends the stream
        ):
            for _ in container.decode(video=0):
                received.append(1)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    time.sleep(0.5)  # the receiver listens before the first packet goes out
    fast = [*SLOW[:5], "8", *SLOW[6:]]
    assert main([str(clip), "-o", f"udp://127.0.0.1:{port}", *fast]) == 0
    receiver.join(timeout=60)
    assert len(received) == sent


@pytest.mark.slow  # a live run in a process
def test_a_receiver_that_goes_away_is_one_line_and_exit_2(tmp_path):
    clip = tmp_path / "in.ts"
    send_mpegts(str(clip), 4.0, FPS, realtime=False)
    writer = subprocess.Popen(
        [SCRIPT, str(clip), "-o", "-", *SLOW], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert writer.stdout is not None
    assert writer.stdout.read(188 * 20)  # some MPEG-TS packets arrive, then the reader leaves
    writer.stdout.close()
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 2
    assert err.decode().count("\n") == 1 and "cannot write -" in err.decode()


# --- the live source alone: hand-over rules, without video or model ----------------------------


def _frames(count: int, step: float = 0.04, block_after: threading.Event | None = None):
    """Yield ``count`` tiny frames ``step`` seconds apart in stream time (as fast as asked)."""
    for i in range(count):
        image = np.zeros((2, 2, 3), np.uint8)
        yield Frame(i, image, i, Fraction(1, 25), i * step, (), time.monotonic())
    if block_after is not None:
        block_after.wait()  # a source that stops sending without closing


def _drain_when_ended(source: LiveSource, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while not source.ended and time.monotonic() < deadline:
        time.sleep(0.01)
    return [f.index for f in source.output_frames()]


def test_live_source_hands_the_newest_frame_to_the_explainer_and_every_frame_to_the_output():
    source = LiveSource(_frames(10), backlog=100, read_timeout=None)
    written = _drain_when_ended(source)
    assert written == list(range(10)) and source.frames_in == 10 and source.dropped == 0
    newest = source.newest_after(0)
    assert newest is not None and newest.index == 9  # the newest, never an older one
    assert source.newest_after(10) is None  # ended: nothing newer will come


def test_live_source_drops_the_oldest_output_frames_past_its_backlog():
    source = LiveSource(_frames(10), backlog=3, read_timeout=None)
    assert _drain_when_ended(source) == [7, 8, 9]
    assert source.dropped == 7


def test_live_source_duration_and_stall():
    source = LiveSource(_frames(50, step=0.1), backlog=100, read_timeout=None, duration=1.0)
    assert _drain_when_ended(source) == list(range(10))
    assert source.end_reason == "duration"
    release = threading.Event()
    stalled = LiveSource(_frames(3, block_after=release), backlog=100, read_timeout=0.2)
    try:
        assert list(f.index for f in stalled.output_frames()) == [0, 1, 2]  # ends by itself
        assert stalled.end_reason == "read timeout"
    finally:
        release.set()
