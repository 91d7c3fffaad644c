"""The engine against a plain per-channel loop, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyCNN, make_tiny
from helpers import VARIANTS, assert_maps_close, reference_map

from scorecam_stream import ScoreCAM, combine_shards
from scorecam_stream.model_state import model_state


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v.values())))
def test_equals_plain_loop(tiny, images, variant):
    engine = ScoreCAM(tiny, tiny.features[3], batch_size=5, **variant)
    result = engine(images)
    assert result.maps.shape == (3, 32, 32) and result.maps.dtype == torch.float32
    assert torch.equal(result.targets, tiny(images).argmax(1))
    for i in range(len(images)):
        ref = reference_map(tiny, tiny.features[3], images[i], int(result.targets[i]), **variant)
        assert_maps_close(result.maps[i], ref)
        assert float(result.maps[i].min()) >= 0 and torch.isfinite(result.maps[i]).all()


def test_probs_are_unmasked_softmax(tiny, images):
    result = ScoreCAM(tiny, tiny.features[3])(images, targets=[1, 2, 3])
    expected = tiny(images).softmax(1)[torch.arange(3), torch.tensor([1, 2, 3])]
    torch.testing.assert_close(result.probs, expected.detach())
    assert result.targets.tolist() == [1, 2, 3]


@pytest.mark.parametrize("variant", VARIANTS[:1] + VARIANTS[-2:])
def test_chunk_size_parity(tiny, images, variant):
    maps = [
        ScoreCAM(tiny, tiny.features[3], batch_size=b, **variant)(images).maps
        for b in (1, 3, 7, 64)
    ]
    for m in maps[1:]:
        torch.testing.assert_close(m, maps[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_shard_sum_parity(tiny, images, variant):
    engine = ScoreCAM(tiny, tiny.features[3], batch_size=4, **variant)
    whole = engine(images)
    base = engine.base(images)
    targets = whole.targets[:, None]
    ranges = [(0, 1), (1, 5), (5, 6), (6, 12)]
    shards = [engine.shard(base, targets, a, b) for a, b in ranges]
    torch.testing.assert_close(combine_shards(shards)[:, 0], whole.maps, rtol=1e-5, atol=1e-6)
    scores = torch.cat([s.scores for s in shards], dim=2)
    assert scores.shape == (3, 1, 12)
    assert sum(int(s.skipped.sum()) for s in shards) == int(whole.skipped.sum())


def test_shard_range_is_checked(tiny, images):
    engine = ScoreCAM(tiny, tiny.features[3])
    base = engine.base(images)
    with pytest.raises(ValueError, match="not inside"):
        engine.shard(base, torch.zeros(3, 1, dtype=torch.long), 4, 13)


def _with_constant_channels(seed: int = 0) -> TinyCNN:
    """A TinyCNN whose channels 0-3 are constant: 0-1 dead (zero), 2-3 a positive constant."""
    model = make_tiny(seed)
    conv = model.features[2]
    with torch.no_grad():
        conv.weight[:4] = 0
        conv.bias[:2] = -1.0
        conv.bias[2:4] = torch.tensor([0.7, 1.3])
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_constant_skip_is_exact(images, variant):
    model = _with_constant_channels()
    layer = model.features[3]
    skipping = ScoreCAM(model, layer, batch_size=4, skip_constant=True, **variant)(images)
    running = ScoreCAM(model, layer, batch_size=4, skip_constant=False, **variant)(images)
    assert skipping.skipped.tolist() == [4, 4, 4]
    assert running.skipped.tolist() == [0, 0, 0]
    torch.testing.assert_close(skipping.maps, running.maps, rtol=1e-5, atol=1e-6)
    for i in range(3):
        ref = reference_map(model, layer, images[i], int(skipping.targets[i]), **variant)
        assert_maps_close(skipping.maps[i], ref)


def test_constant_skip_saves_forwards(images):
    model = _with_constant_channels()
    calls = []
    model.register_forward_pre_hook(lambda _m, inputs: calls.append(inputs[0].shape[0]))
    engine = ScoreCAM(model, model.features[3], batch_size=64)
    engine(images)
    # base forward (3) + zero image (1) + 3 frames x 8 live channels
    assert sum(calls) == 3 + 1 + 3 * 8
    calls.clear()
    engine(images)
    assert sum(calls) == 3 + 3 * 8  # the zero image's score is cached


def test_passes_say_which_channels_run(images):
    model = _with_constant_channels()
    for skip in (True, False):
        engine = ScoreCAM(model, model.features[3], skip_constant=skip)
        base = engine.base(images)
        passes = engine.passes(base)
        assert passes.shape == (3, 12) and passes.dtype == torch.bool
        assert bool(passes[:, :4].any()) is not skip  # channels 0-3 are constant
        varying = base.highs[:, 4:] > base.lows[:, 4:]
        assert varying.any() and torch.equal(passes[:, 4:], varying | (not skip))
        # A shard's work is its count of passes: the skipped ones are the rest.
        shard = engine.shard(base, torch.zeros(3, 1, dtype=torch.long), 2, 9)
        assert shard.skipped.tolist() == (~passes[:, 2:9]).sum(dim=1).tolist()


def test_target_list_parity(tiny, images):
    engine = ScoreCAM(tiny, tiny.features[3], batch_size=4)
    pairs = torch.tensor([[1, 4], [0, 9], [3, 3]])
    multi = engine(images, targets=pairs)
    assert multi.maps.shape == (3, 2, 32, 32) and multi.targets.shape == (3, 2)
    for t in range(2):
        single = engine(images, targets=pairs[:, t])
        torch.testing.assert_close(multi.maps[:, t], single.maps, rtol=1e-5, atol=1e-6)
    top3 = engine(images, topk=3)
    assert torch.equal(top3.targets, tiny(images).topk(3, dim=1).indices)
    torch.testing.assert_close(top3.maps[:, 0], engine(images).maps, rtol=1e-5, atol=1e-6)


def test_fixed_target_for_all_frames(tiny, images):
    engine = ScoreCAM(tiny, tiny.features[3])
    result = engine(images, targets=7)
    assert result.targets.tolist() == [7, 7, 7]
    with pytest.raises(ValueError, match="target classes"):
        engine(images, targets=10)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        engine(images, targets=[1, 2])


def test_max_channels_uses_highest_variance_channels(tiny, images):
    layer = tiny.features[3]
    result = ScoreCAM(tiny, layer, max_channels=5)(images)
    full = ScoreCAM(tiny, layer, max_channels=12)(images)
    torch.testing.assert_close(full.maps, ScoreCAM(tiny, layer)(images).maps)
    acts = []
    handle = layer.register_forward_hook(lambda _m, _i, o: acts.append(o.clone()))
    tiny(images)
    handle.remove()
    variance = acts[0].flatten(2).var(dim=2)
    for i in range(3):
        chosen = sorted(variance[i].topk(5).indices.tolist())
        ref = reference_map(tiny, layer, images[i], int(result.targets[i]), channels=chosen)
        assert_maps_close(result.maps[i], ref)


def _grad_cam_maps(model, layer, x, targets):
    """Return pytorch-grad-cam's ScoreCAM maps (N, S, S) for ``targets`` (N,)."""
    from pytorch_grad_cam import ScoreCAM as GradCamScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = GradCamScoreCAM(model=model, target_layers=[layer])
    return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def test_matches_pytorch_grad_cam(tiny, images):
    layer = tiny.features[3]
    ours = ScoreCAM(tiny, layer, variant="pytorch-grad-cam", batch_size=5)(images)
    theirs = _grad_cam_maps(tiny, layer, images, ours.targets)
    for i in range(3):
        r = np.corrcoef(ours.maps[i].numpy().ravel(), theirs[i].ravel())[0, 1]
        assert r >= 0.999
    # Both are min-max scaled to [0, 1]: the values themselves agree.
    np.testing.assert_allclose(ours.maps.numpy(), theirs, atol=1e-4)


