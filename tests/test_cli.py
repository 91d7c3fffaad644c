"""scorecam-video end to end: outputs, options, timing, audio, bad input and output rules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import clips
import cv2
import numpy as np
import pytest
import torch
from clips import (
    CLIP_FRAMES,
    FAST,
    FPS,
    REPO,
    H,
    W,
    audio_span,
    make_clip,
    read_timing,
)
from helpers import wait_for_records

from scorecam_stream import ScoreCAM, load_model
from scorecam_stream import stages as stages_module
from scorecam_stream.cli import main, parse_config
from scorecam_stream.video import probe, read_frames


def run_cli(*args: object) -> int:
    return main([str(a) for a in args])


def engine_maps(path: Path, **options) -> tuple[np.ndarray, np.ndarray]:
    """Return (maps (N, S, S), targets (N,)) computed directly with the engine."""
    loaded = load_model("efficientnet_lite0", input_size=64)
    engine = ScoreCAM(loaded.model, loaded.layer, batch_size=8, max_channels=8, **options)
    x = torch.stack([loaded.preprocess(f.image) for f in read_frames(str(path))])
    result = engine(x)
    return result.maps.numpy(), result.targets.numpy()


@pytest.mark.slow  # a whole run
def test_round_trip_keeps_frames_timing_size_and_audio(clip, tmp_path):
    out = tmp_path / "out.mp4"
    maps = tmp_path / "maps.npz"
    assert run_cli(clip, "-o", out, "--save-maps", maps, *FAST) == 0
    info_in, info_out = probe(str(clip)), probe(str(out))
    assert (info_out.width, info_out.height) == (W, H)
    assert info_out.frame_count == info_in.frame_count == 12
    tb_in, pts_in = read_timing(clip)
    tb_out, pts_out = read_timing(out)
    assert [p * tb_out for p in pts_out] == [p * tb_in for p in pts_in]
    assert audio_span(out)[2] == pytest.approx(audio_span(clip)[2], abs=0.05)
    saved = np.load(maps)
    assert sorted(saved.files) == ["maps", "pts_seconds", "targets"]
    assert saved["maps"].shape == (12, 64, 64) and saved["maps"].dtype == np.float32
    np.testing.assert_allclose(saved["pts_seconds"], [float(p * tb_in) for p in pts_in])
    expected, targets = engine_maps(clip, channels_last=True)
    np.testing.assert_array_equal(saved["targets"], targets)
    np.testing.assert_allclose(saved["maps"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # a whole run
def test_variable_frame_rate_is_kept(tmp_path):
    clip = tmp_path / "vfr.mp4"
    pts = [0, 1, 2, 5, 6, 10, 11, 12]
    make_clip(clip, pts=pts, time_base=Fraction(1, FPS))
    out = tmp_path / "vfr.out.mp4"
    assert run_cli(clip, "-o", out, *FAST) == 0
    tb_in, pts_in = read_timing(clip)
    tb_out, pts_out = read_timing(out)
    assert [p * tb_out for p in pts_out] == [p * tb_in for p in pts_in]


@pytest.mark.slow  # whole runs
def test_default_output_beside_input_and_overwrite_rule(clip, tmp_path):
    local = tmp_path / "c.mp4"
    shutil.copy(clip, local)
    assert run_cli(local, "--max-frames", 2, *FAST) == 0
    out = tmp_path / "c.scorecam.mp4"
    assert out.is_file()
    before = out.read_bytes()
    assert run_cli(local, "--max-frames", 3, *FAST) == 2  # exists, no --overwrite
    assert out.read_bytes() == before
    assert run_cli(local, "--max-frames", 3, "--overwrite", *FAST) == 0
    assert probe(str(out)).frame_count == 3


@pytest.mark.slow  # a whole run
def test_topk_every_and_records(clip, tmp_path):
    maps, records = tmp_path / "m.npz", tmp_path / "r.jsonl"
    args = ["--topk", 3, "--every", 4, "--save-maps", maps, "--jsonl", records]
    assert run_cli(clip, "-o", tmp_path / "o.mp4", *args, *FAST) == 0
    saved = np.load(maps)
    assert saved["maps"].shape == (3, 3, 64, 64) and saved["targets"].shape == (3, 3)
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["index"] for r in lines] == list(range(12))
    assert [r["map_of_frame"] for r in lines] == [0] * 4 + [4] * 4 + [8] * 4
    assert all(r["milliseconds"] == 0 for r in lines if r["index"] % 4)
    assert all(r["milliseconds"] > 0 for r in lines if r["index"] % 4 == 0)
    first = lines[0]
    assert len(first["targets"]) == 3 and first["target"] == first["targets"][0]
    assert first["probabilities"] == sorted(first["probabilities"], reverse=True)
    assert {"pts_seconds", "name", "probability", "skipped"} <= set(first)
    expected, _ = engine_maps(clip)
    np.testing.assert_allclose(saved["maps"][1, 0], expected[4], rtol=1e-3, atol=1e-4)


@pytest.mark.slow  # several whole runs
def test_fixed_and_dominant_targets(clip, tmp_path):
    out = tmp_path / "o.mp4"
    for target, check in [
        ("285", lambda t: (t == 285).all()),
        ("Egyptian cat", lambda t: (t == 285).all()),
        ("dominant", lambda t: len(set(t.tolist())) == 1),
    ]:
        maps = tmp_path / "m.npz"
        code = run_cli(
            clip,
            "-o",
            out,
            "--overwrite",
            "--target",
            target,
            "--save-maps",
            maps,
            "--overwrite",
            *FAST,
        )
        assert code == 0
        assert check(np.load(maps)["targets"])
    _, top1 = engine_maps(clip)
    dominant = np.load(maps)["targets"][0]
    assert dominant == np.bincount(top1).argmax()


@pytest.mark.slow  # whole runs
def test_layout_window_and_preview(clip, tmp_path):
    out, preview = tmp_path / "o.mp4", tmp_path / "p.png"
    args = ["--layout", "side-by-side", "--start", 0.25, "--end", 0.75, "--preview", preview]
    assert run_cli(clip, "-o", out, *args, *FAST) == 0
    info = probe(str(out))
    assert (info.width, info.height) == (2 * W, H)
    assert info.frame_count == 6  # frames with 0.25 <= t < 0.75 at 12 fps
    first = next(read_frames(str(out)))
    assert first.seconds == pytest.approx(0.0, abs=1e-3)  # the window starts at 0
    with av.open(str(preview)) as sheet:
        assert sheet.streams.video[0].codec_context.name == "png"


def test_still_image_gives_annotated_png(tmp_path):
    from skimage import data

    image = tmp_path / "cat.png"
    with av.open(str(image), "w", format="image2", container_options={"update": "1"}) as o:
        s = o.add_stream("png", pix_fmt="rgb24")
        s.width, s.height = 451, 300
        o.mux(s.encode(av.VideoFrame.from_ndarray(data.chelsea(), format="rgb24")))
        o.mux(s.encode(None))
    assert run_cli(image, *FAST) == 0
    out = tmp_path / "cat.scorecam.png"
    frame = next(read_frames(str(out)))
    assert frame.image.shape == (300, 451, 3)
    assert not np.array_equal(frame.image, data.chelsea())


def test_config_file_and_flag_precedence(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: efficientnet_lite0\nbatch-size: 4\nalpha: 0.3\n")
    parsed = parse_config(["in.mp4", "--config", str(config), "--alpha", "0.7"])
    assert parsed.model.spec == "efficientnet_lite0" and parsed.engine.batch_size == 4
    assert parsed.output.alpha == 0.7
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        assert parse_config(["in.mp4", "--config", str(preset)]).input == "in.mp4"


def test_model_and_variant_flags_reach_the_config(tmp_path):
    flags = "--variant pytorch-grad-cam --mean 0.5,0.5,0.5 --std 0.25,0.5,1 --fit pad"
    parsed = parse_config(["in.mp4", *flags.split()])
    assert parsed.model.mean == (0.5, 0.5, 0.5) and parsed.model.std == (0.25, 0.5, 1.0)
    assert parsed.model.fit == "pad" and parsed.engine.variant == "pytorch-grad-cam"
    assert parsed.engine.engine_kwargs()["variant"] == "pytorch-grad-cam"
    config = tmp_path / "c.yaml"
    config.write_text("mean: [0.1, 0.2, 0.3]\nstd: 0.4,0.5,0.6\nfit: crop\n")
    parsed = parse_config(["in.mp4", "--config", str(config)])
    assert parsed.model.mean == (0.1, 0.2, 0.3) and parsed.model.std == (0.4, 0.5, 0.6)
    assert parsed.model.fit == "crop"
    defaults = parse_config(["in.mp4"])
    assert defaults.model.mean is None and defaults.engine.variant == "article"


def test_version_answers_without_importing_torch():
    code = (
        "import sys\n"
        "from scorecam_stream.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'av' not in sys.modules, 'av imported'\n"
        "import scorecam_stream\n"
        "assert scorecam_stream.ScoreCAM.__name__ == 'ScoreCAM' and 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "scorecam-video 0.1.0"


def test_distributed_flags_reach_the_config():
    flags = "--gpus 3 --max-inflight-frames 5 --shards-per-frame 6 --startup-timeout 9"
    flags += " --max-shard-retries 0 --threads-per-worker 2 --address ray://head:10001"
    dist = parse_config(["in.mp4", *flags.split()]).distributed
    assert (dist.gpus, dist.max_inflight_frames, dist.shards_per_frame) == (3, 5, 6)
    assert (dist.startup_timeout, dist.max_shard_retries, dist.threads_per_worker) == (9, 0, 2)
    assert dist.address == "ray://head:10001" and dist.num_workers == 3
    assert parse_config(["in.mp4", "--gpus", "3"]).model.device == "cuda"


def test_ray_address_comes_from_environment_only_when_distributing(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert parse_config(["in.mp4"]).distributed.address is None
    assert parse_config(["in.mp4", "--workers", "2"]).distributed.address == "auto"


BAD_INPUTS = {
    "missing": lambda tmp, clip: tmp / "nope.mp4",
    "empty": lambda tmp, clip: clips.empty_file(tmp),
    "not a video": lambda tmp, clip: clips.text_file(tmp),
    "truncated mp4": clips.truncated_mp4,
    "no video stream": lambda tmp, clip: clips.audio_only(tmp),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_one_line_errors(case, clip, tmp_path, capsys):
    path = BAD_INPUTS[case](tmp_path, clip)
    before = set(tmp_path.iterdir())
    assert run_cli(path, *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scorecam-video: error:") and "\n" not in err
    assert "Traceback" not in err
    assert set(tmp_path.iterdir()) == before  # nothing written


BAD_OPTIONS = [
    (["--model", "resnet9000"], "unknown model"),
    (["--layer", "blocks.99"], "no layer"),
    (["--batch-size", "-3"], "batch-size"),
    (["--alpha", "1.5"], "alpha"),
    (["--every", "0"], "every"),
    (["--topk", "2", "--target", "dominant"], "topk"),
    (["--target", "zebra crossing"], "target"),
    (["--target", "5000"], "target"),
    (["--colormap", "rainbowz"], "colormap"),
    (["--encoder", "nope264"], "unknown --encoder 'nope264'"),
    (["--encoder", "aac"], "not a video encoder"),
    (["--layout", "grid"], "layout"),
    (["--dtype", "int4"], "dtype"),
    (["--start", "2", "--end", "1"], "end"),
    (["--batch-size", "many"], "batch-size"),
    (["--no-such-flag"], "unrecognized"),
    (["-o", "/nonexistent-dir/out.mp4"], "does not exist"),
    (["-o", "out.avi"], "out.avi"),
    (["--save-maps", "maps.txt"], "npz"),
    (["--gpus", "1", "--workers", "2"], "not both"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--workers", "2", "--threads-per-worker", "0"], "--threads-per-worker must be >= 1"),
    (["--workers", "2", "--max-shard-retries", "-1"], "--max-shard-retries must be >= 0"),
    (["--workers", "2", "--max-inflight-frames", "0"], "--max-inflight-frames must be >= 1"),
    (["--workers", "2", "--shards-per-frame", "0"], "--shards-per-frame must be >= 1"),
    (["--workers", "2", "--startup-timeout", "0"], "--startup-timeout must be > 0"),
    (["--workers", "2", "--address", "headnode"], "--address must be auto, HOST:PORT"),
    (["--workers", "2", "--address", "127.0.0.1:1"], "cannot connect to the Ray cluster"),
    (["--config", "/nonexistent.yaml"], "config file"),
    (["--variant", "torchcam"], "--variant must be article or pytorch-grad-cam"),
    (["--variant", "pytorch-grad-cam", "--score", "softmax"], "--variant pytorch-grad-cam sets"),
    (["--variant", "pytorch-grad-cam", "--no-channel-softmax"], "--variant pytorch-grad-cam"),
    (["--fit", "stretch"], "--fit must be squash, pad or crop"),
    (["--mean", "0.5,0.5"], "--mean"),
    (["--std", "0.5,0,0.5"], "--std must be > 0"),
]


@pytest.mark.parametrize(
    ("args", "message"), BAD_OPTIONS, ids=[a[0][0] + a[0][-1] for a in BAD_OPTIONS]
)
def test_bad_options_are_one_line_errors(args, message, clip, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(clip, *FAST, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scorecam-video: error:") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_config_file(tmp_path, clip, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("batch_size: [1, 2\n")
    assert run_cli(clip, "--config", config, *FAST) == 2
    config.write_text("colour: red\n")
    assert run_cli(clip, "--config", config, *FAST) == 2
    assert "unknown setting" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["device: 5", "save_maps: 5", "crf: high"])
def test_wrongly_typed_config_values_are_one_line_errors(setting, tmp_path, clip, capsys):
    config = tmp_path / "typed.yaml"
    config.write_text(setting + "\n")
    crf = FAST.index("--crf")  # the flag would override the file's crf
    assert run_cli(clip, "--config", config, *FAST[:crf], *FAST[crf + 2 :]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scorecam-video: error: invalid setting") and "\n" not in err


def test_gpus_default_the_device_to_cuda_at_construction():
    """--gpus with the default (or an explicit cpu) device means CUDA; a given cuda:N stays."""
    assert parse_config(["in.mp4", "--gpus", "1"]).model.device == "cuda"
    assert parse_config(["in.mp4", "--gpus", "1", "--device", "cpu"]).model.device == "cuda"
    assert parse_config(["in.mp4", "--gpus", "1", "--device", "cuda:1"]).model.device == "cuda:1"
    assert parse_config(["in.mp4"]).model.device == "cpu"


@pytest.mark.slow  # a whole run
def test_broken_stream_gives_the_decoded_frames(tmp_path, capsys):
    whole, cut = tmp_path / "whole.ts", tmp_path / "cut.ts"
    rng = np.random.default_rng(0)
    with av.open(str(whole), "w") as output:
        stream = output.add_stream("libx264", rate=FPS, width=W, height=H)
        for i in range(24):
            frame = av.VideoFrame.from_ndarray(
                rng.integers(0, 256, (H, W, 3), np.uint8), format="rgb24"
            )
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            output.mux(stream.encode(frame))
        output.mux(stream.encode(None))
    # Cut inside a frame's data (TS packets are 188 bytes): the decoder sees a damaged frame.
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 7 // 10 // 188 * 188 + 100])
    out = tmp_path / "cut.out.mp4"
    assert main([str(cut), "-o", str(out), *FAST[:-1]]) == 0  # not --quiet: warnings shown
    frames = probe(str(out)).frame_count
    assert 3 < frames < 24
    assert "warning" in capsys.readouterr().err.lower()


def _fail_at_frame(monkeypatch, error: type[BaseException], at: int = 3) -> None:
    real = stages_module.render_frame
    calls = []

    def render(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise error("stop here")
        return real(*args, **kwargs)

    monkeypatch.setattr(stages_module, "render_frame", render)


@pytest.mark.slow  # whole runs
@pytest.mark.parametrize(("error", "code"), [(KeyboardInterrupt, 130), (RuntimeError, None)])
def test_failed_or_interrupted_run_leaves_nothing(error, code, clip, tmp_path, monkeypatch):
    out, maps, records = tmp_path / "o.mp4", tmp_path / "m.npz", tmp_path / "r.jsonl"
    out.write_bytes(b"precious")
    _fail_at_frame(monkeypatch, error)
    args = [clip, "-o", out, "--overwrite", "--save-maps", maps, "--jsonl", records, *FAST]
    if code is None:
        with pytest.raises(error):
            run_cli(*args)
    else:
        assert run_cli(*args) == code
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]


@pytest.mark.slow  # runs in a process
def test_console_script(clip, tmp_path):
    script = Path(sys.executable).parent / "scorecam-video"
    version = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "scorecam-video" in version.stdout
    out = tmp_path / "o.mp4"
    done = subprocess.run(
        [script, str(clip), "-o", str(out), "--max-frames", "2", *FAST],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert done.returncode == 0, done.stderr
    assert probe(str(out)).frame_count == 2
    bad = subprocess.run([script, str(tmp_path / "missing.mp4")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


@pytest.mark.slow  # a run in a process
def test_a_killed_run_leaves_no_file_behind(tmp_path):
    """SIGKILL (the OOM killer, Ray ending its driver): no clean-up runs, and nothing is left."""
    clip = tmp_path / "long.mp4"
    make_clip(clip, count=96)
    script = Path(sys.executable).parent / "scorecam-video"
    outputs = ["-o", "o.mp4", "--save-maps", "m.npz", "--jsonl", "r.jsonl", "--preview", "p.png"]
    run = subprocess.Popen([script, clip.name, *outputs, *FAST], cwd=tmp_path)
    try:
        wait_for_records(run, tmp_path)  # mid-run: a frame is done, the run is not
        run.kill()
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]


@pytest.mark.slow  # whole runs
@pytest.mark.parametrize("target", ["top1", "dominant"])
def test_the_input_is_opened_once(clip, tmp_path, monkeypatch, target):
    """Info, frames and audio come from one session (a live source has no second chance)."""
    opened: list[str] = []
    real_open = av.open

    def counting_open(file, mode="r", *args, **kwargs):
        if mode == "r":
            opened.append(str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    out = tmp_path / "once.mp4"
    assert run_cli(clip, "-o", out, "--target", target, *FAST) == 0
    assert opened == [str(clip)]
    monkeypatch.undo()
    assert probe(str(out)).has_audio
    assert audio_span(out)[2] == pytest.approx(audio_span(clip)[2], abs=0.05)


def _drawn_heats(monkeypatch) -> list[np.ndarray]:
    """Record the display-scaled map of every frame the pipeline renders."""
    real, heats = stages_module.render_frame, []

    def render(frame, heat, label, options, colours=None):
        heats.append(np.array(heat))
        return real(frame, heat, label, options, colours)

    monkeypatch.setattr(stages_module, "render_frame", render)
    return heats


def _expected_heats(maps: np.ndarray, targets: np.ndarray, smooth: float, scale: str) -> list:
    """The plain reference: moving average restarted on a target change, then the scale."""
    out, shown, previous, scales = [], None, None, {}
    for heat, target in zip(maps.astype(np.float64), targets.tolist(), strict=True):
        shown = heat if previous != target else smooth * shown + (1 - smooth) * heat
        previous = target
        if scale == "frame":
            span = shown.max() - shown.min()
            out.append((shown - shown.min()) / span if span > 0 else np.zeros_like(shown))
        else:  # one running scale per target, decay 0.9 per map of that target
            peak = shown.max()
            scales[target] = peak if target not in scales else max(peak, 0.9 * scales[target])
            out.append(np.clip(shown / scales[target], 0, 1) if scales[target] > 0 else shown * 0)
    return out


@pytest.mark.slow  # whole runs
@pytest.mark.parametrize("scale", ["running", "frame"])
def test_smooth_and_scale_give_the_drawn_maps(scale, clip, tmp_path, monkeypatch):
    heats = _drawn_heats(monkeypatch)
    maps = tmp_path / "m.npz"
    args = ["--smooth", 0.6, "--scale", scale, "--save-maps", maps, "--target", "top1"]
    assert run_cli(clip, "-o", tmp_path / "o.mp4", *args, *FAST) == 0
    saved = np.load(maps)
    targets = saved["targets"]
    expected = _expected_heats(saved["maps"], targets, 0.6, scale)
    assert len(heats) == len(expected) == CLIP_FRAMES
    for drawn, wanted in zip(heats, expected, strict=True):
        np.testing.assert_allclose(drawn, wanted, rtol=1e-4, atol=1e-5)
    # The smoothing really is on: the drawn maps differ from each frame's own scaled map.
    own = _expected_heats(saved["maps"], targets, 0.0, scale)
    assert max(float(np.abs(h - o).max()) for h, o in zip(heats, own, strict=True)) > 1e-3


@pytest.mark.slow  # a whole run
def test_target_change_restarts_the_average_and_uses_that_class_scale(tmp_path, monkeypatch):
    """Frames alternating between two pictures of different top-1 classes (as on a real clip)."""
    from skimage import data

    heats = _drawn_heats(monkeypatch)
    clip = tmp_path / "two.mp4"
    cat = cv2.resize(data.chelsea(), (64, 48), interpolation=cv2.INTER_AREA)
    cup = cv2.resize(data.coffee(), (64, 48), interpolation=cv2.INTER_AREA)
    clips.write_frames(clip, [cat, cat, cat, cup, cup, cat])
    maps = tmp_path / "m.npz"
    args = ["--smooth", 0.5, "--save-maps", maps]
    assert run_cli(clip, "-o", tmp_path / "o.mp4", *args, *FAST) == 0
    saved = np.load(maps)
    targets = saved["targets"]
    assert len(set(targets.tolist())) >= 2, targets  # the clip does change class
    expected = _expected_heats(saved["maps"], targets, 0.5, "running")
    for drawn, wanted in zip(heats, expected, strict=True):
        np.testing.assert_allclose(drawn, wanted, rtol=1e-4, atol=1e-5)
    change = int(np.nonzero(targets[1:] != targets[:-1])[0][0]) + 1
    assert float(heats[change].max()) == pytest.approx(1.0)  # its own evidence, full range
