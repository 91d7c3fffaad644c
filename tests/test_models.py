"""Model loading: specs, layers, weights, preprocessing, the offline model."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from scorecam_stream import ScoreCAM, ScoreCamError, load_model
from scorecam_stream.models import preprocess_frame
from scorecam_stream.models.layers import detect_layer


@pytest.fixture(scope="module")
def lite0():
    return load_model("efficientnet_lite0", input_size=160)


def test_offline_model_classifies_real_photos(lite0):
    from skimage import data

    assert lite0.layer_name == "bn2" and len(lite0.class_names) == 1000
    for image, cls, name in [
        (data.chelsea(), 285, "Egyptian cat"),
        (data.coffee(), 967, "espresso"),
    ]:
        x = lite0.preprocess(image)[None]
        with torch.inference_mode():
            p = lite0.model(x).softmax(1)[0]
        assert int(p.argmax()) == cls and lite0.class_name(cls) == name
        assert float(p[cls]) > 0.5


@pytest.mark.slow  # a real photo through the model, many times
def test_pointing_game_on_pasted_photo():
    """The cat pasted into a plain canvas: the map's peak and most of its energy are on it."""
    from skimage import data

    # 320 px input: the 10 x 10 head layer resolves a box of an eighth of the frame's width.
    lite0 = load_model("efficientnet_lite0", input_size=320)
    canvas = np.full((480, 640, 3), 200, np.uint8)
    top, left = 200, 300
    cat = data.chelsea()[::2, ::2]  # (150, 226, 3)
    canvas[top : top + cat.shape[0], left : left + cat.shape[1]] = cat
    engine = ScoreCAM(lite0.model, lite0.layer, batch_size=32)
    result = engine(lite0.preprocess(canvas)[None])
    assert int(result.targets[0]) in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    heat = result.maps[0].numpy()
    # the box in model-input coordinates (the whole frame is resized to S x S)
    s = lite0.input_size
    r0, r1 = top * s / 480, (top + cat.shape[0]) * s / 480
    c0, c1 = left * s / 640, (left + cat.shape[1]) * s / 640
    box = np.zeros_like(heat, bool)
    box[int(r0) : int(np.ceil(r1)), int(c0) : int(np.ceil(c1))] = True
    peak = np.unravel_index(heat.argmax(), heat.shape)
    assert box[peak]
    assert heat[box].sum() / heat.sum() > 0.5
    assert box.mean() < 0.15  # the box is a small part of the frame: this is not trivial