@pytest.mark.slow  # every channel of a real model on a real photo
def test_matches_pytorch_grad_cam_on_a_real_photo():
    """The offline EfficientNet-Lite0 on a real 16:9 frame, at the issue's layer blocks.6."""
    import cv2
    from skimage import data

    from scorecam_stream import load_model

    lite0 = load_model("efficientnet_lite0", layer="blocks.6", input_size=160)
    frame = cv2.resize(data.chelsea(), (640, 360))  # a 16:9 frame of a real photo
    x = lite0.preprocess(frame)[None]
    ours = ScoreCAM(lite0.model, lite0.layer, variant="pytorch-grad-cam")(x)
    theirs = _grad_cam_maps(lite0.model, lite0.layer, x, ours.targets)
    assert int(ours.targets[0]) == 285  # Egyptian cat
    assert 0.05 < float((ours.maps > 0.5).float().mean()) < 0.5  # a real map, not blank
    r = np.corrcoef(ours.maps[0].numpy().ravel(), theirs[0].ravel())[0, 1]
    assert r >= 0.999
    np.testing.assert_allclose(ours.maps[0].numpy(), theirs[0], atol=1e-4)
    # The article's settings with the same three options are a different map here: the variant
    # is what makes the difference (align_corners, ReLU before resizing).
    near = ScoreCAM(lite0.model, lite0.layer, score="logit", channel_softmax=True, combine="raw")
    other = near(x, targets=ours.targets).maps[0].numpy()
    assert float(np.abs(other / max(other.max(), 1e-12) - theirs[0]).max()) > 0.05


