"""How a frame of any shape becomes the square model input, and how its map goes back.

numpy and OpenCV only; shared by preprocessing (models/meta.py) and drawing (render.py).

- ``squash``: the whole frame resized to S x S; a 16:9 frame is squeezed horizontally.
- ``pad``: the frame scaled into a black square of side max(H, W), centred; nothing cut,
  shapes kept, a smaller picture.
- ``crop``: the centred square of side min(H, W); shapes kept, the sides not seen.
"""

from __future__ import annotations

import cv2
import numpy as np


def fit_box(height: int, width: int, fit: str) -> tuple[int, int, int, int]:
    """Return (top, left, h, w) of the frame's part in the square image the model sees.

    pad: where the whole frame sits in the square of side max(H, W); crop: the part of the
    frame that is kept (its centred square); squash: the whole frame.
    """
    if fit == "crop":
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side
    if fit == "pad":
        side = max(height, width)
        return (side - height) // 2, (side - width) // 2, height, width
    return 0, 0, height, width


def fit_frame(frame: np.ndarray, fit: str) -> np.ndarray:
    """Return the frame made square as ``fit`` says (squash: unchanged, resized later)."""
    height, width = frame.shape[:2]
    if fit == "squash" or height == width:
        return frame
    top, left, h, w = fit_box(height, width, fit)
    if fit == "crop":
        return frame[top : top + h, left : left + w]
    side = max(height, width)
    # Black in pixel values: what a letterboxed picture shows.
    square = np.zeros((side, side, *frame.shape[2:]), dtype=frame.dtype)
    square[top : top + h, left : left + w] = frame
    return square


def map_to_frame(heat: np.ndarray, height: int, width: int, fit: str) -> tuple[np.ndarray, tuple]:
    """Return (the (H, W) float32 map over the frame, (top, left, h, w) of where it is valid).

    ``heat`` (S, S) covers the square model input. With ``crop`` only the centred square of the
    frame was seen: outside it the map is zero and not valid.
    """
    heat = heat.astype(np.float32, copy=False)
    if fit == "squash" or height == width:
        out = cv2.resize(heat, (width, height), interpolation=cv2.INTER_LINEAR)
        return out, (0, 0, height, width)
    top, left, h, w = fit_box(height, width, fit)
    if fit == "pad":
        side = max(height, width)
        square = cv2.resize(heat, (side, side), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(square[top : top + h, left : left + w]), (0, 0, height, width)
    out = np.zeros((height, width), np.float32)
    out[top : top + h, left : left + w] = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    return out, (top, left, h, w)


def fit_to(image: np.ndarray, height: int, width: int, fit: str) -> np.ndarray:
    """Return ``image`` made ``height`` x ``width`` as ``fit`` says (a frame of another size).

    squash: resized; pad: scaled into the box, centred on black; crop: scaled to cover the box,
    its centre kept.
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    if fit == "squash":
        scale_y, scale_x = height / h, width / w
    else:
        pick = min if fit == "pad" else max
        scale_y = scale_x = pick(height / h, width / w)
    size = (max(1, round(w * scale_x)), max(1, round(h * scale_y)))
    shrink = size[0] * size[1] < w * h
    scaled = cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    sh, sw = scaled.shape[:2]
    if (sh, sw) == (height, width):
        return scaled
    if fit == "crop" or (sh >= height and sw >= width):
        top, left = (sh - height) // 2, (sw - width) // 2
        return np.ascontiguousarray(scaled[top : top + height, left : left + width])
    box = np.zeros((height, width, *image.shape[2:]), dtype=image.dtype)
    top, left = (height - sh) // 2, (width - sw) // 2
    box[top : top + sh, left : left + sw] = scaled[: height - top, : width - left]
    return box
