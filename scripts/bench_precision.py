"""How far reduced-precision Score-CAM maps are from fp32's, on real photos and a real model.

    python scripts/bench_precision.py --size 128 --photos 4 --layers blocks.6 --dtypes bf16
    python scripts/bench_precision.py --size 128 --photos 3 --max-channels 48 \\
        --layers bn2 blocks.6 --dtypes bf16 fp16 --reduced-base

The offline EfficientNet-Lite0 (real ImageNet weights) explains scikit-image photos; for each
target layer the fp32 maps are the reference and each dtype's maps (same frames, same targets)
get, per frame, their Pearson correlation with fp32's and their difference as a fraction of
fp32's norm (:func:`scorecam_stream.metrics.map_agreement`). ``--reduced-base`` adds a row per
dtype with the base pass in that dtype too (the engine before issue 20), to show what the fp32
base pass is worth; ``--fp32-modules conv_stem classifier`` runs those modules in fp32 inside the
reduced-precision passes (autocast off, inputs cast up), to find where precision is lost.
Prints a Markdown table; ``--out`` writes the rows as JSON.
On a CPU without native fp16 (most), fp16 autocast is ~10x slower than fp32: use
``--max-channels`` (Faster Score-CAM, the same channels for every dtype) to keep it short.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from skimage import data  # noqa: E402

from scorecam_stream import ScoreCAM, load_model  # noqa: E402
from scorecam_stream.metrics import (  # noqa: E402
    AGREEMENT_CORRELATION,
    AGREEMENT_ERROR,
    map_agreement,
)

# Real colour photos with distinct ImageNet classes (data.cat() is chelsea again).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
COLUMNS = ("layer", "max_channels", "dtype", "base", "fp32_modules", "corr_min", "corr_mean")
COLUMNS += ("error_max",)
COLUMNS += ("error_mean", "ok", "seconds")


class ReducedBase(ScoreCAM):
    """The engine with its base pass in the reduced dtype too: the behaviour before issue 20."""

    def _forward(self, x: torch.Tensor, reduced: bool = True) -> torch.Tensor:
        return super()._forward(x, reduced=True)


@contextlib.contextmanager
def fp32_modules(model: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Run the named modules of ``model`` in fp32 (autocast off, float inputs) while held."""
    modules = dict(model.named_modules())
    originals = {name: modules[name].forward for name in names}

    def in_fp32(forward):
        def run(*args, **kwargs):
            args = [a.float() if torch.is_tensor(a) else a for a in args]
            with torch.autocast(args[0].device.type, enabled=False):
                return forward(*args, **kwargs)

        return run

    for name, forward in originals.items():
        modules[name].forward = in_fp32(forward)
    try:
        yield
    finally:
        for name in originals:
            del modules[name].forward  # back to the class's own method


def agreement_rows(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    x: torch.Tensor,
    dtypes: list[str],
    batch_size: int = 64,
    max_channels: int | None = None,
    reduced_base: bool = False,
    fp32_names: Sequence[str] = (),
) -> list[dict[str, object]]:
    """Return one row per dtype: worst and mean correlation and error against fp32, seconds."""
    options = dict(batch_size=batch_size, max_channels=max_channels)
    began = time.perf_counter()
    fp32 = ScoreCAM(model, layer, **options)(x)
    rows: list[dict[str, object]] = [
        {"dtype": "fp32", "base": "fp32", "seconds": time.perf_counter() - began}
    ]
    variants = [(d, ScoreCAM, "fp32") for d in dtypes]
    if reduced_base:
        variants += [(d, ReducedBase, d) for d in dtypes]
    for dtype, engine_class, base in variants:
        began = time.perf_counter()
        with fp32_modules(model, fp32_names):
            engine = engine_class(model, layer, dtype=dtype, **options)
            maps = engine(x, targets=fp32.targets).maps
        seconds = time.perf_counter() - began
        corr, error = map_agreement(maps, fp32.maps)
        rows.append(
            {
                "dtype": dtype,
                "base": base,
                "fp32_modules": " ".join(fp32_names),
                "corr_min": float(corr.min()),
                "corr_mean": float(corr.mean()),
                "error_max": float(error.max()),
                "error_mean": float(error.mean()),
                "ok": bool(corr.min() >= AGREEMENT_CORRELATION and error.max() <= AGREEMENT_ERROR),
                "seconds": seconds,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="model input side (px)")
    parser.add_argument("--photos", type=int, default=len(PHOTOS), help=f"of {PHOTOS}")
    parser.add_argument("--layers", nargs="+", default=["bn2", "blocks.6"])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"])
    parser.add_argument("--max-channels", type=int, help="Faster Score-CAM: top-N channels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reduced-base", action="store_true", help="also the old base pass")
    parser.add_argument("--fp32-modules", nargs="*", default=[], help="modules kept in fp32")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = PHOTOS[: args.photos]
    print(f"# {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, torch {torch.__version__}")
    print(f"# efficientnet_lite0 at {args.size} px, photos {', '.join(names)}")
    report = []
    for layer_name in args.layers:
        lite = load_model("efficientnet_lite0", input_size=args.size, layer=layer_name)
        x = torch.stack([lite.preprocess(getattr(data, n)()) for n in names])
        rows = agreement_rows(
            lite.model,
            lite.layer,
            x,
            args.dtypes,
            args.batch_size,
            args.max_channels,
            args.reduced_base,
            args.fp32_modules,
        )
        for row in rows:
            row = {"layer": layer_name, "max_channels": args.max_channels, **row}
            report.append(row)
            values = [row.get(c, "") for c in COLUMNS]
            cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in values]
            if len(report) == 1:
                print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
            print("| " + " | ".join(cells) + " |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