@pytest.mark.parametrize("ranges", [[(0, 12)], [(0, 1), (1, 5), (5, 6), (6, 12)]])
def test_grad_cam_variant_shards_and_skipping(images, ranges):
    model = _with_constant_channels()
    layer = model.features[3]
    engine = ScoreCAM(model, layer, batch_size=3, variant="pytorch-grad-cam")
    whole = engine(images)
    # Dead channels 0-1 upsample to exact zeros; the positive constants 2-3 do not stay exactly
    # constant under align_corners=True (rounding), so their passes run, as in pytorch-grad-cam.
    assert whole.skipped.tolist() == [2, 2, 2]
    assert float(whole.maps.min()) >= 0 and float(whole.maps.max()) <= 1
    base = engine.base(images)
    shards = [engine.shard(base, whole.targets[:, None], a, b) for a, b in ranges]
    assert all(s.partial.shape[-2:] == base.activations.shape[-2:] for s in shards)
    torch.testing.assert_close(combine_shards(shards)[:, 0], whole.maps, rtol=1e-5, atol=1e-6)
    running = ScoreCAM(model, layer, skip_constant=False, variant="pytorch-grad-cam")(images)
    torch.testing.assert_close(running.maps, whole.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        whole.maps.numpy(), _grad_cam_maps(model, layer, images, whole.targets), atol=1e-4
    )


def test_variant_fixes_its_options(tiny):
    layer = tiny.features[3]
    engine = ScoreCAM(tiny, layer, variant="pytorch-grad-cam", score="logit")
    assert (engine.score, engine.channel_softmax, engine.combine) == ("logit", True, "raw")
    article = ScoreCAM(tiny, layer)
    assert (article.score, article.channel_softmax, article.combine) == (
        "softmax",
        False,
        "normalized",
    )
    with pytest.raises(ValueError, match="fixes"):
        ScoreCAM(tiny, layer, variant="pytorch-grad-cam", score="softmax")
    with pytest.raises(ValueError, match="fixes"):
        ScoreCAM(tiny, layer, variant="pytorch-grad-cam", combine="normalized")
    with pytest.raises(ValueError, match="variant"):
        ScoreCAM(tiny, layer, variant="torchcam")


def _memory_formats(model: torch.nn.Module) -> dict[str, tuple]:
    return {n: (t.data_ptr(), t.stride()) for n, t in model.state_dict(keep_vars=True).items()}