def test_preprocess_resizes_whole_frame_without_crop(lite0):
    frame = np.zeros((100, 300, 3), np.uint8)
    frame[:, :100] = 255  # the left third white
    x = preprocess_frame(frame, 60, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert x.shape == (3, 60, 60) and x.dtype == torch.float32
    assert torch.allclose(x[:, :, :19], torch.ones(1)) and torch.allclose(
        x[:, :, 21:], torch.zeros(1)
    )
    y = lite0.preprocess(np.full((50, 70, 3), 255, np.uint8))
    expected = (1.0 - torch.tensor(lite0.mean)) / torch.tensor(lite0.std)
    torch.testing.assert_close(y[:, 5, 5], expected)


def test_detect_layer_finds_last_spatial_feature_map():
    vgg = torchvision.models.vgg16(weights=None).eval()
    assert detect_layer(vgg, 64) == "features.29"  # not the pooled 'features' container
    resnet = torchvision.models.resnet18(weights=None).eval()
    assert detect_layer(resnet, 64) == "layer4"


def test_local_weights_and_auto_layer(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(net.state_dict(), path)
    loaded = load_model("torchvision:resnet18", weights=path, input_size=64)
    assert loaded.layer_name == "layer4" and loaded.layer is loaded.model.layer4
    assert not loaded.model.training
    torch.testing.assert_close(loaded.model.fc.weight, net.fc.weight)
    named = load_model("torchvision:resnet18", weights=path, layer="layer3.1", input_size=64)
    assert named.layer is named.model.layer3[1]


def test_timm_model_with_local_weights(tmp_path):
    import timm

    net = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "t.pt"
    torch.save(net.state_dict(), path)
    loaded = load_model("timm:resnet10t", weights=path, input_size=64)
    assert loaded.layer_name == "layer4"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(spec="alexnet9"), "unknown model 'alexnet9'"),
        (dict(spec="torchvision:nonet"), "unknown torchvision model 'nonet'"),
        (dict(spec="timm:nonet_xyz"), "unknown timm model 'nonet_xyz'"),
        (dict(spec="efficientnet_lite0", layer="blocks.99"), "no layer 'blocks.99'"),
        (dict(spec="vgg16", weights="/nonexistent/w.pt"), "weights file not found"),
        (dict(spec="efficientnet_lite0", input_size=4), "input size"),
    ],
)
def test_user_mistakes_are_one_line_errors(kwargs, message):
    with pytest.raises(ScoreCamError, match=message) as info:
        load_model(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_weights_file(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(ScoreCamError, match="cannot read weights file"):
        load_model("torchvision:resnet18", weights=path)
    other = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(ScoreCamError, match="does not fit"):
        load_model("vgg16", weights=other)


def test_vgg16_offline_names_weights_and_offline_model(monkeypatch):
    def no_network(*_args, **_kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(ScoreCamError) as info:
        load_model("vgg16")
    text = str(info.value)
    assert "--weights" in text and "efficientnet_lite0" in text and "\n" not in text


def _normalise(image: np.ndarray, mean, std) -> torch.Tensor:
    """The plain reference: [0, 1], minus mean, over std, channels first."""
    x = (image.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))


def test_each_model_gets_its_own_mean_and_std(tmp_path):
    import timm

    # timm: the model's pretrained_cfg (Inception-style 0.5/0.5 here, and its own input size).
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert net.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    path = tmp_path / "lite0.pt"
    torch.save(net.state_dict(), path)
    loaded = load_model("timm:tf_efficientnet_lite0", weights=path)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)
    assert loaded.input_size == net.pretrained_cfg["input_size"][-1]
    # The offline model is timm's tf_efficientnet_lite0 with the TF checkpoint: the same.
    assert load_model("efficientnet_lite0", input_size=64).mean == (0.5, 0.5, 0.5)
    # torchvision: the weights' own transforms (ImageNet's for resnet18), without a download.
    r18 = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    tv = load_model("torchvision:resnet18", weights=r18, input_size=64)
    transforms = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert tv.mean == tuple(transforms.mean) and tv.std == tuple(transforms.std)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    torch.testing.assert_close(tv.preprocess(image), _normalise(image, tv.mean, tv.std))
    torch.testing.assert_close(
        loaded.preprocess(np.full((224, 224, 3), 255, np.uint8))[:, 0, 0], torch.ones(3)
    )


def test_mean_and_std_can_be_given(tmp_path):
    lite0 = load_model("efficientnet_lite0", input_size=32, mean=[0.1, 0.2, 0.3], std=(1, 2, 4))
    assert lite0.mean == (0.1, 0.2, 0.3) and lite0.std == (1.0, 2.0, 4.0)
    assert lite0.meta.mean == lite0.mean  # one record: the meta the workers hand out
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(lite0.preprocess(image), _normalise(image, lite0.mean, lite0.std))
    for kwargs, message in [
        (dict(mean=(0.5, 0.5)), "mean must be three numbers"),
        (dict(std=(0.5, 0.0, 0.5)), "std must be > 0"),
        (dict(mean=("a", 1, 2)), "mean must be three numbers"),
        (dict(fit="stretch"), "fit must be squash, pad or crop"),
    ]:
        with pytest.raises(ScoreCamError, match=message):
            load_model("efficientnet_lite0", input_size=32, **kwargs)


@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (50, 50)])
def test_fit_pad_and_crop_against_plain_slicing(shape):
    height, width = shape
    rng = np.random.default_rng(2)
    frame = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    zero, one = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    side = max(height, width)
    # pad: the frame centred in a black square of side max(H, W); size = side, no resizing
    padded = preprocess_frame(frame, side, zero, one, fit="pad")
    square = np.zeros((side, side, 3), np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top : top + height, left : left + width] = frame
    torch.testing.assert_close(padded, _normalise(square, zero, one))
    # crop: the centred square of side min(H, W)
    small = min(height, width)
    cropped = preprocess_frame(frame, small, zero, one, fit="crop")
    top, left = (height - small) // 2, (width - small) // 2
    centre = frame[top : top + small, left : left + small]
    torch.testing.assert_close(cropped, _normalise(centre, zero, one))
    # squash keeps every pixel column: the left third white stays the left third
    assert preprocess_frame(frame, 32, zero, one).shape == (3, 32, 32)
