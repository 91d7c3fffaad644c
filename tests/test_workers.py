"""The Worker without Ray (cache, classify, shards), its memory behaviour, the preview sampler."""

from __future__ import annotations

import platform
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from scorecam_stream import ScoreCamError
from scorecam_stream.config import EngineConfig, ModelConfig
from scorecam_stream.outputs import PreviewSampler
from scorecam_stream.pipeline import live_torch_threads
from scorecam_stream.records import FrameTask
from scorecam_stream.weighting import combine_shards
from scorecam_stream.workers import LocalExplainer, Worker

PROBE = """
import resource, torch
from scorecam_stream.workers import keep_freed_memory

def faults():  # page faults of ten 100 MiB allocate-and-free rounds, like a batch's buffers
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        buffer = torch.ones(100 * 2**20 // 4)
        del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults(), keep_freed_memory(), faults(), faults(), keep_freed_memory())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_buffers_are_reused_not_faulted_in_again():
    # A fresh process: every Worker made by other tests has already tuned this one.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    default, tuned, first, again, twice = out.stdout.split()
    pages = 100 * 2**20 // 4096
    assert int(default) >= 10 * pages * 0.9  # by default every round faults its pages in again
    assert tuned == twice == "True"
    assert int(first) <= 2 * pages  # once, for the first round
    assert int(again) < pages // 10  # then the memory is reused


# --- the Worker as a plain class (what every Ray actor holds), without Ray --------------------

ENGINE = EngineConfig(batch_size=8, max_channels=8)


@pytest.fixture(scope="module")
def worker() -> Worker:
    return Worker(ModelConfig(spec="efficientnet_lite0", input_size=48), ENGINE, cache_frames=3)


@pytest.fixture(scope="module")
def inputs(worker) -> torch.Tensor:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(5)]
    return worker.meta().preprocess_batch(frames)


def test_worker_cache_keeps_the_most_recent_frames(worker, inputs):
    worker._cache.clear()
    first = [worker.base(i, inputs[i]) for i in range(3)]
    assert all(worker.base(i, inputs[i]) is first[i] for i in range(3))  # cached: same pass
    worker.base(0, inputs[0])  # frame 0 used again: now the most recent
    worker.base(3, inputs[3])  # a fourth frame evicts the least recently used: frame 1
    assert list(worker._cache) == [2, 0, 3]
    assert worker.base(0, inputs[0]) is first[0]
    again = worker.base(1, inputs[1])
    assert again is not first[1]  # recomputed after eviction, to the same values
    torch.testing.assert_close(again.logits, first[1].logits)


def test_worker_targets_and_passes_gives_targets_probs_and_the_work_of_each_channel(worker, inputs):
    worker._cache.clear()
    targets, probs, passes = worker.targets_and_passes(7, inputs[0], None, 3)
    with torch.inference_mode():
        logits = worker.loaded.model.eval()(inputs[:1])[0]
    assert targets.tolist() == logits.topk(3).indices.tolist()  # resolved once, on the worker
    torch.testing.assert_close(probs, logits.softmax(0)[targets], rtol=1e-4, atol=1e-6)
    base = worker._cache[7]  # the base pass is kept for the shards that follow
    assert passes.dtype == torch.bool and passes.shape == (base.num_channels,)
    varying = base.highs[0] > base.lows[0]
    assert torch.equal(passes, varying)  # constant channels cost no pass
    fixed, fixed_probs, _ = worker.targets_and_passes(7, inputs[0], (4, 1), 3)
    assert fixed.tolist() == [4, 1]  # fixed classes as given, whatever topk says
    torch.testing.assert_close(fixed_probs, logits.softmax(0)[[4, 1]], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(worker.classify_frames(inputs[:2])[0], logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("fixed", "topk", "message"),
    [
        ((1000,), 1, r"^target class 1000 is not in \[0, 1000\)$"),
        (None, 1001, r"^--topk 1001 is more than the model's 1000 classes$"),
    ],
)
def test_worker_targets_and_passes_rejects_classes_the_model_lacks(
    worker, inputs, fixed, topk, message
):
    with pytest.raises(ScoreCamError, match=message):
        worker.targets_and_passes(8, inputs[0], fixed, topk)


def test_shards_leave_out_the_per_channel_scores(worker, inputs):
    shard = worker.shard(9, inputs[1], torch.tensor([2]), 0, 4)
    assert shard.scores is None  # not sent back: the driver only sums partials
    kept = worker.engine.shard(worker.base(9, inputs[1]), torch.tensor([[2]]), 0, 4)
    assert kept.scores is not None and kept.scores.shape == (1, 1, 4)
    torch.testing.assert_close(kept.partial, shard.partial)


def test_worker_shards_sum_to_the_whole_frame(worker, inputs):
    worker._cache.clear()
    targets = torch.tensor([3, 9])
    task = FrameTask(index=11, x=inputs[2], targets=(3, 9))
    k = worker.base(11, inputs[2]).num_channels
    shards = [worker.shard(11, inputs[2], targets, a, b) for a, b in [(0, 3), (3, 5), (5, k)]]
    assert all(s.partial.device.type == "cpu" for s in shards)
    whole = worker.explain(task, topk=1)
    assert 11 not in worker._cache  # a whole frame is not asked for again
    assert whole.targets.tolist() == [3, 9] and whole.maps.shape == (2, 48, 48)
    np.testing.assert_allclose(combine_shards(shards)[0].numpy(), whole.maps, rtol=1e-5, atol=1e-6)
    assert whole.skipped == sum(int(s.skipped[0]) for s in shards)
    top = worker.explain(FrameTask(index=12, x=inputs[2]), topk=2)
    logits = worker.classify_frames(inputs[2:3])[0]
    assert top.targets.tolist() == logits.topk(2).indices.tolist()
    np.testing.assert_allclose(top.probs, logits.softmax(0)[top.targets].numpy(), rtol=1e-5)


def test_local_explainer_keeps_order_and_passes_skipped_frames_through(worker, inputs):
    explainer = LocalExplainer(worker, topk=1)
    items = [("a", FrameTask(0, inputs[0])), ("b", None), ("c", FrameTask(1, inputs[1]))]
    out = list(explainer.explain(items))
    assert [p for p, _ in out] == ["a", "b", "c"] and out[1][1] is None
    assert [r.index for _, r in (out[0], out[2])] == [0, 1]
    assert explainer.meta is worker.meta() and explainer.meta.mean == worker.loaded.mean


# --- the preview sampler ----------------------------------------------------------------------


def test_preview_sampler_doubles_its_stride_and_keeps_evenly_spaced_frames(tmp_path):
    sampler = PreviewSampler(count=4, tile_width=8, min_tile_height=1)
    for i in range(37):
        sampler.offer(np.full((4, 8, 3), i, np.uint8))  # each frame's value is its index
    kept = [int(tile[0, 0, 0]) for tile in sampler._kept]
    # Each time 8 are held they are halved and the stride doubles: at frames 7, 14 and 28.
    assert sampler._stride == 8
    assert kept == list(range(0, 37, 8))
    assert len(kept) < 2 * sampler.count  # bounded whatever the length
    path = tmp_path / "p.png"
    sampler.write(path)
    sheet = cv2.imread(str(path))
    assert sheet is not None and sheet.shape[1] == 4 * 8 + 5 * 4  # 4 columns of 8 px tiles


def test_preview_tiles_of_wide_frames_are_wider():
    sampler = PreviewSampler(count=2, tile_width=320, min_tile_height=180)
    sampler.offer(np.zeros((720, 2560, 3), np.uint8))  # side by side 720p
    assert sampler._kept[0].shape[:2] == (180, 640)
    narrow = PreviewSampler(count=2, tile_width=320, min_tile_height=180)
    narrow.offer(np.zeros((480, 640, 3), np.uint8))
    assert narrow._kept[0].shape[:2] == (240, 320)


def test_a_live_run_leaves_a_core_to_decode_and_encode_and_gives_the_threads_back():
    assert [live_torch_threads(n) for n in (1, 2, 16)] == [1, 1, 15]
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1  # another count than the process has
    explainer = LocalExplainer(
        Worker(ModelConfig(spec="efficientnet_lite0", input_size=48), ENGINE, threads=wanted)
    )
    assert torch.get_num_threads() == wanted
    explainer.close()
    assert torch.get_num_threads() == before
