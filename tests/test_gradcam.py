"""Grad-CAM baseline: against pytorch-grad-cam on real photos, a plain formula, state restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny
from pytorch_grad_cam import GradCAM as ReferenceGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from skimage import data

from scorecam_stream import load_model
from scorecam_stream.gradcam import GradCAM


@pytest.mark.slow  # a real model on real photos
def test_matches_pytorch_grad_cam_on_real_photos():
    loaded = load_model("efficientnet_lite0", input_size=160)
    x = torch.stack([loaded.preprocess(data.chelsea()), loaded.preprocess(data.coffee())])
    ours = GradCAM(loaded.model, loaded.layer, batch_size=2)(x)
    targets = [ClassifierOutputTarget(int(t)) for t in ours.targets]
    with ReferenceGradCAM(model=loaded.model, target_layers=[loaded.layer]) as reference:
        theirs = reference(input_tensor=x, targets=targets)  # (N, S, S), min-max scaled
    for mine, other in zip(ours.maps.numpy(), theirs, strict=True):
        assert mine.shape == other.shape and (mine >= 0).all()
        assert np.corrcoef(mine.ravel(), other.ravel())[0, 1] >= 0.999
    with torch.no_grad():
        top = loaded.model(x).argmax(1)
    torch.testing.assert_close(ours.targets, top)


def test_equals_the_formula_and_is_batch_independent(images):
    model = make_tiny()
    targets = torch.tensor([2, 5, 8])
    result = GradCAM(model, model.features[3], batch_size=2)(images, targets)
    for i in range(3):
        acts = model.features[:4](images[i : i + 1]).detach().requires_grad_(True)
        logit = model.fc(model.pool(model.features[4](acts)).flatten(1))[0, targets[i]]
        (grads,) = torch.autograd.grad(logit, acts)
        cam = (grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1, keepdim=True).clamp(min=0)
        expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
        torch.testing.assert_close(result.maps[i], expected.detach(), rtol=1e-5, atol=1e-6)
    single = GradCAM(model, model.features[3], batch_size=1)(images, targets)
    torch.testing.assert_close(single.maps, result.maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.probs, model(images).softmax(1)[[0, 1, 2], targets])


def test_restores_mode_and_removes_hooks_after_an_error(images):
    model = make_tiny().train()
    cam = GradCAM(model, model.features[3])
    with pytest.raises(ValueError, match="targets"):
        cam(images, torch.tensor([1, 2]))
    with pytest.raises(RuntimeError):
        cam(images[:, :2])  # wrong channel count: the forward raises
    classes = model(images).shape[1]
    with pytest.raises(ValueError, match=rf"target classes must be in \[0, {classes}\)"):
        cam(images, classes)  # the same range check as Score-CAM's (targets.resolve)
    assert model.training
    assert not model.features[3]._forward_hooks
    with pytest.raises(ValueError, match="layer"):
        GradCAM(model, torch.nn.ReLU())
