"""Drawing Score-CAM maps over video frames: colouring, overlay, label, colour bar, sheets.

numpy and OpenCV only. Frames are RGB uint8 (H, W, 3) throughout; OpenCV's colormaps are BGR,
so they are read once into RGB lookup tables (:func:`_colormap_lut`) and never used directly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np

from .choices import FITS, LAYOUTS, Scale, spelled
from .errors import ScoreCamError
from .fit import map_to_frame

log = logging.getLogger(__name__)

COLORMAPS: dict[str, int] = {
    name.removeprefix("COLORMAP_").lower(): getattr(cv2, name)
    for name in sorted(dir(cv2))
    if name.startswith("COLORMAP_")
}

_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Text about 5.5% of the frame's height (0.75 at 360p, 1.5 at 720p, 2.25 at 1080p): readable
# on a 1080p screen and in a 320 px preview tile.
_FONT_SCALE_PER_ROW = 1 / 480
_MIN_FONT_SCALE = 0.3  # below this Hershey text is not readable
_STRIP_KEEP = 0.4  # the label strip keeps 40% of the picture behind it
_TEXT_RGB = (255, 255, 255)
_BAR_BORDER_RGB = (255, 255, 255)
_SHEET_BACKGROUND = 24
_UNSEEN_KEEP = 0.5  # with fit=crop, the parts of the frame the model did not see are dimmed
_SCALE_KEYS = 256  # running scales kept per target (oldest forgotten first)


@dataclass(frozen=True)
class RenderOptions:
    """How a map is drawn over its frame.

    ``layout``: ``overlay`` (the blend only) or ``side-by-side`` (original left, blend right).
    ``colormap``: a key of :data:`COLORMAPS`. ``alpha``: the map's weight in the blend, in
    [0, 1]. ``colorbar`` / ``label``: draw the colour bar / the caller's text line. ``fit``:
    how the frame was made square for the model (:mod:`.fit`), so the map goes back where the
    model saw it; with ``crop`` the sides it did not see are dimmed, not coloured.
    """

    layout: str = "overlay"
    colormap: str = "jet"
    alpha: float = 0.5
    colorbar: bool = True
    label: bool = True
    fit: str = "squash"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ScoreCamError(f"unknown layout '{self.layout}': use {spelled(LAYOUTS)}")
        if self.colormap not in COLORMAPS:
            raise ScoreCamError(
                f"unknown colormap '{self.colormap}': use one of jet, turbo, inferno, viridis, "
                f"magma, hot (all: {', '.join(COLORMAPS)})"
            )
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ScoreCamError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if self.fit not in FITS:
            raise ScoreCamError(f"fit must be {spelled(FITS)}, got '{self.fit}'")


class MapScaler:
    """Turns raw Score-CAM maps (float, >= 0, arbitrary scale) into [0, 1] for display.

    - ``mode="frame"``: each map on its own, ``(heat - min) / (max - min)``; a constant map
      (all zero included) gives zeros. Every frame fills the whole colour range, so weak and
      strong evidence look alike and a video flickers.
    - ``mode="running"`` (the default, for video): ``heat / scale`` clipped to [0, 1] with
      ``scale = max(max(heat), decay * previous_scale)`` (the first map's scale is its own
      max). A sudden brighter map raises the scale at once; a dimmer one after it stays dim
      instead of being stretched to full range, and the scale relaxes by ``decay`` per map,
      so after a few maps the dimmer level fills the range again. An all-zero map gives zeros.
      ``key`` (the explained class) keeps one running scale per key: a map of another class
      is measured against that class's own history, not against the previous class's peak
      (maps of different classes are not on one scale).

    A scaler holds the running state of one video: feed it the maps in frame order, and use a
    new one (or :meth:`reset`) for the next video. Non-finite values count as zero.
    """

    def __init__(self, mode: Scale = "running", decay: float = 0.9) -> None:
        if mode not in ("running", "frame"):
            raise ScoreCamError(f"unknown map scaling '{mode}': use running or frame")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ScoreCamError(f"decay must be a number in (0, 1], got {decay!r}")
        self.mode: Scale = mode
        self.decay = float(decay)
        self._scale: float | None = None
        self._scales: dict[object, float] = {}  # key -> running scale, oldest first

    @property
    def scale(self) -> float | None:
        """Return the running scale after the last map (None before the first, or in frame mode)."""
        return self._scale

    def reset(self) -> None:
        """Forget the running scales, as before the first map."""
        self._scale = None
        self._scales.clear()

    def __call__(self, heat: np.ndarray, key: object = None) -> np.ndarray:
        """Return the map scaled for display: (h, w) float32 in [0, 1].

        ``key``: whose running scale to use and update (e.g. the explained class id).
        """
        heat = np.asarray(heat, dtype=np.float32)
        if heat.ndim != 2:
            raise ValueError(f"expected an (h, w) map, got shape {heat.shape}")
        if not np.isfinite(heat).all():
            log.warning("map has non-finite values; they are shown as zero")
            heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
        if heat.size == 0:
            return heat
        if self.mode == "frame":
            low, high = float(heat.min()), float(heat.max())
            if high <= low:
                return np.zeros_like(heat)
            return (heat - low) / (high - low)
        peak = float(heat.max())
        previous = self._scales.pop(key, None)
        scale = peak if previous is None else max(peak, self.decay * previous)
        self._scales[key] = self._scale = scale
        if len(self._scales) > _SCALE_KEYS:
            del self._scales[next(iter(self._scales))]
        if scale <= 0:
            return np.zeros_like(heat)
        return np.clip(heat / scale, 0.0, 1.0)


@cache
def _colormap_lut(colormap: int) -> np.ndarray:
    """Return the colormap as a read-only (256, 3) RGB uint8 table, low value first."""
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    lut = np.ascontiguousarray(cv2.applyColorMap(ramp, colormap)[:, 0, ::-1])  # BGR -> RGB
    lut.setflags(write=False)
    return lut


def _colorize(heat: np.ndarray, colormap: int) -> np.ndarray:
    """Return (H, W, 3) RGB uint8 colours of an (H, W) [0, 1] map (values outside are clipped)."""
    index = np.clip(heat * 255.0 + 0.5, 0, 255).astype(np.uint8)  # round to the 256 levels
    # cv2.LUT on three equal channels: 5x faster than indexing the table with numpy at 720p.
    return cv2.LUT(cv2.merge((index, index, index)), _colormap_lut(colormap).reshape(256, 1, 3))


def _fit_text(text: str, width: int, scale: float) -> tuple[str, float, int] | None:
    """Return (text, font scale, thickness) that fit ``width`` px, shrunk or cut; None if none."""
    # Hershey fonts are ASCII only
    text = text.encode("ascii", "replace").decode("ascii")
    thickness = max(1, round(scale * 1.6))
    (text_w, _), _ = cv2.getTextSize(text, _FONT, scale, thickness)
    if text_w > width:
        scale = max(_MIN_FONT_SCALE, scale * width / text_w)
        thickness = max(1, round(scale * 1.6))
    while text and cv2.getTextSize(text, _FONT, scale, thickness)[0][0] > width:
        text = text[:-3].rstrip() + ".." if len(text) > 3 else ""
    if not text.strip(". "):
        return None
    return text, scale, thickness


def _draw_label(image: np.ndarray, text: str) -> None:
    """Draw ``text`` at the top-left of ``image`` (in place) on a dark translucent strip."""
    height, width = image.shape[:2]
    scale = max(_MIN_FONT_SCALE, height * _FONT_SCALE_PER_ROW)
    pad = max(2, round(8 * scale))
    fitted = _fit_text(text, width - 2 * pad, scale)
    if fitted is None:
        log.debug("frame %dx%d too small for its label", width, height)
        return
    text, scale, thickness = fitted
    (text_w, text_h), baseline = cv2.getTextSize(text, _FONT, scale, thickness)
    strip_h = text_h + baseline + 2 * pad
    if strip_h > height // 3:
        log.debug("frame %dx%d too small for its label", width, height)
        return
    strip = image[:strip_h, : min(width, text_w + 2 * pad)]
    strip[...] = (strip * _STRIP_KEEP).astype(np.uint8)
    cv2.putText(image, text, (pad, pad + text_h), _FONT, scale, _TEXT_RGB, thickness, cv2.LINE_AA)


def _draw_colorbar(image: np.ndarray, colormap: int) -> None:
    """Draw the colormap (low at the bottom) as a bordered bar at the right edge, in place."""
    height, width = image.shape[:2]
    bar_h = round(0.4 * height)
    bar_w = max(6, round(0.025 * width))
    margin = max(2, round(0.015 * width))
    if bar_h < 12 or bar_w + 2 * margin > width // 4:
        log.debug("frame %dx%d too small for a colour bar", width, height)
        return
    x0, y0 = width - margin - bar_w, (height - bar_h) // 2
    # (bar_h - 2,) levels, high at the top; the border takes the outer pixel row/column
    levels = np.linspace(1.0, 0.0, bar_h - 2, dtype=np.float32)
    gradient = _colorize(levels[:, None], colormap)
    image[y0 + 1 : y0 + bar_h - 1, x0 + 1 : x0 + bar_w - 1] = gradient
    cv2.rectangle(image, (x0, y0), (x0 + bar_w - 1, y0 + bar_h - 1), _BAR_BORDER_RGB, 1)


class ColourCache:
    """Keeps the colours of the last map drawn: a live output draws one map over many frames.

    The map is recognised by identity (``is``), so a map must not be changed once drawn.
    """

    def __init__(self) -> None:
        self._heat: np.ndarray | None = None
        self._key: tuple[int, int, str, int] | None = None
        self._value: tuple[np.ndarray, tuple[int, int, int, int]] | None = None

    def colours(
        self, heat: np.ndarray, height: int, width: int, fit: str, colormap: int
    ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Return ((H, W, 3) RGB colours of ``heat`` over the frame, (top, left, h, w) seen)."""
        key = (height, width, fit, colormap)
        if self._value is None or heat is not self._heat or key != self._key:
            # (H, W) map over the frame, back where the model saw each part of it
            full, box = map_to_frame(heat, height, width, fit)
            self._heat, self._key, self._value = heat, key, (_colorize(full, colormap), box)
        return self._value


