"""Rendering: colours where the map is hot, exact blends, layouts, colour bar, scaling, sheets."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from scorecam_stream.errors import ScoreCamError
from scorecam_stream.render import (
    ColourCache,
    MapScaler,
    RenderOptions,
    preview_sheet,
    render_frame,
)

PLAIN = {"label": False, "colorbar": False}


def noise_frame(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def hot_square_map(size: int = 56) -> np.ndarray:
    """A (size, size) map, 1 in the square [size/4, size/2) on both axes, 0 elsewhere."""
    heat = np.zeros((size, size), dtype=np.float32)
    heat[size // 4 : size // 2, size // 4 : size // 2] = 1.0
    return heat


# OpenCV's colormaps as its documentation lists them (cv::ColormapTypes), written out here so
# the test does not repeat render.py's own lookup.
OPENCV_COLORMAPS = (
    "autumn", "bone", "jet", "winter", "rainbow", "ocean", "summer", "spring", "cool", "hsv",
    "pink", "hot", "parula", "magma", "inferno", "plasma", "viridis", "cividis", "twilight",
    "twilight_shifted", "turbo", "deepgreen",
)  # fmt: skip


def test_every_opencv_colormap_is_accepted_and_each_draws_its_own_colours() -> None:
    levels = np.arange(256, dtype=np.float32).reshape(16, 16) / 255.0
    drawn = {}
    for name in OPENCV_COLORMAPS:
        options = RenderOptions(colormap=name, alpha=1.0, **PLAIN)
        drawn[name] = render_frame(noise_frame(16, 16), levels, None, options).tobytes()
    assert len(set(drawn.values())) == len(OPENCV_COLORMAPS)  # no two names share a table
    with pytest.raises(ScoreCamError, match="unknown colormap 'jett'"):
        RenderOptions(colormap="jett")


def test_colour_cache_draws_what_a_fresh_render_draws() -> None:
    # One cache over frames of two sizes, two fits and two maps, in an order that goes back and
    # forth: every picture equals the one drawn without a cache.
    cache, first, second = ColourCache(), hot_square_map(), np.eye(8, dtype=np.float32)
    for heat, height, width, fit in [
        (first, 120, 200, "squash"),
        (first, 120, 200, "squash"),  # kept
        (second, 120, 200, "squash"),  # another map
        (second, 90, 160, "squash"),  # the source changed size
        (second, 90, 160, "crop"),
        (first, 90, 160, "crop"),
    ]:
        frame = noise_frame(height, width, seed=height)
        options = RenderOptions(fit=fit)
        expected = render_frame(frame, heat, "cat", options)
        assert np.array_equal(render_frame(frame, heat, "cat", options, cache), expected)


def test_overlay_is_red_where_the_map_is_hot() -> None:
    # non-square frame: the 56 x 56 map is stretched back over the whole 120 x 200 frame
    frame = np.full((120, 200, 3), 128, dtype=np.uint8)
    out = render_frame(frame, hot_square_map(), None, RenderOptions(alpha=0.6, **PLAIN))
    red_minus_blue = out[..., 0].astype(int) - out[..., 2].astype(int)
    # the square covers rows [30, 60) and columns [50, 100); keep clear of blurred edges
    inside = np.zeros((120, 200), dtype=bool)
    inside[34:56, 56:94] = True
    outside = np.ones((120, 200), dtype=bool)
    outside[26:64, 44:106] = False
    assert red_minus_blue[inside].mean() > 50
    assert red_minus_blue[outside].mean() < -50


def test_alpha_zero_gives_the_frame_exactly() -> None:
    frame = noise_frame(48, 64)
    out = render_frame(frame, hot_square_map(), None, RenderOptions(alpha=0.0, **PLAIN))
    np.testing.assert_array_equal(out, frame)


# The published end colours (RGB) of each colormap: low value, high value. Independent of
# OpenCV, so a BGR/RGB swap or a reversed table fails.
COLOUR_ENDS = {
    "jet": ((0, 0, 128), (128, 0, 0)),
    "viridis": ((68, 1, 84), (253, 231, 37)),
    "inferno": ((0, 0, 4), (252, 255, 164)),
    "turbo": ((48, 18, 59), (122, 4, 3)),
}


@pytest.mark.parametrize("colormap", sorted(COLOUR_ENDS))
def test_alpha_one_gives_the_colormap_in_rgb(colormap: str) -> None:
    # a 16 x 16 map at frame resolution holds each of the 256 levels once
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    options = RenderOptions(colormap=colormap, alpha=1.0, **PLAIN)
    out = render_frame(noise_frame(16, 16), levels / 255.0, None, options).astype(int)
    low, high = COLOUR_ENDS[colormap]
    assert np.abs(out[0, 0] - low).max() <= 4 and np.abs(out[15, 15] - high).max() <= 4
    # one colour per level: the same level anywhere gives the same colour, neighbours are close
    steps = np.abs(np.diff(out.reshape(256, 3), axis=0)).max(axis=1)
    assert steps.max() <= 12 and len({tuple(c) for c in out.reshape(256, 3)}) > 200


def test_render_does_not_modify_the_frame() -> None:
    frame = noise_frame(90, 160)
    before = frame.copy()
    render_frame(frame, hot_square_map(), "cat 0.90", RenderOptions(layout="side-by-side"))
    np.testing.assert_array_equal(frame, before)


@pytest.mark.parametrize(("height", "width"), [(90, 160), (160, 90), (64, 64)])
def test_layout_shapes(height: int, width: int) -> None:
    frame = noise_frame(height, width)
    heat = hot_square_map()
    overlay = render_frame(frame, heat, "cat 0.90", RenderOptions())
    side = render_frame(frame, heat, "cat 0.90", RenderOptions(layout="side-by-side"))
    assert overlay.shape == (height, width, 3) and overlay.dtype == np.uint8
    assert side.shape == (height, 2 * width, 3) and side.dtype == np.uint8


def test_side_by_side_is_original_then_overlay() -> None:
    frame = noise_frame(120, 200)
    heat = hot_square_map()
    side = render_frame(frame, heat, "cat 0.90", RenderOptions(layout="side-by-side"))
    overlay = render_frame(frame, heat, "cat 0.90", RenderOptions())
    np.testing.assert_array_equal(side[:, :200], frame)
    np.testing.assert_array_equal(side[:, 200:], overlay)


def test_colorbar_changes_only_the_right_edge() -> None:
    frame = noise_frame(200, 300)
    heat = hot_square_map()
    without = render_frame(frame, heat, None, RenderOptions(label=False, colorbar=False))
    with_bar = render_frame(frame, heat, None, RenderOptions(label=False, colorbar=True))
    rows, cols = np.nonzero((without != with_bar).any(axis=2))
    assert cols.size > 0
    assert cols.min() >= 300 - 30  # within the right 10%
    height = rows.max() - rows.min() + 1
    assert 0.3 * 200 <= height <= 0.5 * 200


def test_colorbar_runs_from_low_at_the_bottom_to_high_at_the_top() -> None:
    frame = np.zeros((200, 300, 3), dtype=np.uint8)
    options = RenderOptions(colormap="jet", alpha=0.0, label=False)
    out = render_frame(frame, np.zeros((8, 8)), None, options)
    column = out[:, (out.sum(axis=2) > 0).any(axis=0).nonzero()[0].mean().astype(int)]
    painted = column[column.sum(axis=1) > 0]
    top, bottom = painted[2].astype(int), painted[-3].astype(int)  # inside the border
    assert top[0] > top[2]  # jet high: red
    assert bottom[2] > bottom[0]  # jet low: blue


def test_label_draws_a_dark_strip_with_light_text_top_left() -> None:
    frame = np.full((360, 640, 3), 255, dtype=np.uint8)
    options = RenderOptions(alpha=0.0, colorbar=False)
    out = render_frame(frame, np.zeros((8, 8)), "Egyptian cat 0.78  00:01.25", options)
    rows, cols = np.nonzero((out != frame).any(axis=2))
    assert rows.max() < 360 // 3 and cols.min() < 20 and rows.min() < 20
    strip = out[: rows.max() + 1, : cols.max() + 1]
    assert (strip < 128).all(axis=2).mean() > 0.5  # mostly dark behind the text...
    assert (strip > 200).all(axis=2).any()  # ...with light text on it
    # no label text, or labels switched off, draws nothing
    plain = render_frame(frame, np.zeros((8, 8)), None, options)
    off = render_frame(frame, np.zeros((8, 8)), "cat", RenderOptions(alpha=0.0, **PLAIN))
    np.testing.assert_array_equal(plain, frame)
    np.testing.assert_array_equal(off, frame)


def _text_rows(out: np.ndarray) -> np.ndarray:
    """Return the rows holding the label's light text (on a black frame, alpha 0)."""
    return np.nonzero((out > 200).all(axis=2).any(axis=1))[0]


