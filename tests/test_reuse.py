"""Temporal reuse (``--fidelity``): exact where it must be, fewer passes where frames move."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import seeded_frames
from skimage import data

from scorecam_stream import reuse
from scorecam_stream.cli import main
from scorecam_stream.config import EngineConfig, ModelConfig
from scorecam_stream.models import resize_frame
from scorecam_stream.records import FrameResult, FrameTask
from scorecam_stream.reuse import ReuseOptions, StreamState, correlation
from scorecam_stream.workers import LocalExplainer, Worker

# An inner layer of the offline model: 40 channels at 6 x 6, so a frame is 40 passes.
MODEL = ModelConfig(spec="efficientnet_lite0", input_size=48, layer="blocks.2")
ENGINE = EngineConfig(batch_size=16)


@pytest.fixture(scope="module")
def worker() -> Worker:
    return Worker(MODEL, ENGINE)


def drifting(count: int, seed: int = 3) -> list[torch.Tensor]:
    """Return ``count`` model inputs: one scene, a little different each frame (noise drift)."""
    base = seeded_frames(1, 48, seed=seed)[0]
    g = torch.Generator().manual_seed(seed)
    frames, x = [], base
    for _ in range(count):
        frames.append(x)
        x = x + 0.04 * torch.randn(x.shape, generator=g)
    return frames


def explain(
    worker: Worker, frames: list[torch.Tensor], options: ReuseOptions | None, fixed=None
) -> list[FrameResult]:
    items = [(i, FrameTask(i, x, fixed)) for i, x in enumerate(frames)]
    out = [r for _, r in LocalExplainer(worker).explain(items, options)]
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def live_channels(worker: Worker, x: torch.Tensor) -> int:
    _, _, view = worker.view("probe", x, None, 1)
    return int(view.live.sum())


def test_fidelity_one_is_the_exact_path(worker):
    frames = drifting(3)
    exact = explain(worker, frames, None)
    same = explain(worker, frames, ReuseOptions(fidelity=1.0))
    for a, b in zip(exact, same, strict=True):
        assert np.array_equal(a.maps, b.maps) and np.array_equal(a.targets, b.targets)
        assert b.passes == live_channels(worker, frames[a.index]) and b.reused == 0
        assert not b.keyframe and b.fidelity is None


def test_still_video_needs_no_pass_after_the_first_frame_and_is_exact(worker):
    frames = [drifting(1)[0]] * 5
    exact = explain(worker, frames, None)
    still = explain(worker, frames, ReuseOptions(fidelity=0.9, keyframe_interval=2))
    live = live_channels(worker, frames[0])
    assert [r.passes for r in still] == [live, 0, 0, 0, 0]
    assert [r.reused for r in still] == [0, live, live, live, live]
    assert still[0].keyframe and not any(r.keyframe for r in still[1:])
    for a, b in zip(exact, still, strict=True):
        np.testing.assert_array_equal(a.maps, b.maps)


def test_moving_frames_reuse_some_channels_and_keyframes_are_exact(worker):
    frames = drifting(7)
    exact = explain(worker, frames, None)
    options = ReuseOptions(fidelity=0.5, keyframe_interval=3)
    reused = explain(worker, frames, options)
    live = [live_channels(worker, x) for x in frames]
    assert [r.passes + r.reused for r in reused] == live  # every live channel, one way or other
    keyframes = [r.index for r in reused if r.keyframe]
    assert keyframes == [0, 3, 6]
    for r in reused:
        if r.keyframe:
            # Every pass in one batch, as the exact run (a measured keyframe too): bit-equal.
            np.testing.assert_array_equal(r.maps, exact[r.index].maps)
            assert r.passes == live[r.index]
        else:
            assert 0 < r.passes < live[r.index]  # two rounds of a sixteenth, by priority
    measured = [r.fidelity for r in reused if r.fidelity is not None]
    assert len(measured) == 2 and all(-1 <= f <= 1 for f in measured)  # not on the first frame
    # Reuse is close to exact on these small moves, and not identical (something was reused).
    corr = [
        correlation(torch.from_numpy(a.maps[0]), torch.from_numpy(b.maps[0]))
        for a, b in zip(exact, reused, strict=True)
    ]
    assert min(corr) > 0.9
    assert not all(np.array_equal(a.maps, b.maps) for a, b in zip(exact, reused, strict=True))


def photo(name: str, shift: int = 0) -> torch.Tensor:
    """Return a scikit-image photo as a 48 x 48 uint8 frame (S, S, 3), panned by ``shift``."""
    image = getattr(data, name)()[:, shift : shift + 300]
    return torch.from_numpy(resize_frame(image, 48, "squash"))


def test_a_scene_cut_recomputes_every_channel(worker):
    frames = [photo("chelsea", s) for s in (0, 4, 8)] + [photo("coffee")]
    out = explain(worker, frames, ReuseOptions(fidelity=0.5, keyframe_interval=100))
    exact = explain(worker, frames[3:], None)[0]
    assert not out[1].keyframe and not out[2].keyframe
    assert out[3].keyframe and out[3].passes == live_channels(worker, frames[3])
    assert out[3].fidelity is None  # the cache held another scene: nothing to measure
    np.testing.assert_array_equal(out[3].maps, exact.maps)


def test_a_new_target_class_reuses_the_cached_logits_of_every_class(worker):
    frames = [drifting(1)[0]] * 3
    top = explain(worker, frames[:1], None)[0]
    other = (int(top.targets[0]) + 1) % 1000
    # Frame 2 asks for another class than frames 0-1: no pass, and its exact map.
    items = [
        (0, FrameTask(0, frames[0])),
        (1, FrameTask(1, frames[1])),
        (2, FrameTask(2, frames[2], (other,))),
    ]
    out = [r for _, r in LocalExplainer(worker).explain(items, ReuseOptions(fidelity=0.9))]
    assert [r.passes for r in out][1:] == [0, 0] and int(out[2].targets[0]) == other
    exact = explain(worker, frames[:1], None, fixed=(other,))[0]
    np.testing.assert_array_equal(out[2].maps, exact.maps)


def run_state(worker: Worker, frames: list[torch.Tensor], options: ReuseOptions) -> list[float]:
    """Return the state's tolerance after each frame."""
    state = StreamState(worker.engine.weighting, options)
    tolerances = []
    for i, x in enumerate(frames):
        targets, _, view = worker.view(("tolerance", i), x, None, 1)
        plan = state.plan(view, targets)
        while plan.channels.numel():
            state.absorb(plan, worker.channel_logits(("tolerance", i), x, plan.channels))
        state.finish(plan)
        tolerances.append(state.tolerance)
    return tolerances