def render_frame(
    frame: np.ndarray,
    heat: np.ndarray,
    label: str | None,
    options: RenderOptions,
    colours: ColourCache | None = None,
) -> np.ndarray:
    """Return the frame with its map drawn: RGB uint8 (H, W, 3), or (H, 2W, 3) side by side.

    ``frame`` is RGB uint8 (H, W, 3); ``heat`` a display-scaled map in [0, 1] covering the
    square model input at any resolution, put back over the frame as ``options.fit`` says
    (bilinearly). The blend is
    ``(1 - alpha) * frame + alpha * colour``; the label and colour bar go on the blend (the
    right panel side by side, whose left panel is the untouched frame). ``frame`` is not
    modified. ``colours``: where the map's colours are kept from one call to the next.
    """
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) frame, got {frame.dtype} {frame.shape}")
    if heat.ndim != 2:
        raise ValueError(f"expected an (h, w) map, got shape {heat.shape}")
    height, width = frame.shape[:2]
    colormap = COLORMAPS[options.colormap]
    colours = colours or ColourCache()
    colour, (top, left, h, w) = colours.colours(heat, height, width, options.fit, colormap)
    overlay = cv2.addWeighted(
        np.ascontiguousarray(frame), 1.0 - options.alpha, colour, options.alpha, 0.0
    )
    if (h, w) != (height, width):  # crop: the sides were not seen, so they carry no colour
        seen = overlay[top : top + h, left : left + w].copy()
        overlay = (frame * _UNSEEN_KEEP).astype(np.uint8)
        overlay[top : top + h, left : left + w] = seen
    if options.label and label:
        _draw_label(overlay, label)
    if options.colorbar:
        _draw_colorbar(overlay, colormap)
    if options.layout == "side-by-side":
        return np.concatenate([frame, overlay], axis=1)
    return overlay


