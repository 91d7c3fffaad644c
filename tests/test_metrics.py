"""Faithfulness metrics against plain per-frame, per-step loops; a scene with known evidence."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import make_tiny
from skimage import data
from torchvision.transforms.functional import gaussian_blur as tv_blur

from scorecam_stream import load_model
from scorecam_stream.metrics import average_drop_increase, insertion_deletion, stability


def prob(model: torch.nn.Module, image: torch.Tensor, target: int) -> float:
    """Return the softmax probability of ``target`` for one (3, S, S) image."""
    with torch.no_grad():
        return float(model(image[None]).softmax(1)[0, target])


def order(map_: np.ndarray) -> np.ndarray:
    """Return the pixel ids (row-major) of a map, highest first, ties in row-major order."""
    return np.argsort(-map_.ravel(), kind="stable")


@pytest.fixture
def maps(images) -> torch.Tensor:
    """Maps with ties (quantised) and one constant map."""
    g = torch.Generator().manual_seed(3)
    m = torch.rand(3, 32, 32, generator=g)
    m[0] = (m[0] * 4).floor()  # four levels: many ties
    m[2] = 0.7  # constant
    return m


def test_average_drop_increase_equals_plain_loop(tiny, images, maps):
    targets = torch.tensor([1, 4, 7])
    drop, increase = average_drop_increase(tiny, images, maps, targets, batch_size=2)
    for i in range(3):
        m = maps[i].numpy()
        span = m.max() - m.min()
        unit = (m - m.min()) / span if span > 0 else np.zeros_like(m)
        p = prob(tiny, images[i], int(targets[i]))
        p_e = prob(tiny, images[i] * torch.from_numpy(unit).float(), int(targets[i]))
        assert drop[i].item() == pytest.approx(max(0.0, p - p_e) / p, rel=1e-5, abs=1e-7)
        assert increase[i].item() == (1.0 if p_e > p else 0.0)
    assert drop.shape == increase.shape == (3,) and drop.dtype == torch.float32


@pytest.mark.parametrize("steps", [28, 5])
def test_insertion_deletion_equals_plain_loop(tiny, images, maps, steps):
    targets = torch.tensor([2, 0, 9])
    ins, dele = insertion_deletion(tiny, images, maps, targets, steps=steps, batch_size=7)
    s = images.shape[-1]
    step = -(-s * s // steps)
    blurred = tv_blur(images, [11, 11], [5.0, 5.0])  # torchvision pads with reflect too
    for i in range(3):
        ranked = order(maps[i].numpy())
        t = int(targets[i])
        del_curve, ins_curve = [], []
        for j in range(steps + 1):
            rows, cols = np.unravel_index(ranked[: j * step], (s, s))
            deleted = images[i].clone()
            deleted[:, rows, cols] = 0.0
            inserted = blurred[i].clone()
            inserted[:, rows, cols] = images[i][:, rows, cols]
            del_curve.append(prob(tiny, deleted, t))
            ins_curve.append(prob(tiny, inserted, t))
        assert dele[i].item() == pytest.approx(np.trapezoid(del_curve, dx=1 / steps), abs=1e-6)
        assert ins[i].item() == pytest.approx(np.trapezoid(ins_curve, dx=1 / steps), abs=1e-6)
        assert del_curve[0] == pytest.approx(ins_curve[-1], abs=1e-6)  # both are x itself


def test_metrics_batch_size_parity(tiny, images, maps):
    targets = torch.tensor([3, 3, 5])
    a = insertion_deletion(tiny, images, maps, targets, steps=6, batch_size=1)
    b = insertion_deletion(tiny, images, maps, targets, steps=6, batch_size=100)
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-7)


def test_metrics_restore_train_mode(images, maps):
    model = make_tiny().train()
    average_drop_increase(model, images, maps, torch.tensor([0, 1, 2]))
    assert model.training


def test_stability_equals_plain_loop():
    g = torch.Generator().manual_seed(5)
    base = torch.rand(20, 20, generator=g)
    maps = torch.stack([base + 0.3 * torch.rand(20, 20, generator=g) for _ in range(6)])
    maps[4] = 1.0  # constant: its correlations are undefined
    targets = torch.tensor([1, 1, 1, 2, 2, 2])
    got = stability(maps, targets)
    corrs, ious = [], []
    hot = round(0.1 * 400)
    for i in range(5):
        if targets[i] != targets[i + 1]:
            continue
        a, b = maps[i].numpy().ravel(), maps[i + 1].numpy().ravel()
        if a.std() > 0 and b.std() > 0:
            corrs.append(np.corrcoef(a, b)[0, 1])
        ha, hb = set(order(maps[i].numpy())[:hot]), set(order(maps[i + 1].numpy())[:hot])
        ious.append(len(ha & hb) / len(ha | hb))
    assert got["pairs"] == 4 and len(corrs) == 2
    assert got["correlation"] == pytest.approx(np.mean(corrs), abs=1e-9)
    assert got["iou"] == pytest.approx(np.mean(ious), abs=1e-9)
    assert 0.5 < got["correlation"] < 1.0  # alike maps, not identical


def test_stability_without_pairs_and_identical_maps():
    maps = torch.rand(3, 8, 8)
    assert stability(maps, torch.tensor([0, 1, 2])) == {
        "pairs": 0,
        "correlation": None,
        "iou": None,
    }
    same = stability(maps[:1].expand(3, 8, 8), torch.tensor([4, 4, 4]))
    assert same["pairs"] == 2
    assert same["correlation"] == pytest.approx(1.0) and same["iou"] == pytest.approx(1.0)


def test_bad_shapes_raise(tiny, images, maps):
    with pytest.raises(ValueError, match="maps"):
        average_drop_increase(tiny, images, maps[:, :16], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="targets"):
        insertion_deletion(tiny, images, maps, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="steps"):
        insertion_deletion(tiny, images, maps, torch.tensor([0, 1, 2]), steps=0)
    with pytest.raises(ValueError, match="maps"):
        stability(maps[0], torch.tensor([0]))


@pytest.fixture(scope="module")
def scene():
    """A real photo pasted on a plain grey canvas: (model, x (1, 3, S, S), photo mask, target)."""
    loaded = load_model("efficientnet_lite0", input_size=96)
    canvas = np.full((240, 240, 3), 128, np.uint8)
    canvas[60:180, 40:200] = cv2.resize(data.chelsea(), (160, 120), interpolation=cv2.INTER_AREA)
    x = loaded.preprocess(canvas)[None]
    with torch.no_grad():
        target = int(loaded.model(x).argmax())
    photo = torch.zeros(1, 96, 96)
    photo[:, 24:72, 16:80] = 1.0  # the photo's place at 96 px
    return loaded.model, x, photo, target


@pytest.mark.slow  # a real model on real photos
def test_map_on_the_evidence_beats_its_inverse(scene):
    model, x, photo, target = scene
    both = torch.cat([photo, 1 - photo])
    xs, targets = x.expand(2, -1, -1, -1), torch.tensor([target, target])
    ins, dele = insertion_deletion(model, xs, both, targets, steps=16)
    assert dele[0] < dele[1]
    assert ins[0] > ins[1]
    drop, _ = average_drop_increase(model, xs, both, targets)
    assert drop[0] < drop[1]
