"""Several live streams in one run: names, outputs, turns at the one model, streams that end."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest
from clips import SLOW, read_timing, udp_source
from helpers import SCRIPT, free_port, records, sigint_as_ctrl_c, value, wait_for_records

from scorecam_stream.batch import FairLock, plan_streams, stream_name
from scorecam_stream.cli import main
from scorecam_stream.config_batch import BatchConfig
from scorecam_stream.errors import ScoreCamError


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("udp://127.0.0.1:23000", "udp-23000"),
        ("udp://@:23001", "udp-23001"),
        ("rtsp://cam2/s", "cam2-s"),
        ("rtsp://user:secret@cam3.example.com:8554/live/main", "cam3.example.com-8554-live-main"),
        ("srt://0.0.0.0:9000?mode=listener", "srt-9000"),
        ("-", "stdin"),
    ],
)
def test_a_stream_is_named_after_its_host_port_and_path(url, name):
    assert stream_name(url) == name


def test_stream_outputs_go_to_the_directory_under_their_names(tmp_path):
    urls = ("udp://127.0.0.1:23000", "rtsp://cam2/s")
    batch = BatchConfig(urls, output_dir=str(tmp_path), jsonl_dir=str(tmp_path / "j"))
    jobs = plan_streams(urls, batch)
    assert [j.output for j in jobs] == [tmp_path / "udp-23000.m3u8", tmp_path / "cam2-s.m3u8"]
    assert [j.jsonl for j in jobs] == [tmp_path / "j/udp-23000.jsonl", tmp_path / "j/cam2-s.jsonl"]
    named = plan_streams(urls, BatchConfig(urls, output_dir=str(tmp_path), names=("a", "b")))
    assert [j.output.name for j in named] == ["a.m3u8", "b.m3u8"]


@pytest.mark.parametrize(
    ("urls", "names", "out", "message"),
    [
        (("udp://:1", "udp://127.0.0.1:1"), (), "o/", "both named 'udp-1': give each a --name"),
        (("udp://:1", "udp://:2"), ("a", "a"), "o/", "both named 'a'"),
        (("udp://:1", "udp://:2"), ("a",), "o/", "1 --name for 2 live inputs"),
        (("udp://:1", "udp://:2"), (), None, "need an output directory: -o DIR/"),
    ],
)
def test_stream_names_that_clash_or_miss_are_mistakes(urls, names, out, message):
    with pytest.raises(ScoreCamError, match=message):
        plan_streams(urls, BatchConfig(urls, output_dir=out, names=names))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["udp://127.0.0.1:1", "clip.mp4", "-o", "out/"], "read live and other inputs are files"),
        (["udp://127.0.0.1:1", "-o", "x.mp4", "--name", "a"], "--name is for several inputs"),
        (["udp://127.0.0.1:1", "udp://127.0.0.1:2", "-o", "o/", "--name", "a/b"], "file name"),
    ],
)
def test_stream_mistakes_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(b"")
    assert main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_fair_lock_serves_waiters_in_the_order_they_came():
    lock, order = FairLock(), []

    def take(name: str) -> None:
        with lock:
            order.append(name)

    threads = []
    with lock:  # held while B, then C, ask for it
        for name in "BC":
            thread = threading.Thread(target=take, args=(name,))
            thread.start()
            threads.append(thread)
            deadline = time.monotonic() + 10
            while lock._next < len(threads) + 1:  # its ticket taken: it waits in line
                assert time.monotonic() < deadline
                time.sleep(0.01)
    with lock:  # the holder asks again at once: behind B and C, not before them
        order.append("A again")
    for thread in threads:
        thread.join(5)
    assert order == ["B", "C", "A again"]


def _stream_run(tmp_path, urls: list[str], *extra: str) -> tuple[int, dict[str, tuple]]:
    """Run ``urls`` as streams a, b...; return (exit code, name -> (records, summary, frames))."""
    names = [chr(ord("a") + i) for i in range(len(urls))]
    out, jsonl = tmp_path / "out", tmp_path / "jsonl"
    flags = [f for name in names for f in ("--name", name)]
    code = main(
        [*urls, "-o", f"{out}/", "--jsonl", f"{jsonl}/", *flags, "--read-timeout", "1", *extra]
    )
    found = {}
    for name in names:
        if (jsonl / f"{name}.jsonl").exists():
            explained, summary = records(jsonl / f"{name}.jsonl")
            found[name] = (explained, summary, len(read_timing(out / f"{name}.m3u8")[1]))
    return code, found


@pytest.mark.slow  # two 4 s live sources
def test_two_live_streams_share_one_model_taking_turns(tmp_path):
    with udp_source(4.0) as (url_a, _, _), udp_source(4.0) as (url_b, _, _):
        code, found = _stream_run(tmp_path, [url_a, url_b], "--reconnect", "0", *SLOW)
    assert code == 0
    for explained, summary, frames in found.values():
        # Each its own real-time copy, records and summary line.
        assert summary["frames_in"] == summary["frames_written"] == frames > 0
        assert summary["frames_explained"] == len(explained) > 0
        assert summary["stopped_by"] == "read timeout"
    a, b = (found[n][1]["frames_explained"] for n in "ab")
    assert min(a, b) * 3 >= max(a, b)  # turns at the one model: neither starves


@pytest.mark.slow  # live sources of 1.5 s and 4 s, and one that cannot open
def test_a_stream_that_ends_or_fails_leaves_the_others_running(tmp_path, capsys):
    refused = "tcp://127.0.0.1:9"  # discard port: nothing listens, connection refused
    with udp_source(1.5) as (short, _, _), udp_source(4.0) as (long, _, _):
        code, found = _stream_run(tmp_path, [short, long, refused], "--reconnect", "0", *SLOW)
    assert code == 3  # one of three failed; the others were done
    assert set(found) == {"a", "b"}
    assert found["b"][1]["frames_in"] > found["a"][1]["frames_in"] * 1.5  # b went on after a
    err = capsys.readouterr().err
    assert "1 input(s) failed" in err and refused in err
    assert json.loads((tmp_path / "jsonl" / "b.jsonl").read_text().splitlines()[-1])["summary"]


@pytest.mark.slow  # two 4 s live sources, two Ray workers
def test_two_streams_share_two_ray_workers_and_one_metrics_port(tmp_path, last_scrape):
    port = free_port()
    metrics = ["--prometheus-port", str(port), "--prometheus-addr", "127.0.0.1"]
    ray = ["--workers", "2", "--read-timeout", "3", "--reconnect", "0"]
    with udp_source(4.0) as (url_a, _, _), udp_source(4.0) as (url_b, _, _):
        code, found = _stream_run(tmp_path, [url_a, url_b], *ray, *metrics, *SLOW)
    assert code == 0
    a, b = (found[n][1]["frames_explained"] for n in "ab")
    assert min(a, b) > 0 and min(a, b) * 3 >= max(a, b)
    # One port, each stream under its own label, ending as its own summary says.
    (final,) = last_scrape
    for name, url in (("a", url_a), ("b", url_b)):
        explained, summary, frames = found[name]
        assert summary["frames_in"] == summary["frames_written"] == frames > 0
        assert value(final, "scorecam_frames_explained_total", url) == len(explained)
        assert value(final, "scorecam_frames_written_total", url) == frames
        assert value(final, "scorecam_workers_alive", url) == 2


@pytest.mark.slow  # two 30 s live sources, stopped by Ctrl-C
def test_ctrl_c_stops_every_stream_and_each_finishes_its_outputs(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    with udp_source(30.0) as (url_a, _, _), udp_source(30.0) as (url_b, _, _):
        process = subprocess.Popen(
            [SCRIPT, url_a, url_b, "-o", f"{out}/", "--jsonl", f"{logs}/", *SLOW],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=sigint_as_ctrl_c,
        )
        try:
            for url in (url_a, url_b):
                jsonl = logs / f"{stream_name(url)}.jsonl"
                wait_for_records(process, tmp_path, count=1, timeout=90, live_jsonl=jsonl)
            process.send_signal(signal.SIGINT)
            _, err = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0, err
    for url in (url_a, url_b):
        name = stream_name(url)
        _, summary = records(logs / f"{name}.jsonl")
        assert summary["stopped_by"] == "signal"
        playlist = (out / f"{name}.m3u8").read_text()
        assert playlist.rstrip().endswith("#EXT-X-ENDLIST")  # closed, not cut off
        assert len(read_timing(out / f"{name}.m3u8")[1]) == summary["frames_written"] > 0
