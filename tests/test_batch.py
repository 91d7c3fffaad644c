"""Many inputs in one run: expansion, naming, resume, partial failure, shared workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from clips import FAST, REPO, picture, text_file, write_frames
from helpers import assert_same_frames, sigint_as_ctrl_c

from scorecam_stream.batch import (
    SummaryWriter,
    VideoRecord,
    expand_inputs,
    plan_jobs,
    with_batch_defaults,
)
from scorecam_stream.cli import main, parse_command
from scorecam_stream.config_batch import BatchConfig
from scorecam_stream.errors import ScoreCamError
from scorecam_stream.video import probe


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def make_clips(directory: Path, counts: dict[str, int]) -> list[Path]:
    """Write one clip per name, each with its own pictures (so outputs cannot be mixed up)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, (name, count) in enumerate(counts.items()):
        path = directory / name
        write_frames(path, [picture(7 * offset + i) for i in range(count)])
        paths.append(path)
    return paths


def summary_of(path: Path) -> dict[str, dict]:
    """Return the --summary records by input name."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(
        set(r) == {"input", "output", "status", "frames", "explained", "seconds", "error"}
        for r in records
    )
    return {Path(r["input"]).name: r for r in records}


# --- inputs, names, options (no model) --------------------------------------------------------


def test_directories_and_globs_expand_sorted_without_outputs_or_hidden_files(tmp_path):
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    for name in ["b.mp4", "a.MKV", "notes.txt", ".hidden.mp4", "a.scorecam.mp4", "sub/c.mp4"]:
        (clips / name).write_bytes(b"x")
    assert expand_inputs([str(clips)]) == [str(clips / "a.MKV"), str(clips / "b.mp4")]
    assert expand_inputs([f"{clips}/*.mp4"]) == [str(clips / "b.mp4")]  # not its output
    assert expand_inputs([f"{clips}/**/*.mp4"]) == [str(clips / "b.mp4"), str(clips / "sub/c.mp4")]
    # As given: URLs, stdin, a missing file (it fails later, alone); each input once.
    given = ["udp://0.0.0.0:1234", "-", str(tmp_path / "gone.mp4")]
    assert expand_inputs(given) == given
    assert expand_inputs([str(clips / "b.mp4"), str(clips), f"{clips}/b.*"]) == [
        str(clips / "b.mp4"),
        str(clips / "a.MKV"),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScoreCamError, match="no videos in directory"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(ScoreCamError, match="no file matches"):
        expand_inputs([f"{clips}/*.webm"])


def test_outputs_are_named_after_each_input_and_collisions_are_refused(tmp_path):
    batch = BatchConfig(
        inputs=("x",), output_dir="out", maps_dir="maps", jsonl_dir="rec", preview_dir="pre"
    )
    jobs = plan_jobs(["x/a.mp4", "y/b.mkv", "z/cat.jpg"], batch)
    named = [(j.output, j.save_maps, j.jsonl, j.preview) for j in jobs[:2]]
    assert named == [
        tuple(
            map(Path, ("out/a.scorecam.mp4", "maps/a.maps.npz", "rec/a.jsonl", "pre/a.preview.png"))
        ),
        tuple(
            map(Path, ("out/b.scorecam.mp4", "maps/b.maps.npz", "rec/b.jsonl", "pre/b.preview.png"))
        ),
    ]
    assert jobs[2].output == Path("out/cat.scorecam.png")  # an image gives an image
    beside = plan_jobs(["x/a.mp4", "y/a.mp4"], BatchConfig(inputs=("x",)))
    assert [j.output for j in beside] == [Path("x/a.scorecam.mp4"), Path("y/a.scorecam.mp4")]
    with pytest.raises(ScoreCamError, match=r"x/a\.mp4 and y/a\.mkv would both write"):
        plan_jobs(["x/a.mp4", "y/a.mkv"], batch)
    with pytest.raises(ScoreCamError, match="would both write"):
        plan_jobs(["x/a.mp4", "x/a.mov"], BatchConfig(inputs=("x",)))  # beside, same stem


def test_which_command_lines_are_batches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("# clips of Monday\n\n  a.mp4  \nhttp://host/b.mp4\n")
    one = [["a.mp4"], ["a.mp4", "-o", "o.mp4"], ["udp://0.0.0.0:1", "-o", "dir/"], ["-"]]
    for argv in one:
        config, batch = parse_command(argv)
        assert batch is None and config.input == argv[0]
    config, batch = parse_command(["a.mp4", "b.mp4", "-o", "out/", "--jsonl", "dir"])
    assert batch is not None and batch.inputs == ("a.mp4", "b.mp4")
    assert (batch.output_dir, batch.jsonl_dir, config.output.jsonl) == ("out/", "dir", None)
    assert batch.inflight_videos(uses_ray=False) == 1
    _, batch = parse_command(["c.mp4", "--inputs", "list.txt", "--max-inflight-videos", "3"])
    assert batch.inputs == ("c.mp4", "a.mp4", "http://host/b.mp4")
    assert batch.max_inflight_videos == 3 and batch.output_dir is None
    for argv in (["dir"], ["*.mp4"], ["a.mp4", "-o", "dir"], ["a.mp4", "--summary", "s.jsonl"]):
        assert parse_command(argv)[1] is not None, argv
    config, batch = parse_command(["a.mp4", "b.mp4", "--workers", "2"])
    assert batch.inflight_videos(uses_ray=True) == 2
    assert with_batch_defaults(config, 2).distributed.shards_per_frame == 1
    assert with_batch_defaults(config, 1).distributed.shards_per_frame is None  # 1 video < 2
    given, _ = parse_command(["a.mp4", "b.mp4", "--workers", "2", "--shards-per-frame", "2"])
    assert with_batch_defaults(given, 5).distributed.shards_per_frame == 2
    alone, _ = parse_command(["a.mp4", "b.mp4"])
    assert with_batch_defaults(alone, 5) == alone  # in-process: no shards
    preset = tmp_path / "preset.yaml"
    preset.write_text("max_inflight_videos: 3\nbatch_size: 4\n")
    config, batch = parse_command(["a.mp4", "--config", str(preset)])  # single: not its concern
    assert batch is None and config.engine.batch_size == 4
    _, batch = parse_command(["a.mp4", "b.mp4", "--config", str(preset)])
    assert batch.max_inflight_videos == 3


def test_summary_keeps_finished_records_in_a_part_file_then_writes_them_in_input_order(tmp_path):
    path = tmp_path / "runs" / "s.jsonl"
    writer = SummaryWriter(str(path), ["a.mp4", "b.mp4", "c.mp4"])
    writer.add(VideoRecord("c.mp4", "out/c.scorecam.mp4", "done", 3, 3, 1.5))
    writer.add(VideoRecord("a.mp4", "out/a.scorecam.mp4", "failed", error="cannot read a.mp4"))
    part = tmp_path / "runs" / "s.jsonl.part"
    assert [json.loads(line)["input"] for line in part.read_text().splitlines()] == [
        "c.mp4",
        "a.mp4",
    ]  # as they finish, flushed: what a killed run leaves
    assert not path.exists()
    writer.close()
    assert not part.exists()
    assert list(summary_of(path)) == ["a.mp4", "c.mp4"]


BAD_BATCHES = [
    (["{a}", "{b}", "-o", "out.mp4"], "-o out.mp4: with several inputs, -o names a directory"),
    (["{a}", "{b}", "-o", "out/", "--save-maps", "m.npz"], "--save-maps m.npz: with several"),
    (["{a}", "udp://127.0.0.1:5000", "-o", "out/"], "udp://127.0.0.1:5000 is read live"),
    (["{a}", "{b}", "--max-inflight-videos", "0"], "--max-inflight-videos must be >= 1"),
    (["{a}", "--max-inflight-videos", "2"], "--max-inflight-videos is for several inputs"),
    (["{a}", "{b}", "--inputs", "nolist.txt"], "cannot read --inputs nolist.txt"),
    (["{a}", "{a2}"], "would both write"),
    (["{a}", "{b}", "--target", "zebra crossing"], "--target 'zebra crossing'"),
]


@pytest.mark.parametrize(("args", "message"), BAD_BATCHES, ids=[m for _, m in BAD_BATCHES])
def test_mistakes_that_stop_a_batch_are_one_line_exit_2(
    args, message, tmp_path, capsys, monkeypatch
):
    a, b = make_clips(tmp_path, {"a.mp4": 2, "b.mp4": 2})
    a2 = tmp_path / "a.mkv"
    a2.write_bytes(a.read_bytes())
    before = sorted(tmp_path.iterdir())
    paths = {"{a}": a, "{b}": b, "{a2}": a2}
    monkeypatch.chdir(tmp_path)
    assert run_cli(*[paths.get(arg, arg) for arg in args], *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scorecam-video: error:") and message in err and "\n" not in err
    assert sorted(tmp_path.iterdir()) == before  # nothing written, no directory made


# --- whole runs, in-process ---------------------------------------------------------------


def test_bad_inputs_among_good_ones_fail_alone_exit_3(tmp_path, capsys):
    good = make_clips(tmp_path / "in", {"one.mp4": 3, "two.mp4": 4})
    notes, missing = text_file(tmp_path / "in"), tmp_path / "in" / "missing.mp4"
    out, maps, summary = tmp_path / "out", tmp_path / "maps", tmp_path / "s.jsonl"
    args = [good[0], notes, missing, good[1], "-o", f"{out}/", "--save-maps", f"{maps}/"]
    code = run_cli(*args, "--summary", summary, *FAST)
    assert code == 3
    assert probe(str(out / "one.scorecam.mp4")).frame_count == 3
    assert probe(str(out / "two.scorecam.mp4")).frame_count == 4
    assert sorted(p.name for p in out.iterdir()) == ["one.scorecam.mp4", "two.scorecam.mp4"]
    assert np.load(maps / "two.maps.npz")["maps"].shape == (4, 64, 64)
    assert sorted(p.name for p in maps.iterdir()) == ["one.maps.npz", "two.maps.npz"]
    err = capsys.readouterr().err
    table = err[err.index("2 input(s) failed:") :].splitlines()
    assert table[1].split() == ["input", "reason"]
    assert table[2].split()[0] == str(notes) and "not a video" in table[2]
    assert table[3].split()[0] == str(missing) and "not found" in table[3]
    records = summary_of(summary)
    assert list(records) == ["one.mp4", "notes.mp4", "missing.mp4", "two.mp4"]  # input order
    assert [r["status"] for r in records.values()] == ["done", "failed", "failed", "done"]
    assert records["two.mp4"]["frames"] == records["two.mp4"]["explained"] == 4
    assert "not found" in records["missing.mp4"]["error"] and records["one.mp4"]["error"] is None
    assert not (tmp_path / "s.jsonl.part").exists()


def single_run(clip: Path, out: Path, maps: Path, *extra: object) -> None:
    assert run_cli(clip, "-o", out, "--save-maps", maps, *extra, *FAST) == 0


def assert_same_outputs(batch_out: Path, batch_maps: Path, single: dict[str, tuple[Path, Path]]):
    """Each clip's maps equal its single run's exactly, its video the same pictures."""
    for stem, (video, maps) in single.items():
        made = np.load(batch_maps / f"{stem}.maps.npz")
        want = np.load(maps)
        for key in ("maps", "targets", "pts_seconds"):
            np.testing.assert_array_equal(made[key], want[key])
        assert_same_frames(batch_out / f"{stem}.scorecam.mp4", video)


@pytest.mark.slow  # a batch and its single runs
def test_videos_in_flight_share_one_model_and_match_single_runs(tmp_path):
    """In-process, two videos at once take turns on the one model: same outputs as alone."""
    clips = make_clips(tmp_path / "in", {"a.mp4": 3, "b.mp4": 5, "c.mp4": 4})
    single = {}
    for clip in clips:
        single[clip.stem] = (tmp_path / f"{clip.stem}.mp4", tmp_path / f"{clip.stem}.npz")
        single_run(clip, *single[clip.stem])
    out, maps = tmp_path / "out", tmp_path / "maps"
    args = ["-o", f"{out}/", "--save-maps", f"{maps}/", "--max-inflight-videos", "2"]
    assert run_cli(tmp_path / "in", *args, *FAST) == 0  # a directory: its three clips
    assert_same_outputs(out, maps, single)


def test_directory_glob_and_list_in_one_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_clips(tmp_path / "day1", {"b.mp4": 2, "a.mp4": 2})
    (tmp_path / "day1" / "readme.txt").write_text("not an input")
    make_clips(tmp_path / "day2", {"c.mp4": 2, "d.mkv": 2})
    make_clips(tmp_path / "more", {"e.mp4": 2})
    Path("list.txt").write_text("# extra clips\n\nmore/e.mp4\nday1/a.mp4\n")
    args = ["day1", "day2/*.mp4", "--inputs", "list.txt", "-o", "out/", "--summary", "s.jsonl"]
    assert run_cli(*args, *FAST) == 0
    made = sorted(p.name for p in Path("out").iterdir())
    assert made == ["a.scorecam.mp4", "b.scorecam.mp4", "c.scorecam.mp4", "e.scorecam.mp4"]
    records = [json.loads(line) for line in Path("s.jsonl").read_text().splitlines()]
    # day1 sorted, then the glob's match, then the list (day1/a.mp4 already in: once).
    assert [r["input"] for r in records] == ["day1/a.mp4", "day1/b.mp4", "day2/c.mp4", "more/e.mp4"]
    assert {r["status"] for r in records} == {"done"}


@pytest.mark.slow  # a batch in a process, then again
def test_a_stopped_batch_resumes_where_it_stopped(tmp_path):
    """Ctrl-C after the first video: it is kept; the re-run skips it and makes the others."""
    first, middle, last = make_clips(tmp_path, {"a.mp4": 3, "b.mp4": 60, "c.mp4": 3})
    out, summary = tmp_path / "out", tmp_path / "s.jsonl"
    argv = [first, middle, last, "-o", f"{out}/", "--summary", summary, *FAST]
    command = [sys.executable, "-m", "scorecam_stream.cli", *map(str, argv)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_ctrl_c
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and run.poll() is None:
            if (out / "a.scorecam.mp4").exists():
                break
            time.sleep(0.05)
        assert run.poll() is None, "the batch ended before it could be stopped"
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, err
    assert "interrupted; the videos in progress not written" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.scorecam.mp4"]  # b: nothing half-made
    assert [r["status"] for r in summary_of(summary).values()] == ["done"]
    kept = out / "a.scorecam.mp4"
    before = (kept.read_bytes(), kept.stat().st_mtime_ns)

    assert run_cli(*argv) == 0
    assert (kept.read_bytes(), kept.stat().st_mtime_ns) == before  # skipped, untouched
    assert probe(str(out / "b.scorecam.mp4")).frame_count == 60
    assert probe(str(out / "c.scorecam.mp4")).frame_count == 3
    records = summary_of(summary)
    assert [r["status"] for r in records.values()] == ["skipped", "done", "done"]


# --- shared Ray workers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_clips_and_single_runs(tmp_path_factory):
    """Three clips and each one's single run with --workers 2."""
    root = tmp_path_factory.mktemp("three")
    clips = make_clips(root / "in", {"a.mp4": 3, "b.mp4": 4, "c.mp4": 2})
    single = {}
    for clip in clips:
        single[clip.stem] = (root / f"{clip.stem}.mp4", root / f"{clip.stem}.npz")
        single_run(clip, *single[clip.stem], "--workers", 2, "--shards-per-frame", 1)
    return clips, single


