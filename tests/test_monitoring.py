"""Prometheus metrics of a live run (``--prometheus-port``), scraped over HTTP on 127.0.0.1.

The source is a synthetic MPEG-TS clip sent over UDP on the loopback address (as in
test_live.py); the metrics endpoint is read with urllib, a real HTTP client, during the run and
once more as the run ends, just before its server closes (no sleep decides what is seen).
"""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from clips import FAST, SLOW, udp_source
from helpers import free_port, parse, records, scrape, value

from scorecam_stream import monitoring, video
from scorecam_stream.cli import main
from scorecam_stream.config import MonitoringConfig

COUNTERS = ("frames_in", "frames_written", "frames_explained", "frames_dropped", "reconnects")


@contextmanager
def scraping(port: int) -> Iterator[list[dict]]:
    """Scrape the port every 0.1 s in a thread (refused connections skipped); yield the scrapes."""
    scrapes: list[dict] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.1):
            try:
                scrapes.append(scrape(port))
            except (urllib.error.URLError, ConnectionError):
                continue  # not listening (yet, or any more)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield scrapes
    finally:
        stop.set()
        thread.join(timeout=10)


@pytest.mark.slow  # a 3 s live source and a whole run
def test_a_live_run_serves_its_counts_and_they_end_as_its_summary(tmp_path, last_scrape):
    out, jsonl = tmp_path / "cam.mp4", tmp_path / "cam.jsonl"
    port = free_port()
    with udp_source(3.0) as (url, _, _sent), scraping(port) as scrapes:
        args = [url, "-o", str(out), "--jsonl", str(jsonl), "--read-timeout", "1"]
        metrics = ["--prometheus-port", str(port), "--prometheus-addr", "127.0.0.1"]
        assert main([*args, "--reconnect", "0", *metrics, *SLOW]) == 0
    # During the run: every metric has the stream label, and the counters only grow.
    assert len(scrapes) >= 2
    for samples in scrapes:
        for name in COUNTERS:
            value(samples, f"scorecam_{name}_total", url)
        value(samples, "scorecam_workers_alive", url)
        value(samples, "scorecam_latency_seconds_count", url)
    frames_in = [value(s, "scorecam_frames_in_total", url) for s in scrapes]
    written = [value(s, "scorecam_frames_written_total", url) for s in scrapes]
    assert frames_in == sorted(frames_in) and written == sorted(written)
    assert len(set(frames_in)) >= 2  # seen growing while frames came
    # At the end: the counters are the jsonl summary's counts, the histogram holds every map.
    explained, summary = records(jsonl)
    (final,) = last_scrape
    for name in COUNTERS:
        assert value(final, f"scorecam_{name}_total", url) == summary[name], name
    assert summary["frames_written"] > 0 and summary["frames_explained"] == len(explained) > 0
    assert value(final, "scorecam_latency_seconds_count", url) == len(explained)
    total_s = sum(r["latency_ms"] for r in explained) / 1000
    assert value(final, "scorecam_latency_seconds_sum", url) == pytest.approx(total_s, abs=0.01)
    assert value(final, "scorecam_workers_alive", url) == 1  # in-process: one worker
    with pytest.raises(urllib.error.URLError):  # the port is free again
        scrape(port)


@pytest.mark.slow  # a live source and two Ray workers
def test_with_ray_workers_the_gauge_counts_them(tmp_path, last_scrape):
    jsonl = tmp_path / "ray.jsonl"
    port = free_port()
    with udp_source(4.0) as (url, _, _sent):
        args = [url, "-o", str(tmp_path / "ray.mp4"), "--jsonl", str(jsonl), "--workers", "2"]
        metrics = ["--prometheus-port", str(port), "--prometheus-addr", "127.0.0.1"]
        assert main([*args, "--read-timeout", "3", "--reconnect", "0", *metrics, *SLOW]) == 0
    _, summary = records(jsonl)
    (final,) = last_scrape
    assert value(final, "scorecam_workers_alive", url) == 2
    for name in COUNTERS:
        assert value(final, f"scorecam_{name}_total", url) == summary[name], name