@pytest.mark.parametrize("height", [360, 720, 1080])
def test_label_is_sized_with_the_frame(height: int) -> None:
    frame = np.zeros((height, height * 16 // 9, 3), dtype=np.uint8)
    options = RenderOptions(alpha=0.0, colorbar=False)
    out = render_frame(frame, np.zeros((8, 8)), "Egyptian cat 0.78  00:01.25", options)
    rows = _text_rows(out)
    # Cap to baseline about 4% of the height: readable on 1080p and in a 320 px preview tile.
    assert 0.035 * height <= rows.max() - rows.min() + 1 <= 0.08 * height


def test_long_label_stays_inside_a_narrow_frame() -> None:
    frame = np.zeros((400, 120, 3), dtype=np.uint8)
    options = RenderOptions(alpha=0.0, colorbar=False)
    text = "a very long class name 0.99  01:02.03"
    out = render_frame(frame, np.zeros((8, 8)), text, options)
    cols = np.nonzero((out > 200).all(axis=2).any(axis=0))[0]
    assert cols.size > 0 and cols.min() >= 2 and cols.max() <= 120 - 3  # text clear of edges
    # It was shrunk or cut to fit: at the full size the text alone would be wider than 120 px.
    full = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 400 / 480, 1)[0][0]
    assert full > 120
    wide = render_frame(np.zeros((400, 2000, 3), np.uint8), np.zeros((8, 8)), text, options)
    assert _text_rows(out).size < _text_rows(wide).size  # smaller letters in the narrow frame


@pytest.mark.parametrize(("height", "width"), [(16, 16), (1, 1), (3, 40)])
def test_tiny_frames_render_without_label_or_bar(height: int, width: int) -> None:
    frame = noise_frame(height, width)
    heat = hot_square_map()
    out = render_frame(frame, heat, "Egyptian cat 0.78", RenderOptions(alpha=0.0))
    np.testing.assert_array_equal(out, frame)  # neither fits, so nothing is drawn
    side = render_frame(frame, heat, "cat", RenderOptions(layout="side-by-side"))
    assert side.shape == (height, 2 * width, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layout": "grid"}, "layout"),
        ({"colormap": "rainbowz"}, "jet"),
        ({"colormap": "JET"}, "colormap"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"fit": "stretch"}, "fit"),
    ],
)
def test_render_options_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ScoreCamError, match=match) as error:
        RenderOptions(**kwargs)
    assert "\n" not in str(error.value)


