"""The GPU speed paths, checked on CPU: fixed-shape chunks, torch.compile, copies, uint8 input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torchvision
from clips import FAST, make_clip
from conftest import make_tiny
from helpers import VARIANTS, assert_maps_close, reference_map
from skimage import data

from scorecam_stream import ScoreCAM, combine_shards
from scorecam_stream.cli import main, parse_config
from scorecam_stream.config import EngineConfig, ModelConfig
from scorecam_stream.masked_passes import FIXED_SHAPES, chunk_plan
from scorecam_stream.models import preprocess_frame, resize_frame
from scorecam_stream.records import FrameTask
from scorecam_stream.transfer import normalize_on_device, to_device, to_host
from scorecam_stream.weighting import ShardResult
from scorecam_stream.workers import Worker


@pytest.mark.parametrize("batch", [1, 3, 4, 8, 64, 256])
@pytest.mark.parametrize("passes", [0, 1, 2, 5, 63, 64, 65, 129, 512, 1000])
def test_chunk_plan_covers_every_pass_once_in_fixed_shapes(passes, batch):
    loose = chunk_plan(passes, batch, fixed=False)
    assert sum(rows for rows, _ in loose) == passes
    assert all(rows == padded and 1 <= rows <= batch for rows, padded in loose)
    assert len(loose) == -(-passes // batch)

    fixed = chunk_plan(passes, batch, fixed=True)
    shapes = {max(1, batch >> j) for j in range(FIXED_SHAPES)}
    assert sum(rows for rows, _ in fixed) == passes
    assert all(padded in shapes and 1 <= rows <= padded for rows, padded in fixed)
    # only the last chunk is padded, by less than the smallest shape
    assert all(rows == padded for rows, padded in fixed[:-1])
    if fixed:
        rows, padded = fixed[-1]
        assert padded - rows < min(shapes)
    # never more padding rows than the smallest shape, never more chunks than one per shape
    # beyond the unpadded plan
    assert sum(p for _, p in fixed) - passes < min(shapes)
    assert len(fixed) <= len(loose) + len(shapes)


def test_chunk_plan_rejects_bad_sizes():
    with pytest.raises(ValueError):
        chunk_plan(4, 0, fixed=True)
    with pytest.raises(ValueError):
        chunk_plan(-1, 4, fixed=False)


def _shard_maps(engine: ScoreCAM, images: torch.Tensor, ranges) -> torch.Tensor:
    base = engine.base(images)
    targets = base.logits.argmax(1)[:, None]
    return combine_shards([engine.shard(base, targets, a, b) for a, b in ranges])[:, 0]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_padded_fixed_chunks_equal_unpadded(tiny, images, variant):
    layer = tiny.features[3]
    unpadded = ScoreCAM(tiny, layer, batch_size=7, fixed_chunks=False, **variant)(images)
    for batch in (4, 7, 16, 64):  # 64: a single chunk padded far beyond the passes
        padded = ScoreCAM(tiny, layer, batch_size=batch, fixed_chunks=True, **variant)(images)
        torch.testing.assert_close(padded.maps, unpadded.maps, rtol=1e-5, atol=1e-6)
        assert torch.equal(padded.skipped, unpadded.skipped)
    # and by shards, where each shard's last chunk is padded on its own
    ranges = [(0, 1), (1, 6), (6, 12)]
    sharded = _shard_maps(
        ScoreCAM(tiny, layer, batch_size=4, fixed_chunks=True, **variant), images, ranges
    )
    torch.testing.assert_close(sharded, unpadded.maps, rtol=1e-5, atol=1e-6)


def test_padded_chunks_run_the_padded_rows_and_drop_them(tiny, images):
    """The padding rows really go through the model (fixed shapes) but change no score."""
    sizes: list[int] = []
    handle = tiny.fc.register_forward_hook(lambda _m, i, _o: sizes.append(i[0].shape[0]))
    try:
        engine = ScoreCAM(tiny, tiny.features[3], batch_size=8, fixed_chunks=True)
        result = engine(images)
    finally:
        handle.remove()
    passes = 3 * 12 - int(result.skipped.sum())
    # sizes[0] is the base pass of the 3 frames; a 1 is the zero image (chunks are >= 2)
    masked = [s for s in sizes[1:] if s != 1]
    assert set(masked) <= {8, 4, 2}
    assert sum(masked) >= passes and sum(masked) - passes < 2
    for i in range(3):
        ref = reference_map(tiny, tiny.features[3], images[i], int(result.targets[i]))
        assert_maps_close(result.maps[i], ref)


@pytest.mark.slow  # torch.compile from a cold cache
def test_compiled_engine_equals_eager():
    """torch.compile on CPU (inductor, C++): same maps as eager, padded chunks included."""
    torch._dynamo.reset()
    model = make_tiny(seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 32, 32, generator=g) * 0.3
    x[0, :, 4:12, 4:12] += 1.5
    x[1, :, 16:26, 10:20] += 1.5
    eager = ScoreCAM(model, model.features[3], batch_size=4)(x)
    compiled_engine = ScoreCAM(model, model.features[3], batch_size=4, compile=True)
    assert compiled_engine.fixed_chunks
    compiled = compiled_engine(x)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= FIXED_SHAPES  # compiled, once per chunk shape at most
    assert torch.equal(compiled.targets, eager.targets)
    torch.testing.assert_close(compiled.maps, eager.maps, rtol=1e-5, atol=1e-6)
    again = compiled_engine(x, targets=eager.targets)  # reuses the compiled graphs
    torch.testing.assert_close(again.maps, eager.maps, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompiling


def test_host_copies_change_no_result(tiny, images):
    """The copy helpers give back the same values (pinning itself needs CUDA: gpu_check)."""
    engine = ScoreCAM(tiny, tiny.features[3], batch_size=5)
    base = engine.base(images)
    shard = engine.shard(base, base.logits.argmax(1)[:, None], 0, base.num_channels)
    moved = shard.to("cpu")
    assert isinstance(moved, ShardResult)
    for name in ("partial", "scores", "skipped"):
        assert torch.equal(getattr(moved, name), getattr(shard, name))
    back = base.to("cpu")
    assert torch.equal(back.activations, base.activations) and torch.equal(back.x, base.x)
    t = torch.arange(6.0)
    assert to_device(t, "cpu") is t
    assert to_host([t, None])[1] is None and torch.equal(to_host([t])[0], t)


def test_gpu_flags_reach_the_config():
    config = parse_config(["in.mp4", "--gpus", "2", "--workers-per-gpu", "3", "--compile"])
    assert config.engine.compile and config.engine.engine_kwargs()["compile"]
    assert config.distributed.workers_per_gpu == 3 and config.distributed.num_workers == 6
    assert config.model.device == "cuda"
    assert not parse_config(["in.mp4"]).engine.compile
    assert parse_config(["in.mp4", "--gpus", "2"]).distributed.num_workers == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers-per-gpu", "2"], "--workers-per-gpu needs --gpus N"),
        (["--workers", "2", "--workers-per-gpu", "2"], "--workers-per-gpu needs --gpus N"),
        (["--gpus", "1", "--workers-per-gpu", "0"], "--workers-per-gpu must be >= 1"),
    ],
)
def test_bad_workers_per_gpu_is_a_one_line_error(args, message, tmp_path, capsys):
    assert main([str(tmp_path / "in.mp4"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"scorecam-video: error: {message}" or (message in err and "\n" not in err)


@pytest.fixture(scope="module")
def squeezenet(tmp_path_factory) -> ModelConfig:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "squeezenet.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
    return ModelConfig(spec="torchvision:squeezenet1_1", weights=str(path), input_size=64)


@pytest.mark.parametrize("size", [40, 64, 700])  # enlarge (bilinear) and shrink (area)
def test_uint8_frames_normalised_on_the_worker_equal_the_host_input(size):
    frame = cv2.resize(data.chelsea(), (size * 4 // 3, size))  # a real photo, (H, W, 3) uint8
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    host = preprocess_frame(frame, 64, mean, std)  # (3, 64, 64): the host path
    small = torch.from_numpy(resize_frame(frame, 64))  # (64, 64, 3) uint8: what travels
    assert small.dtype == torch.uint8 and small.numel() * 4 == host.numel() * host.element_size()
    on_device = normalize_on_device(small, mean, std, "cpu")
    assert on_device.shape == (1, 3, 64, 64) and on_device.dtype == torch.float32
    assert torch.equal(on_device[0], host)  # to the bit, on the CPU
    batch = normalize_on_device(torch.stack([small, small.flip(0)]), mean, std, "cpu")
    assert torch.equal(batch[0], host) and torch.equal(batch[1], host.flip(1))
    with pytest.raises(ValueError, match="uint8"):
        normalize_on_device(host, mean, std, "cpu")


def test_worker_gives_the_same_result_for_uint8_and_float_frames(squeezenet):
    worker = Worker(squeezenet, EngineConfig(batch_size=16, max_channels=32))
    meta = worker.meta()
    frame = data.coffee()
    small = torch.from_numpy(resize_frame(frame, meta.input_size))
    host = preprocess_frame(frame, meta.input_size, meta.mean, meta.std)
    by_bytes = worker.explain(FrameTask(0, small))
    by_float = worker.explain(FrameTask(1, host))
    assert np.array_equal(by_bytes.maps, by_float.maps)
    assert np.array_equal(by_bytes.targets, by_float.targets)
    torch.testing.assert_close(
        worker.classify_frames(small[None]), worker.classify_frames(host[None]), rtol=0, atol=0
    )


@pytest.mark.slow  # whole runs
def test_bf16_from_the_command_line_on_cpu(tmp_path):
    """--dtype bf16 runs on the CPU (autocast): close to fp32, and not fp32 itself."""
    clip = tmp_path / "clip.mp4"
    make_clip(clip, count=2)
    maps = {}
    for name, extra in [("fp32", []), ("bf16", ["--dtype", "bf16"])]:
        out, saved = tmp_path / f"{name}.mp4", tmp_path / f"{name}.npz"
        args = [str(clip), "-o", str(out), "--save-maps", str(saved), *FAST, *extra]
        assert main([str(a) for a in args]) == 0
        maps[name] = np.load(saved)["maps"]
    assert maps["bf16"].shape == maps["fp32"].shape and np.isfinite(maps["bf16"]).all()
    assert (maps["bf16"] >= 0).all() and maps["bf16"].max() > 0
    # bf16 really ran: the maps differ from fp32's. (How much depends on the model: 0.42 of the
    # norm for these 8-channel EfficientNet-Lite0 maps at 64 px; the engine test bounds it on
    # the tiny model, and gpu_check section a on VGG16.)
    assert not np.array_equal(maps["bf16"], maps["fp32"])
