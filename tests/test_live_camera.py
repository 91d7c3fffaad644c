"""A live worker for real cameras: outputs checked first, records visible as they go, restarts,
size changes and reconnects of the source.

Sources are synthetic MPEG-TS clips sent on 127.0.0.1 only (UDP, a TCP server of the test's
own) or through a pipe; each test is bounded to a few seconds of stream.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from clips import send_mpegts
from test_live import FPS, SCRIPT, SLOW, udp_source, wait_for_records

from scorecam_stream import video
from scorecam_stream.cli import main

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
            wait_for_records(jsonl, 2, time.monotonic() + 90)  # named, mid-run
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