def test_the_controller_follows_the_measured_fidelity(worker, monkeypatch):
    frames = drifting(5)
    options = ReuseOptions(fidelity=0.99, keyframe_interval=2)
    first = options.first_tolerance
    assert first == pytest.approx(0.0025)  # a quarter of the allowed error
    monkeypatch.setattr(reuse, "correlation", lambda a, b: 0.9)  # short of 0.99: more passes
    assert run_state(worker, frames, options) == [first, first, first / 2, first / 2, first / 4]
    monkeypatch.setattr(reuse, "correlation", lambda a, b: 0.999)  # comfortably above: fewer
    more = [first, first, first * 1.5, first * 1.5, first * 2.25]
    assert run_state(worker, frames, options) == pytest.approx(more)
    monkeypatch.setattr(reuse, "correlation", lambda a, b: 0.993)  # just above: as it is
    assert run_state(worker, frames, options) == [first] * 5


def test_the_budget_picks_the_channels_that_moved(worker):
    x = drifting(1)[0]
    state = StreamState(worker.engine.weighting, ReuseOptions(fidelity=0.9, chunk=1.0))
    targets, _, view = worker.view("pick0", x, None, 1)
    plan = state.plan(view, targets)
    state.absorb(plan, worker.channel_logits("pick0", x, plan.channels))
    state.finish(plan)
    # The same frame, with a few channels' activations changed: only those are recomputed,
    # though a round may take every channel.
    live = view.live.nonzero().flatten()
    moved = live[:3]
    acts = view.activations.clone()
    acts[moved] = acts[moved].flip(-1)
    changed = reuse.FrameView(
        acts, view.lows, view.highs, view.logits, view.zero_logits, view.pooled, view.size
    )
    plan = state.plan(changed, targets)
    assert set(plan.channels.tolist()) <= set(moved.tolist()) and plan.channels.numel() > 0


