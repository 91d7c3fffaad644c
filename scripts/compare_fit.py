"""Which --fit shows the model its frames best: target probability per fit, on real pictures.

    python scripts/compare_fit.py [--sizes 224 128] [--model efficientnet_lite0]

Frames: the quick start's sample clip (pan/zoom over the cat, 4:3 and 16:9), and 16:9 windows
panning over the other real photos of scikit-image whose ImageNet classes are known. For each
fit (squash, pad, crop) and model input size: the mean probability of the frame's true class
(its ImageNet classes summed) and how often one of them is top-1. One forward per frame and fit;
prints a table (no timing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_video import pan_zoom_frames

from scorecam_stream.models import load_model, preprocess_frame

# Photo -> its acceptable ImageNet classes.
PHOTOS = {
    "coffee": (data.coffee, {967, 968, 504}),  # espresso, cup, coffee mug
    "rocket": (data.rocket, {657, 744, 812}),  # missile, projectile, space shuttle
    "motorcycle": (lambda: data.stereo_motorcycle()[0], {670, 665}),  # motor scooter, moped
    "cat photo": (data.chelsea, {281, 282, 285}),  # tabby, tiger cat, Egyptian cat
}
CAT = {281, 282, 285}


def windows(image: np.ndarray, count: int, width: int, height: int) -> list[np.ndarray]:
    """Return ``count`` (height, width) frames panning left to right over ``image`` (16:9)."""
    h, w = image.shape[:2]
    crop_h = min(h, round(w * height / width))
    crop_w = round(crop_h * width / height)
    top = (h - crop_h) // 2
    lefts = np.linspace(0, w - crop_w, count).round().astype(int)
    return [
        cv2.resize(image[top : top + crop_h, x : x + crop_w], (width, height), cv2.INTER_AREA)
        for x in lefts
    ]


def clips() -> dict[str, tuple[list[np.ndarray], set[int]]]:
    """Return name -> (frames, acceptable classes)."""
    out = {
        "sample clip 4:3": (pan_zoom_frames(24, 320, 240), CAT),
        "sample clip 16:9": (pan_zoom_frames(24, 640, 360), CAT),
    }
    for name, (load, classes) in PHOTOS.items():
        out[f"{name} 16:9"] = (windows(load(), 8, 1280, 720), classes)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 128])
    args = parser.parse_args()
    torch.set_num_threads(2)
    sets = clips()
    for size in args.sizes:
        loaded = load_model(args.model, input_size=size)
        print(f"\n{args.model} @ {size} px (mean {loaded.mean}, std {loaded.std})")
        print(f"{'frames':<20}" + "".join(f"{fit:>20}" for fit in ("squash", "pad", "crop")))
        totals = {fit: [] for fit in ("squash", "pad", "crop")}
        for name, (frames, classes) in sets.items():
            row = f"{name:<20}"
            for fit in totals:
                x = torch.stack(
                    [preprocess_frame(f, size, loaded.mean, loaded.std, fit) for f in frames]
                )
                with torch.inference_mode():
                    p = loaded.model(x).softmax(1)
                wanted = torch.tensor(sorted(classes))
                prob = p[:, wanted].sum(1)
                top1 = torch.isin(p.argmax(1), wanted).float()
                totals[fit].append((prob.mean().item(), top1.mean().item()))
                row += f"{prob.mean().item():>12.3f} ({top1.mean().item():.2f})"
            print(row)
        row = f"{'mean of the sets':<20}"
        for values in totals.values():
            row += (
                f"{np.mean([v[0] for v in values]):>12.3f} ({np.mean([v[1] for v in values]):.2f})"
            )
        print(row)
    print("\nmean probability of the true classes (share of frames where one is top-1)")


if __name__ == "__main__":
    main()