@pytest.mark.parametrize(
    "inflight",
    [
        pytest.param(["--max-inflight-videos", "1"], id="one"),
        pytest.param([], id="default"),
    ],
)
@pytest.mark.slow  # Ray workers
def test_three_clips_on_two_workers_match_three_single_runs(
    inflight, three_clips_and_single_runs, tmp_path
):
    """One batch, the workers started once: each output equals that clip's single run.

    Whole frames per worker is the batch's default (3 videos, 2 workers): the single runs ask
    for it. The default (two videos at once) calls the Ray explainer from two threads.
    """
    clips, single = three_clips_and_single_runs
    out, maps = tmp_path / "out", tmp_path / "maps"
    args = ["-o", f"{out}/", "--save-maps", f"{maps}/", "--workers", "2", *inflight]
    assert run_cli(*clips, *args, *FAST) == 0
    assert_same_outputs(out, maps, single)


@pytest.mark.slow  # Ray workers and tasks
def test_video_tasks_run_each_video_in_a_ray_task(
    three_clips_and_single_runs, tmp_path, monkeypatch
):
    """--video-tasks: each video's loop is a Ray task (not this process), its frames explained by
    the shared workers; outputs equal the single runs; a bad input is that task's failure."""
    clips, single = three_clips_and_single_runs

    def not_here(*_args, **_kwargs):
        raise AssertionError("a video ran in the driver")

    monkeypatch.setattr("scorecam_stream.batch.runner.run", not_here)  # the tasks import their own
    monkeypatch.chdir(tmp_path)  # relative paths: the tasks' working directory is not this one
    bad = text_file(tmp_path).name
    inputs = [os.path.relpath(clip) for clip in clips]
    args = [*inputs, bad, "-o", "out/", "--save-maps", "maps/", "--summary", "s.jsonl"]
    code = run_cli(*args, "--workers", "2", "--video-tasks", *FAST)
    assert code == 3
    assert_same_outputs(tmp_path / "out", tmp_path / "maps", single)
    records = summary_of(tmp_path / "s.jsonl")
    assert records[clips[0].name]["output"] == "out/a.scorecam.mp4"  # as the user named it
    assert [records[c.name]["status"] for c in clips] == ["done"] * 3
    assert [records[c.name]["frames"] for c in clips] == [3, 4, 2]
    assert records[bad]["status"] == "failed" and records[bad]["error"]


def test_video_tasks_need_ray_workers(tmp_path, capsys):
    clips = make_clips(tmp_path, {"a.mp4": 2, "b.mp4": 2})
    assert run_cli(*clips, "-o", f"{tmp_path}/out/", "--video-tasks", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "scorecam-video: error: --video-tasks runs videos as Ray tasks: add --workers, --gpus or "
        "--address"
    )
    assert not (tmp_path / "out").exists()