def test_a_round_takes_turns_between_weight_and_a_score_that_may_switch(worker):
    """The channels that weigh most in the map go first, but a channel whose cached score is
    low and could jump (its masked input sits near a class boundary) gets the next turn."""
    x = drifting(1)[0]
    targets, _, view = worker.view("turn0", x, None, 1)
    live = view.live.nonzero().flatten()
    two = ReuseOptions(fidelity=0.9, chunk=2 / len(live))  # a round of 2 passes
    state = StreamState(worker.engine.weighting, two)
    plan = state.plan(view, targets)
    classes = view.logits.numel()
    # Made-up cached results: every channel sure of the target (softmax ~1), but one unsure.
    logits = torch.zeros(plan.channels.numel(), classes)
    logits[:, int(targets[0])] = 30.0
    moved = live[:4]
    unsure = int(moved[-1])
    row = int((plan.channels == unsure).nonzero())
    logits[row, int(targets[0])] = math.log(0.25 * (classes - 1))  # softmax 0.2
    state.absorb(plan, logits)
    state.finish(plan)
    acts = view.activations.clone()
    acts[moved] = acts[moved].flip(-1)
    changed = reuse.FrameView(
        acts, view.lows, view.highs, view.logits, view.zero_logits, view.pooled, view.size
    )
    plan = state.plan(changed, targets)
    first = plan.channels.tolist()
    assert len(first) == 2 and unsure in first  # last by weight, first by its chance to switch
    assert set(first) - {unsure} <= set(moved[:-1].tolist())  # and the weightiest moved one


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5", "nan"])
def test_fidelity_outside_0_1_is_a_one_line_error(value, clip, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code = main([str(clip), "-o", str(out), "--fidelity", value, "--model", "efficientnet_lite0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--fidelity" in err
    assert not out.exists()


def test_fidelity_with_max_channels_is_a_one_line_error(clip, tmp_path, capsys):
    code = main(
        [str(clip), "-o", str(tmp_path / "o.mp4"), "--fidelity", "0.9", "--max-channels", "8"]
    )
    assert code == 2 and "--max-channels" in capsys.readouterr().err


def test_records_and_summary_say_what_reuse_did(clip, tmp_path):
    jsonl = tmp_path / "run.jsonl"
    args = [str(clip), "-o", str(tmp_path / "out.mp4"), "--model", "efficientnet_lite0"]
    args += [
        "--input-size",
        "48",
        "--layer",
        "blocks.2",
        "--fidelity",
        "0.9",
        "--jsonl",
        str(jsonl),
    ]
    args += ["--every", "2", "--quiet"]
    assert main(args) == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    records, summary = lines[:-1], lines[-1]["summary"]
    explained = [r for r in records if r["map_of_frame"] == r["index"]]
    shown = [r for r in records if r["map_of_frame"] != r["index"]]
    assert len(explained) == len(shown) == len(records) // 2
    assert explained[0]["keyframe"] and explained[0]["reused"] == 0 and explained[0]["passes"] > 0
    assert all(r["passes"] == 0 and not r["keyframe"] and r["fidelity"] is None for r in shown)
    assert all(r["passes"] + r["reused"] > 0 for r in explained)
    passes = sum(r["passes"] for r in explained)
    exact = sum(r["passes"] + r["reused"] for r in explained)
    assert summary["passes_per_frame"] == round(passes / len(explained), 3)
    assert summary["passes_share"] == round(passes / exact, 4)
    measured = [r["fidelity"] for r in explained if r["fidelity"] is not None]
    if measured:
        assert summary["fidelity_min"] == round(min(measured), 5)
    else:
        assert summary["fidelity_min"] is None


def test_a_frame_runs_rounds_until_its_map_settles(worker, monkeypatch):
    frames = drifting(4)  # noise drift: every live channel moves
    options = ReuseOptions(fidelity=0.99, keyframe_interval=16)
    live = [live_channels(worker, x) for x in frames]
    monkeypatch.setattr(reuse, "correlation", lambda a, b: 0.9999)  # each round barely moves it
    calm = explain(worker, frames, options)
    assert [r.keyframe for r in calm] == [True, False, False, False]  # every 4th at first
    # The least: min_rounds (2) rounds of a sixteenth of the live channels.
    assert [r.passes for r in calm[1:]] == [2 * math.ceil(n / 16) for n in live[1:]]
    monkeypatch.setattr(reuse, "correlation", lambda a, b: 0.9)  # each round moves the map
    moved = explain(worker, frames, options)
    assert [r.keyframe for r in moved] == [True, False, False, False]
    assert [r.passes for r in moved] == live  # round after round, every channel that moved


def test_a_keyframe_runs_every_pass_at_once_and_measures_the_rounds_it_replays(worker, monkeypatch):
    frames = drifting(6)
    options = ReuseOptions(fidelity=0.99, keyframe_interval=4)
    calls = []
    real = worker.channel_logits
    monkeypatch.setattr(
        worker, "channel_logits", lambda key, x, ch: calls.append(key) or real(key, x, ch)
    )
    out = explain(worker, frames, options)
    exact = explain(worker, frames, None)
    assert [r.keyframe for r in out] == [True, False, False, False, True, False]
    assert out[4].passes == live_channels(worker, frames[4]) and out[4].fidelity is not None
    # One batch of passes, as the exact run: the same map, bit for bit.
    assert calls.count(4) == 1
    np.testing.assert_array_equal(out[0].maps, exact[0].maps)
    np.testing.assert_array_equal(out[4].maps, exact[4].maps)
    assert not np.array_equal(out[3].maps, exact[3].maps)  # reused: not the exact map
    # The fidelity is what the rounds alone give on that frame: a stream that does not
    # measure there runs them for real (the same course up to frame 4).
    monkeypatch.setattr(reuse, "_FIRST_INTERVAL", 100)
    rounds = explain(worker, frames, ReuseOptions(fidelity=0.99, keyframe_interval=100))
    assert not any(r.keyframe for r in rounds[1:]) and rounds[4].passes < out[4].passes
    measured = correlation(torch.from_numpy(exact[4].maps[0]), torch.from_numpy(rounds[4].maps[0]))
    assert out[4].fidelity == pytest.approx(measured, abs=1e-5)
    assert measured < 0.99999  # the rounds left something out: a measurement, not 1