def test_one_board_serves_each_stream_its_own_values():
    """Two streams on one board (one port): each one's counts and latencies under its label."""
    cams = ("udp://127.0.0.1:23000", "rtsp://cam2/s")
    counts = {
        cams[0]: monitoring.RunCounts(10, 9, 3, 1, 0, 2),
        cams[1]: monitoring.RunCounts(20, 18, 5, 0, 2, 2),
    }
    latencies = {cams[0]: [0.04, 0.3], cams[1]: [1.5, 2.0, 7.0]}
    config = MonitoringConfig(prometheus_port=free_port(), prometheus_addr="127.0.0.1")
    board, server = monitoring.serve_metrics(config, cams)
    try:
        assert board.labels == cams
        for cam in cams:
            board[cam].track(lambda cam=cam: counts[cam])
            for seconds in latencies[cam]:
                board[cam].observe_latency(seconds)
        for samples in (parse(board.text()), scrape(server.port)):
            for cam in cams:
                for name in COUNTERS:
                    expected = getattr(counts[cam], name)
                    assert value(samples, f"scorecam_{name}_total", cam) == expected, name
                alive = value(samples, "scorecam_workers_alive", cam)
                assert alive == counts[cam].workers_alive
                assert value(samples, "scorecam_latency_seconds_count", cam) == len(latencies[cam])
                total = value(samples, "scorecam_latency_seconds_sum", cam)
                assert total == pytest.approx(sum(latencies[cam]))
                below_1s = samples["scorecam_latency_seconds_bucket"][
                    (("le", "1.0"), ("stream", cam))
                ]
                assert below_1s == sum(s <= 1.0 for s in latencies[cam])
            for name in samples:  # nothing without a stream label
                assert all(dict(labels).get("stream") in cams for labels in samples[name]), name
    finally:
        server.close()


def test_a_board_stays_as_one_run_was_and_refuses_equal_labels():
    board = monitoring.MetricsBoard(["cam"])
    samples = parse(board.text())
    expected = {f"scorecam_{name}_total" for name in COUNTERS} | {"scorecam_workers_alive"}
    assert expected <= set(samples)
    assert all(value(samples, name, "cam") == 0 for name in expected)  # zero until tracked
    with pytest.raises(ValueError, match="'cam'"):
        monitoring.MetricsBoard(["cam", "other", "cam"])
    with pytest.raises(ValueError):
        monitoring.MetricsBoard([])


def test_the_stream_label_leaves_out_a_urls_credentials():
    label = monitoring.stream_label
    assert label("rtsp://admin:secret@cam.local:554/s1") == "rtsp://cam.local:554/s1"
    assert label("udp://127.0.0.1:5000?fifo_size=100") == "udp://127.0.0.1:5000?fifo_size=100"
    assert label("-") == "-"
    assert label("/dev/video0") == "/dev/video0"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prometheus-port", "70000"], "--prometheus-port must be a TCP port, 1 to 65535"),
        (["--prometheus-port", "0"], "--prometheus-port must be a TCP port, 1 to 65535"),
        (["--prometheus-port", "http"], "--prometheus-port: invalid int value"),
        (["--prometheus-port", "9100", "--prometheus-addr", ""], "--prometheus-addr must be"),
    ],
)
def test_a_bad_port_is_a_one_line_error(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["udp://127.0.0.1:9", "-o", "cam.mp4", *args, *SLOW]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_a_port_in_use_fails_before_the_input_opens(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    opened: list[str] = []

    def reader(path: str, *_: object) -> None:
        opened.append(path)
        raise AssertionError("the input was opened before the metrics port was taken")

    monkeypatch.setattr(video, "VideoReader", reader)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = ["--prometheus-port", str(port), "--prometheus-addr", "127.0.0.1"]
        assert main(["udp://127.0.0.1:9", "-o", "cam.mp4", *args, *SLOW]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--prometheus-port {port}: cannot listen on 127.0.0.1" in err
    assert opened == []


def test_a_file_run_serves_no_metrics_and_says_so(clip, tmp_path, capsys):
    port = free_port()
    args = [str(clip), "-o", str(tmp_path / "out.mp4"), "--max-frames", "2"]
    loud = [a for a in FAST if a != "--quiet"]  # the warning is the point
    with scraping(port) as scrapes:
        assert main([*args, "--prometheus-port", str(port), *loud]) == 0
    assert "metrics are served for live runs only" in capsys.readouterr().err
    assert scrapes == []