def test_frame_scaler_min_max() -> None:
    scaler = MapScaler("frame")
    out = scaler(np.array([[2.0, 4.0], [6.0, 10.0]]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(scaler(np.full((3, 5), 7.0)), np.zeros((3, 5)))
    np.testing.assert_array_equal(scaler(np.zeros((3, 5))), np.zeros((3, 5)))


def test_running_scaler_rises_at_once_and_recovers_with_decay() -> None:
    scaler = MapScaler("running", decay=0.5)
    dim = np.array([[0.0, 1.0]])
    np.testing.assert_allclose(scaler(dim), [[0.0, 1.0]])  # first map: its own max
    np.testing.assert_allclose(scaler(dim * 8), [[0.0, 1.0]])  # brighter: scale jumps to 8
    assert scaler.scale == 8.0
    peaks = [float(scaler(dim).max()) for _ in range(4)]
    # the dim map after the bright one is not stretched; the scale halves until 1 is reached
    np.testing.assert_allclose(peaks, [0.25, 0.5, 1.0, 1.0])
    assert scaler(dim * 0.5).dtype == np.float32


def test_running_scaler_keeps_one_scale_per_target() -> None:
    scaler = MapScaler("running", decay=0.5)
    llama, gorilla = np.array([[0.0, 10.0]]), np.array([[0.0, 1.0]])
    np.testing.assert_allclose(scaler(llama, key="llama"), [[0.0, 1.0]])
    # another class after a strong map: its own evidence fills the range at once
    np.testing.assert_allclose(scaler(gorilla, key="gorilla"), [[0.0, 1.0]])
    # back to the first class: measured against its own history (decayed once)
    np.testing.assert_allclose(scaler(llama * 0.25, key="llama"), [[0.0, 0.5]])
    # without keys, the dim map after the strong one is nearly blank (the symptom)
    plain = MapScaler("running", decay=0.5)
    plain(llama)
    assert float(plain(gorilla).max()) == pytest.approx(0.2)
    scaler.reset()
    np.testing.assert_allclose(scaler(llama * 0.25, key="llama"), [[0.0, 1.0]])


@pytest.mark.parametrize("fit", ["squash", "pad", "crop"])
def test_the_map_goes_back_where_the_model_saw_it(fit: str) -> None:
    """A hot square in the model input lands on the frame pixels it came from."""
    from scorecam_stream.models import preprocess_frame

    height, width, size = 90, 160, 64
    # which frame pixels the model input's hot square came from: mark the frame, preprocess it
    heat = hot_square_map(size)
    marks = np.zeros((height, width, 3), np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    marks[..., 0], marks[..., 1] = rows * 255 // height, cols * 255 // width
    x = preprocess_frame(marks, size, (0, 0, 0), (1 / 255, 1 / 255, 1 / 255), fit=fit).numpy()
    hot = heat > 0.5
    row_range = x[0][hot].min() * height / 255, x[0][hot].max() * height / 255
    col_range = x[1][hot].min() * width / 255, x[1][hot].max() * width / 255
    frame = np.full((height, width, 3), 128, np.uint8)
    out = render_frame(frame, heat, None, RenderOptions(alpha=1.0, fit=fit, **PLAIN))
    red = (out[..., 0].astype(int) - out[..., 2]) > 100
    r, c = np.nonzero(red)
    assert abs(r.min() - row_range[0]) <= 3 and abs(r.max() - row_range[1]) <= 3
    assert abs(c.min() - col_range[0]) <= 3 and abs(c.max() - col_range[1]) <= 3
    if fit == "crop":  # the sides the model did not see: dimmed frame, no colour
        side = (width - height) // 2
        np.testing.assert_array_equal(out[:, : side - 1], 64)
        np.testing.assert_array_equal(out[:, width - side + 1 :], 64)


def test_running_scaler_clips_and_handles_zero_maps() -> None:
    scaler = MapScaler()
    np.testing.assert_array_equal(scaler(np.zeros((2, 2))), np.zeros((2, 2)))
    out = scaler(np.array([[0.0, 3.0]]))
    np.testing.assert_allclose(out, [[0.0, 1.0]])
    assert ((out >= 0) & (out <= 1)).all()
    scaler.reset()
    assert scaler.scale is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mode": "global"}, "scaling"), ({"decay": 0.0}, "decay"), ({"decay": 1.5}, "decay")],
)
def test_map_scaler_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ScoreCamError, match=match):
        MapScaler(**kwargs)


def test_preview_sheet_grid() -> None:
    frames = [noise_frame(90, 160, seed) for seed in range(8)]
    sheet = preview_sheet(frames, columns=4, tile_width=80, gap=4)
    # 4 columns x 2 rows of 80 x 45 tiles
    assert sheet.shape == (2 * 45 + 3 * 4, 4 * 80 + 5 * 4, 3) and sheet.dtype == np.uint8
    np.testing.assert_array_equal(
        sheet[4 : 4 + 45, 4 : 4 + 80], cv2.resize(frames[0], (80, 45), interpolation=cv2.INTER_AREA)
    )
    assert (sheet[:4] < 40).all()  # dark background around the tiles


def test_preview_sheet_mixed_aspects_and_few_frames() -> None:
    sheet = preview_sheet([noise_frame(90, 160), noise_frame(160, 90)], columns=4, tile_width=90)
    # one column per frame; the cell is as tall as the portrait tile
    assert sheet.shape == (160 + 2 * 4, 2 * 90 + 3 * 4, 3)


def test_preview_sheet_validation() -> None:
    with pytest.raises(ScoreCamError, match="no frames"):
        preview_sheet([])
    with pytest.raises(ScoreCamError, match="columns"):
        preview_sheet([noise_frame(8, 8)], columns=0)