def test_channels_last_leaves_the_callers_model_as_it_was(tiny, images):
    before = _memory_formats(tiny)
    plain = ScoreCAM(tiny, tiny.features[3])(images).maps
    engine = ScoreCAM(tiny, tiny.features[3], channels_last=True)
    assert _memory_formats(tiny) == before  # construction converts nothing
    seen = []
    tiny.features[2].register_forward_pre_hook(
        lambda m, _i: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last))
    )
    torch.testing.assert_close(engine(images).maps, plain, rtol=1e-5, atol=1e-6)
    assert seen and all(seen)  # the forwards did run channels-last
    assert _memory_formats(tiny) == before  # the very same tensors, same strides


def test_channels_last_restored_after_exception(tiny, images):
    model = _Exploding(tiny, base_batch=3)
    before = _memory_formats(model)
    with pytest.raises(RuntimeError, match="boom"):
        ScoreCAM(model, tiny.features[3], batch_size=2, channels_last=True)(images)
    assert _memory_formats(model) == before


class _Exploding(torch.nn.Module):
    """Wraps a model; raises on the first masked pass (a batch that is not the base batch)."""

    def __init__(self, inner: torch.nn.Module, base_batch: int) -> None:
        super().__init__()
        self.inner, self.base_batch = inner, base_batch

    def forward(self, x):
        if x.shape[0] != self.base_batch:
            raise RuntimeError("boom")
        return self.inner(x)


def test_hooks_and_mode_restored_after_exception(tiny, images):
    model = _Exploding(tiny, base_batch=3).train()
    layer = tiny.features[3]
    engine = ScoreCAM(model, layer, batch_size=2)
    with pytest.raises(RuntimeError, match="boom"):
        engine(images)
    assert len(layer._forward_hooks) == 0
    assert model.training and tiny.training  # train mode restored


def test_model_left_in_its_mode_and_no_grad_state(tiny, images):
    tiny.train()
    requires = [p.requires_grad for p in tiny.parameters()]
    assert torch.is_grad_enabled()
    result = ScoreCAM(tiny, tiny.features[3])(images)
    assert tiny.training
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())
    # No autograd trace: nothing to backpropagate, no gradients written, grad mode as it was.
    assert not result.maps.requires_grad and result.maps.grad_fn is None
    assert all(p.grad is None for p in tiny.parameters())
    assert [p.requires_grad for p in tiny.parameters()] == requires
    assert torch.is_grad_enabled()


def test_nested_model_state_is_undone_by_the_outer_hold_even_after_an_exception(tiny):
    tiny.train()
    before = _memory_formats(tiny)
    outer, inner = model_state(tiny, channels_last=True), model_state(tiny, grad=True)
    with pytest.raises(RuntimeError, match="inner"), outer, inner:
        assert torch.is_grad_enabled() and not tiny.training
        raise RuntimeError("inner")
    assert tiny.training and _memory_formats(tiny) == before
    with model_state(tiny, channels_last=True):
        with model_state(tiny, channels_last=True, grad=True):
            pass
        # The inner hold gave back what it found: eval, inference mode, channels-last weights.
        assert not tiny.training and torch.is_inference_mode_enabled()
        assert tiny.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert tiny.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert _memory_formats(tiny) == before  # the caller's very tensors


def test_bf16_autocast_close_to_fp32(tiny, images):
    fp32 = ScoreCAM(tiny, tiny.features[3])(images).maps
    bf16 = ScoreCAM(tiny, tiny.features[3], dtype="bf16")(images).maps
    rel = float((bf16 - fp32).norm() / fp32.norm())
    assert rel < 0.05
    assert bf16.dtype == torch.float32


def test_invalid_options():
    model = make_tiny()
    with pytest.raises(ValueError, match="batch_size"):
        ScoreCAM(model, model.features[3], batch_size=0)
    with pytest.raises(ValueError, match="score"):
        ScoreCAM(model, model.features[3], score="prob")
    with pytest.raises(ValueError, match="combine"):
        ScoreCAM(model, model.features[3], combine="sum")
    with pytest.raises(ValueError, match="not a module"):
        ScoreCAM(model, torch.nn.ReLU())
    with pytest.raises(ValueError, match="dtype"):
        ScoreCAM(model, model.features[3], dtype="int8")
