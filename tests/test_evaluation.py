"""--metrics / --baseline gradcam end to end: jsonl keys and summary, values recomputed directly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clips import FAST, make_clip
from conftest import make_tiny

from scorecam_stream import load_model
from scorecam_stream.cli import main
from scorecam_stream.evaluation import METRIC_KEYS, Evaluator, FrameScorer
from scorecam_stream.gradcam import GradCAM
from scorecam_stream.metrics import average_drop_increase, insertion_deletion, stability
from scorecam_stream.records import FrameResult
from scorecam_stream.video import read_frames

STEPS = 6


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    make_clip(path, count=6)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_and_check(
    clip: Path, tmp_path: Path, frames: int, *extra: str, worker_threads: int | None = None
) -> dict:
    """Run --metrics --baseline gradcam; check every record against a direct computation.

    Return the summary line's dict.
    """
    jsonl, maps = tmp_path / "r.jsonl", tmp_path / "m.npz"
    code = main(
        [str(clip), "-o", str(tmp_path / "o.mp4"), "--jsonl", str(jsonl), "--save-maps",
         str(maps), "--metrics", "--baseline", "gradcam", "--metric-steps", str(STEPS),
         "--max-frames", str(frames), *extra, *FAST]
    )  # fmt: skip
    assert code == 0
    lines = read_jsonl(jsonl)
    records, last = lines[:-1], lines[-1]
    assert len(records) == frames and list(last) == ["summary"]
    # Recompute every record's values directly from the saved maps and the same model input.
    loaded = load_model("efficientnet_lite0", input_size=64)
    x = torch.stack([loaded.preprocess(f.image) for f in read_frames(str(clip))])[:frames]
    saved = np.load(maps)
    score_maps, targets = torch.from_numpy(saved["maps"]), torch.from_numpy(saved["targets"])
    # One frame at a time and with the workers' threads, as they compute them: another batch
    # size or thread count takes other kernels.
    gradcam = GradCAM(loaded.model, loaded.layer)
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads or threads)
    try:
        grad_maps = torch.cat(
            [gradcam(x[i : i + 1], targets[i : i + 1]).maps for i in range(frames)]
        )
    finally:
        torch.set_num_threads(threads)
    for name, m in (("scorecam", score_maps), ("gradcam", grad_maps)):
        drop, inc = average_drop_increase(loaded.model, x, m, targets)
        ins, dele = insertion_deletion(loaded.model, x, m, targets, steps=STEPS)
        got = [r if name == "scorecam" else r["gradcam"] for r in records]
        # Score-CAM's maps are the saved ones: exact. Grad-CAM's are recomputed here (other
        # threads, kernels), and its maps, bilinear from 2x2 at 64 px, are full of near-ties:
        # float noise reorders blocks of pixels in the ranking (seen: up to 0.015 on one
        # deletion AUC of a Ray worker's map). The bound still catches a wrong map or target.
        atol = 2e-5 if name == "scorecam" else 0.03
        for key, values in zip(METRIC_KEYS, (drop, inc, ins, dele), strict=True):
            np.testing.assert_allclose(
                [g[key] for g in got], values.numpy(), atol=atol, err_msg=f"{name} {key}"
            )
        summary = last["summary"][name]
        assert summary["frames"] == frames
        for key in METRIC_KEYS:  # the summary's means are the records' means
            assert summary[key] == pytest.approx(np.mean([g[key] for g in got]), abs=1e-6)
        assert summary["ad_percent"] == pytest.approx(100 * summary["average_drop"], abs=1e-3)
        assert summary["ai_percent"] == pytest.approx(100 * summary["increase"], abs=1e-3)
        expected = stability(m, targets)
        assert summary["stability_pairs"] == expected["pairs"]
        for key in ("correlation", "iou"):
            close = pytest.approx(expected[key], abs=1e-5 if name == "scorecam" else 2e-2)
            assert summary[f"stability_{key}"] == close
    assert all(r["gradcam"]["milliseconds"] > 0 for r in records)
    assert last["summary"]["frames"] == last["summary"]["explained"] == frames
    return last["summary"]


@pytest.mark.slow  # a whole run with metrics and Grad-CAM
def test_metrics_and_gradcam_baseline_write_keys_and_summary(clip, tmp_path, capsys):
    run_and_check(clip, tmp_path, 6)
    table = capsys.readouterr().out
    assert "AD %" in table and "scorecam" in table and "gradcam" in table


@pytest.mark.slow  # a Ray worker
def test_ray_workers_run_the_metric_passes(clip, tmp_path, monkeypatch):
    """With --workers the metric passes run on the workers: none runs in this process."""

    def not_here(*_args, **_kwargs):
        raise AssertionError("a metric pass ran in the driver")

    monkeypatch.setattr(FrameScorer, "__call__", not_here)  # the Ray workers are other processes
    run_and_check(
        clip, tmp_path, 3, "--workers", "1", "--threads-per-worker", "1", worker_threads=1
    )


@pytest.mark.slow  # a whole run with metrics
def test_reused_frames_carry_their_maps_metrics(clip, tmp_path):
    jsonl = tmp_path / "r.jsonl"
    args = [str(clip), "-o", str(tmp_path / "o.mp4"), "--jsonl", str(jsonl), "--every", "2"]
    assert main([*args, "--metrics", "--metric-steps", "4", *FAST]) == 0
    lines = read_jsonl(jsonl)
    records, summary = lines[:-1], lines[-1]["summary"]
    for r in records:
        source = records[r["map_of_frame"]]
        assert all(r[key] == source[key] for key in METRIC_KEYS)
        assert "gradcam" not in r
    assert summary["explained"] == summary["scorecam"]["frames"] == 3
    assert summary["frames"] == 6 and "gradcam" not in summary


@pytest.mark.slow  # two whole runs
def test_without_metrics_nothing_changes(clip, tmp_path, capsys):
    jsonl = tmp_path / "r.jsonl"
    assert main([str(clip), "-o", str(tmp_path / "o.mp4"), "--jsonl", str(jsonl), *FAST]) == 0
    lines = read_jsonl(jsonl)
    assert len(lines) == 6 and all("average_drop" not in r and "summary" not in r for r in lines)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--baseline", "lime"], "--baseline must be gradcam"), (["--metric-steps", "0"], "steps")],
)
def test_bad_metric_options_are_one_line_errors(args, message, clip, tmp_path, capsys):
    assert main([str(clip), "-o", str(tmp_path / "o.mp4"), *args, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def result_of(scorer: FrameScorer, x: torch.Tensor, map_: torch.Tensor, target: int):
    """Return a FrameResult of one frame as a worker gives it: scored by ``scorer``."""
    return FrameResult(
        index=0,
        maps=map_[None].numpy(),
        targets=np.array([target]),
        probs=np.array([0.5], np.float32),
        skipped=0,
        seconds=0.01,
        scores=scorer(x, map_, target),
    )


def test_evaluator_streams_the_batch_metrics(images):
    model = make_tiny()
    maps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([4, 4, 4])
    scorer = FrameScorer(model, model.features[3], steps=5, batch_size=4, baseline="gradcam")
    evaluator = Evaluator(baseline="gradcam")
    records = [evaluator.add(result_of(scorer, images[i], maps[i], 4)) for i in range(3)]
    ins, dele = insertion_deletion(model, images, maps, targets, steps=5)
    np.testing.assert_allclose([r["deletion"] for r in records], dele.numpy(), atol=1e-6)
    summary = evaluator.summary()
    expected = stability(maps, targets)
    assert summary["scorecam"]["stability_pairs"] == 2
    assert summary["scorecam"]["stability_correlation"] == pytest.approx(
        expected["correlation"], abs=1e-5
    )
    grad = GradCAM(model, model.features[3])(images, targets).maps
    assert summary["gradcam"]["stability_iou"] == pytest.approx(
        stability(grad, targets)["iou"], abs=1e-5
    )
    assert summary["scorecam"]["insertion"] == pytest.approx(float(ins.mean()), abs=1e-5)
    unscored = dataclasses.replace(result_of(scorer, images[0], maps[0], 4), scores=None)
    with pytest.raises(RuntimeError, match="not scored"):
        evaluator.add(unscored)  # an explainer whose workers were started without metrics