def preview_sheet(
    frames: list[np.ndarray], columns: int = 4, tile_width: int = 320, gap: int = 4
) -> np.ndarray:
    """Return a contact sheet of ``frames`` (RGB uint8), row by row on a dark background.

    Each frame is resized to ``tile_width`` keeping its aspect ratio; cells are as tall as the
    tallest tile (shorter tiles centred) and ``gap`` px apart and from the edges. With fewer
    frames than ``columns`` the sheet has one column per frame.
    """
    if not frames:
        raise ScoreCamError("no frames for the preview sheet")
    if columns < 1:
        raise ScoreCamError(f"preview columns must be at least 1, got {columns}")
    if tile_width < 1:
        raise ScoreCamError(f"preview tile width must be at least 1, got {tile_width}")
    if gap < 0:
        raise ScoreCamError(f"preview gap must be at least 0, got {gap}")
    tiles = []
    for frame in frames:
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(
                f"expected RGB uint8 (H, W, 3) frames, got {frame.dtype} {frame.shape}"
            )
        height, width = frame.shape[:2]
        tile_h = max(1, round(height * tile_width / width))
        shrink = tile_width < width
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        tiles.append(cv2.resize(frame, (tile_width, tile_h), interpolation=interpolation))
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    cell_h = max(tile.shape[0] for tile in tiles)
    sheet = np.full(
        (rows * cell_h + (rows + 1) * gap, columns * tile_width + (columns + 1) * gap, 3),
        _SHEET_BACKGROUND,
        dtype=np.uint8,
    )
    for i, tile in enumerate(tiles):
        row, col = divmod(i, columns)
        y = gap + row * (cell_h + gap) + (cell_h - tile.shape[0]) // 2
        x = gap + col * (tile_width + gap)
        sheet[y : y + tile.shape[0], x : x + tile_width] = tile
    return sheet
