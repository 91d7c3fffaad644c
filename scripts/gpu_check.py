"""GPU check of the engine (no Ray, no PyAV): VGG16 on CUDA, reduced precision and throughput.

    python scripts/gpu_check.py                  # on a CUDA machine; < 5 minutes
    python scripts/gpu_check.py --device cpu --size 64 --batches 8 --frames 1   # smoke test

1. Correctness: relative error ||map - map_fp32|| / ||map_fp32|| of bf16 and fp16 autocast maps.
2. Throughput: masked images/s of the engine (and the raw forward rate at the same batch) for
   fp32, bf16, bf16 + channels_last and fp16 + channels_last, at several batch sizes.
Random weights are fine for timing; seeded so runs compare.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from scorecam_stream import ScoreCAM

CONFIGS = {
    "fp32": dict(dtype=None, channels_last=False),
    "bf16": dict(dtype="bf16", channels_last=False),
    "bf16+channels_last": dict(dtype="bf16", channels_last=True),
    "fp16+channels_last": dict(dtype="fp16", channels_last=True),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--batches", default="64,128,256,512")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval().to(device)
    layer = model.features[29]
    # Smooth, image-like inputs: random weights on white noise give degenerate activations.
    x = torch.nn.functional.interpolate(
        torch.randn(args.frames, 3, 14, 14), size=args.size, mode="bilinear"
    ).to(device)

    print("\n## correctness (relative error of the map vs fp32)")
    reference = ScoreCAM(model, layer, batch_size=64)(x)
    print(f"fp32: targets {reference.targets.tolist()}, skipped {reference.skipped.tolist()}")
    for dtype in ("bf16", "fp16"):
        maps = ScoreCAM(model, layer, batch_size=64, dtype=dtype)(x, targets=reference.targets)
        err = float((maps.maps - reference.maps).norm() / reference.maps.norm())
        print(f"{dtype}: relative error {err:.2e}")

    print("\n## throughput (masked images/s; raw forward images/s at the same batch)")
    print("| config | batch | masked img/s | raw img/s | efficiency | s/frame |")
    print("|---|---|---|---|---|---|")
    for name, options in CONFIGS.items():
        model.to(memory_format=torch.contiguous_format)
        for batch in (int(b) for b in args.batches.split(",")):
            engine = ScoreCAM(model, layer, batch_size=batch, skip_constant=False, **options)
            engine(x[:1])  # warm-up: cudnn picks its kernels
            sync(device)
            began = time.perf_counter()
            result = engine(x)
            sync(device)
            seconds = time.perf_counter() - began
            passes = len(x) * 512 - int(result.skipped.sum())
            inputs = x[:1].expand(batch, -1, -1, -1).contiguous()
            with torch.inference_mode():
                engine._forward(inputs)
                sync(device)
                began = time.perf_counter()
                for _ in range(3):
                    engine._forward(inputs)
                sync(device)
                raw = 3 * batch / (time.perf_counter() - began)
            rate = passes / seconds
            print(
                f"| {name} | {batch} | {rate:.0f} | {raw:.0f} | {rate / raw:.2f} | "
                f"{seconds / len(x):.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
