"""The GPU check: correctness, throughput, end to end and Ray on one CUDA machine, in one run.

    . .gpu/setup.sh && python scripts/gpu_check.py --out $OUT/gpu_check.json   # CUDA, < 6 min
    python scripts/gpu_check.py --smoke --out /tmp/gpu_check.json               # CPU, tiny sizes

a. correctness: VGG16 fp32 maps vs a plain per-channel loop; bf16, fp16 and compiled maps vs
   fp32 (relative error, worst per-frame correlation, target agreement); uint8 frames
   normalised on the device vs the host input; EfficientNet-Lite0 (real ImageNet weights: the
   offline package, or --lite0-weights FILE) with the agreement bar of docs/precision.md
   (fp16: r >= 0.999 and error <= 2 % on every photo; bf16 reported, not held to it).
b. throughput: the engine's masked img/s vs the raw forward img/s at the same batch
   (efficiency), fp32 / bf16 / fp16, channels-last, compiled, batch 64 to 512; frames/s; and
   per row the maps' worst correlation and error against fp32's on the same frames. VGG16 has
   random weights (its fidelity is only indicative); EfficientNet-Lite0, when it loads, is
   timed and measured the same way with its real weights.
c. end to end: `python -m scorecam_stream.cli` (scorecam-video) on a generated 1280x720 clip,
   then the same run in this process with a warmed-up worker: frames/s end to end vs the engine
   alone on the same frames, and the GPU's busy fraction (nvidia-smi utilization samples).
d. Ray: `--gpus 1`, `--gpus 1 --workers-per-gpu 2` (VGG16, and EfficientNet-Lite0 when it
   loads): frames/s, and the maps against the single process of c.

Without the weights package on the GPU machine, write the Lite0 state dict (17 MB) where it is
installed and carry it: `python scripts/gpu_check.py --save-lite0 lite0.pt`, then
`--lite0-weights lite0.pt` on the GPU machine.

Each section runs even if an earlier one failed (its error is recorded). Prints one table per
section and writes all rows as JSON (--out), with the summary keys device_name,
vgg16_bf16_efficiency and vgg16_bf16_frames_per_s. No network: VGG16 has seeded random weights.
Ray and PyAV are imported only by the sections that use them (c and d live in
gpu_check_video.py). The repository need not be
installed: its root is put on sys.path here, and on PYTHONPATH for the command it runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]  # not pip-installed on the GPU machine
# ...and for the processes started from here: the command of c, and Ray's workers in d.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from skimage import data  # noqa: E402

from scorecam_stream import ScoreCAM, ScoreCamError, load_model  # noqa: E402
from scorecam_stream.metrics import (  # noqa: E402
    AGREEMENT_CORRELATION,
    AGREEMENT_ERROR,
    map_agreement,
)
from scorecam_stream.models import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess_frame,
    resize_frame,
)
from scorecam_stream.transfer import normalize_on_device  # noqa: E402

Row = dict[str, object]
# Relative map errors a check may show (cuDNN convolutions run in TF32 by default on CUDA).
LIMITS = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 1e-2, "compiled": 2e-2, "uint8": 1e-6}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the full GPU check, or the CPU smoke test."""

    device: str
    arch: str  # torchvision architecture, seeded random weights
    layer: str  # its target layer (512 channels in both)
    size: int  # model input side
    frames: int  # frames per throughput row
    batches: tuple[int, ...]
    compile_batch: int
    clip_size: tuple[int, int]
    clip_frames: int
    budget_s: float  # sections past this are skipped, so that the run ends in time
    with_lite0: bool  # EfficientNet-Lite0 (real weights) in a and b, when its weights load
    check_photos: int = 2  # photos checked in a
    lite0_weights: str | None = None  # its state dict, where the package is not installed


def make_plan(args: argparse.Namespace) -> Plan:
    if args.smoke:  # SqueezeNet 1.1 at 64 px stands in for VGG16: the same code, 1/100 the work
        return Plan(
            "cpu",
            "squeezenet1_1",
            "features.12",
            64,
            frames=1,
            batches=(32,),
            compile_batch=32,
            clip_size=(320, 180),
            clip_frames=3,
            budget_s=1800.0,
            with_lite0=False,
            check_photos=1,
        )
    return Plan(
        args.device,
        "vgg16",
        "features.29",
        224,
        frames=4,
        batches=(64, 128, 256, 512),
        compile_batch=256,
        clip_size=(1280, 720),
        clip_frames=60,
        budget_s=args.budget,
        with_lite0=True,
        lite0_weights=args.lite0_weights,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def real_photos() -> tuple[np.ndarray, ...]:
    """Return two real photos (cat, coffee), RGB uint8."""
    return data.chelsea(), data.coffee()


def lite0_photos(lite, device: torch.device) -> torch.Tensor:
    """Return four real photos as Lite0 inputs (4, 3, S, S), with its own preprocessing."""
    names = ("astronaut", "chelsea", "coffee", "rocket")  # bench_precision.py's photos
    return torch.stack([lite.preprocess(getattr(data, n)()) for n in names]).to(device)


def photos(size: int) -> torch.Tensor:
    """Return the real photos as model inputs (2, 3, S, S), resized and normalised on the host."""
    return torch.stack(
        [preprocess_frame(p, size, IMAGENET_MEAN, IMAGENET_STD) for p in real_photos()]
    )


def plain_map(model, layer, x: torch.Tensor, target: int) -> torch.Tensor:
    """Return Score-CAM of one input (3, S, S), one channel at a time, as the article writes it."""
    acts = []
    handle = layer.register_forward_hook(lambda _m, _i, o: acts.append(o.detach().float().clone()))
    with torch.inference_mode():
        model(x[None])
    handle.remove()
    total = torch.zeros(x.shape[-2:], device=x.device)
    with torch.inference_mode():
        for a in acts[0][0]:
            up = F.interpolate(
                a[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False
            )
            norm = (up[0, 0] - up.min()) / (up.max() - up.min() + 1e-5)
            total += model((x * norm)[None])[0].float().softmax(0)[target] * norm
    return total.relu()


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def fidelity(maps: torch.Tensor, reference: torch.Tensor) -> Row:
    """Return the worst per-frame correlation and relative error of maps against fp32's."""
    corr, error = map_agreement(maps, reference)
    return {"corr_min": float(corr.min()), "error_max": float(error.max())}


def load_lite0(plan: Plan, device: torch.device):
    """Return the offline EfficientNet-Lite0 (package, else ``plan.lite0_weights``) at the size."""
    weights = plan.lite0_weights
    return load_model("efficientnet_lite0", weights=weights, device=device, input_size=plan.size)


def seeded_model(plan: Plan, device: torch.device) -> torch.nn.Module:
    """Return the plan's model (VGG16) with seeded random weights: nothing is downloaded."""
    torch.manual_seed(0)
    return getattr(torchvision.models, plan.arch)(weights=None).eval().to(device)


# ---------------------------------------------------------------------- a. correctness


def check_model(
    name: str,
    model,
    layer_name: str,
    x: torch.Tensor,
    plan: Plan,
    state: dict | None,
    real_weights: bool = False,
) -> list[Row]:
    """Rows: fp32 vs the loop, bf16/fp16 vs fp32 (with target agreement), compiled vs eager.

    With ``state``, the compiled engine is checked too and kept there for section b (compiling
    costs most of a minute on a GPU: once is enough). With ``real_weights``, fp16 is held to
    the agreement bar (every frame r >= 0.999, error <= 2 %) and bf16 only reported.
    """
    layer = dict(model.named_modules())[layer_name]
    batch = plan.batches[-1]
    fp32 = ScoreCAM(model, layer, batch_size=batch)(x)
    loop = plain_map(model, layer, x[0], int(fp32.targets[0]))
    rows: list[Row] = [
        {
            "model": name,
            "check": "fp32 vs per-channel loop",
            "rel_error": rel_max(fp32.maps[0], loop),
            "limit": LIMITS["fp32"],
        }
    ]
    for dtype in ("bf16", "fp16"):
        engine = ScoreCAM(model, layer, batch_size=batch, dtype=dtype)
        maps = engine(x, targets=fp32.targets).maps
        agree = float((engine.classify(x).argmax(1) == fp32.targets).float().mean())
        row: Row = {"model": name, "check": f"{dtype} vs fp32", **fidelity(maps, fp32.maps)}
        if not real_weights:
            row.update(rel_error=rel_norm(maps, fp32.maps), limit=LIMITS[dtype])
        elif dtype == "fp16":  # the GPU preset's dtype: the bar it was chosen by
            row.update(
                rel_error=row["error_max"], limit=AGREEMENT_ERROR, corr_limit=AGREEMENT_CORRELATION
            )
        rows.append({**row, "target_agreement": agree})
    if state is None:
        return rows
    twin = copy.deepcopy(model)  # its own copy: channels_last converts the weights in place
    twin_layer = dict(twin.named_modules())[layer_name]
    # Every pass runs (no constant channel skipped): 512 passes per photo are whole chunks of the
    # compile batch, so the model compiles for one shape only.
    options = dict(
        batch_size=plan.compile_batch, skip_constant=False, dtype="bf16", channels_last=True
    )
    eager = ScoreCAM(twin, twin_layer, **options)(x, targets=fp32.targets)
    engine = ScoreCAM(twin, twin_layer, compile=True, **options)
    compiled = engine(x, targets=fp32.targets)
    state["compiled_engine"] = engine
    rows.append(
        {
            "model": name,
            "check": "bf16+cl compiled (fixed chunks) vs eager",
            "rel_error": rel_norm(compiled.maps, eager.maps),
            "limit": LIMITS["compiled"],
        }
    )
    return rows


def section_correctness(plan: Plan, device: torch.device, state: dict) -> list[Row]:
    x = photos(plan.size)[: plan.check_photos].to(device)
    model = seeded_model(plan, device)
    rows = check_model(plan.arch, model, plan.layer, x, plan, state)
    del model
    # uint8 frames normalised on the device (pinned, non-blocking copy) vs the host float input
    small = torch.from_numpy(np.stack([resize_frame(p, plan.size) for p in real_photos()]))
    on_device = normalize_on_device(small, IMAGENET_MEAN, IMAGENET_STD, device).cpu()
    rows.append(
        {
            "model": "-",
            "check": "uint8 normalised on device vs host",
            "rel_error": rel_max(on_device, photos(plan.size)),
            "limit": LIMITS["uint8"],
        }
    )
    if not plan.with_lite0:
        return rows
    try:
        lite = load_lite0(plan, device)
    except (ScoreCamError, ImportError) as err:
        return [*rows, {"model": "efficientnet_lite0", "check": f"skipped: {err}"}]
    lite_x = lite0_photos(lite, device)
    return rows + check_model(
        "efficientnet_lite0", lite.model, lite.layer_name, lite_x, plan, None, real_weights=True
    )


# ---------------------------------------------------------------------- b. throughput

CONFIGS = {  # name: (dtype, channels_last, compile)
    "fp32": (None, False, False),
    "bf16": ("bf16", False, False),
    "bf16+cl": ("bf16", True, False),
    "fp16+cl": ("fp16", True, False),
    "bf16+cl+compile": ("bf16", True, True),
}


def section_throughput(plan: Plan, device: torch.device, state: dict) -> list[Row]:
    """Rows per config and batch; every channel's pass runs (skip_constant off), cuDNN tuned."""
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        return throughput_rows(plan, device, state)
    finally:
        torch.backends.cudnn.benchmark = False  # c and d measure the product, which leaves it off


def throughput_rows(plan: Plan, device: torch.device, state: dict) -> list[Row]:
    """Rows of VGG16 (seeded), then of EfficientNet-Lite0 (real weights) when it loads."""
    x = photos(plan.size).repeat((plan.frames + 1) // 2, 1, 1, 1)[: plan.frames].to(device)
    rows = model_throughput(
        plan, plan.arch, lambda: seeded_model(plan, device), plan.layer, x, state
    )
    if not plan.with_lite0:
        return rows
    try:
        lite = load_lite0(plan, device)
    except (ScoreCamError, ImportError) as err:
        return [*rows, {"model": "efficientnet_lite0", "config": f"skipped: {err}"}]
    x = lite0_photos(lite, device)
    # A fresh copy per config (channels_last converts the weights in place); compiling once
    # more is not worth it here: section a's compiled engine is VGG16's.
    configs = {k: v for k, v in CONFIGS.items() if not v[2]}
    return rows + model_throughput(
        plan,
        "efficientnet_lite0",
        lambda: copy.deepcopy(lite.model),
        lite.layer_name,
        x,
        {},
        configs,
    )


def model_throughput(
    plan: Plan,
    arch: str,
    make_model: Callable[[], torch.nn.Module],
    layer_name: str,
    x: torch.Tensor,
    state: dict,
    configs: dict[str, tuple] = CONFIGS,
) -> list[Row]:
    """Return a row per config and batch: img/s, frames/s, and fidelity against fp32's maps.

    The first config is fp32: its maps at each batch are the reference of the others' rows
    (same frames, same targets: the base pass is fp32 in every config).
    """
    device = x.device
    rows: list[Row] = []
    reference: dict[int, torch.Tensor] = {}
    for name, (dtype, channels_last, compiled) in configs.items():
        model = make_model()  # a fresh one per config: channels_last converts it
        for batch in (plan.compile_batch,) if compiled else plan.batches:
            engine = ScoreCAM(
                model,
                dict(model.named_modules())[layer_name],
                batch_size=batch,
                skip_constant=False,
                dtype=dtype,
                channels_last=channels_last,
                compile=compiled,
            )
            if compiled and "compiled_engine" in state:  # the same options, compiled in a
                engine = state.pop("compiled_engine")
            engine(x[:1])  # warm-up: cuDNN picks its kernels, compile compiles
            engine(x[:1])
            sync(device)
            began = time.perf_counter()
            result = engine(x)
            sync(device)
            seconds = time.perf_counter() - began
            passes = len(x) * engine.base(x[:1]).num_channels - int(result.skipped.sum())
            # fp32 first: the reference at this batch (else the nearest batch that has one).
            ref = reference.setdefault(batch, result.maps) if dtype is None else None
            if ref is None:
                ref = reference.get(batch, next(iter(reference.values()), None))
            rows.append(
                {
                    "model": arch,
                    "config": name,
                    "batch": batch,
                    "masked_img_per_s": passes / seconds,
                    "raw_img_per_s": raw_rate(engine, x[:1], batch, compiled, device),
                    "frames_per_s": len(x) / seconds,
                }
            )
            rows[-1]["efficiency"] = rows[-1]["masked_img_per_s"] / rows[-1]["raw_img_per_s"]
            if ref is not None:  # the fp32 row against itself: r 1, error 0
                rows[-1].update(fidelity(result.maps, ref))
            print_rows([rows[-1]], head=len(rows) == 1)
        del model, engine
    return rows


def raw_rate(engine: ScoreCAM, x: torch.Tensor, batch: int, compiled: bool, device) -> float:
    """Return the forward img/s of the engine's model at ``batch`` (compiled if the engine is)."""
    inputs = x.expand(batch, -1, -1, -1).contiguous()
    forward = engine._forward
    if compiled:
        mode = "reduce-overhead" if device.type == "cuda" else None
        forward = torch.compile(engine._forward, mode=mode, dynamic=False)
    reps = 3 if device.type == "cpu" else 20
    with torch.inference_mode():
        for _ in range(2):
            step_cuda_graphs(device, compiled)
            forward(inputs)
        sync(device)
        began = time.perf_counter()
        for _ in range(reps):
            step_cuda_graphs(device, compiled)
            forward(inputs)
        sync(device)
    return reps * batch / (time.perf_counter() - began)


def step_cuda_graphs(device: torch.device, compiled: bool) -> None:
    if compiled and device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


# ---------------------------------------------------------------------- the run


def print_rows(rows: list[Row], head: bool = True) -> None:
    """Print rows as a Markdown table (the header only when ``head``)."""
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))
    if head:
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
    for row in rows:
        cells = [row.get(k, "") for k in keys]
        text = [f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells]
        print("| " + " | ".join(text) + " |", flush=True)


def summary(report: dict) -> dict[str, object]:
    """Return the summary keys from the throughput rows: the fastest bf16 configuration."""
    rows = [
        r
        for r in report["sections"].get("b_throughput", {}).get("rows", [])
        if "bf16" in str(r["config"]) and r.get("model") == report["plan"]["arch"]
    ]
    if not rows:
        return {"vgg16_bf16_efficiency": None, "vgg16_bf16_frames_per_s": None}
    best = max(rows, key=lambda r: r["frames_per_s"])
    return {
        "vgg16_bf16_efficiency": best["efficiency"],
        "vgg16_bf16_frames_per_s": best["frames_per_s"],
        "vgg16_bf16_best_config": f"{best['config']} batch {best['batch']}",
    }


def video_check():
    """Return the module of sections c and d (it imports PyAV, and Ray in d, when they run)."""
    import gpu_check_video

    return gpu_check_video


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the report as JSON to this file")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:N")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds before skipping")
    parser.add_argument("--sections", default="abcd", help="which sections to run")
    parser.add_argument(
        "--lite0-weights", help="EfficientNet-Lite0 state dict, where its package is missing"
    )
    parser.add_argument(
        "--save-lite0", type=Path, help="write that state dict (from the package) and exit"
    )
    args = parser.parse_args(argv)
    if args.save_lite0:
        torch.save(load_model("efficientnet_lite0").model.state_dict(), args.save_lite0)
        print(f"wrote {args.save_lite0}: pass --lite0-weights {args.save_lite0} on the GPU")
        return 0
    plan = make_plan(args)
    device = torch.device(plan.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke for the CPU smoke test", file=sys.stderr)
        return 2
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    report: dict = {
        "device_name": name,
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "plan": plan.__dict__,
        "sections": {},
    }
    print(f"# gpu_check on {name}, torch {torch.__version__}, {report['date_utc']} UTC")
    state: dict = {}

    def weights() -> Path:
        """Return a state-dict file of the seeded model, for the command line (no download)."""
        if "weights" not in state:
            state["weights"] = Path(tempfile.mkdtemp(prefix="gpu_check-")) / f"{plan.arch}.pt"
            torch.save(seeded_model(plan, torch.device("cpu")).state_dict(), state["weights"])
        return state["weights"]

    sections: dict[str, Callable[[], list[Row]]] = {
        "a_correctness": lambda: section_correctness(plan, device, state),
        "b_throughput": lambda: section_throughput(plan, device, state),
        "c_end_to_end": lambda: video_check().section_end_to_end(plan, device, state, weights()),
        "d_ray": lambda: video_check().section_ray(plan, device, state, weights()),
    }
    started = time.perf_counter()
    for key, run in sections.items():
        if key[0] not in args.sections:
            continue
        print(f"\n## {key}", flush=True)
        if time.perf_counter() - started > plan.budget_s:
            report["sections"][key] = {"skipped": "time budget spent"}
            print("skipped: time budget spent")
            continue
        began = time.perf_counter()
        entry: dict = {}
        try:
            entry["rows"] = run()
            for row in entry["rows"]:
                if "limit" in row:
                    row["ok"] = bool(row["rel_error"] <= row["limit"])
                if "corr_limit" in row:
                    row["ok"] = row["ok"] and bool(row["corr_min"] >= row["corr_limit"])
        except Exception as err:  # recorded; the next section still runs
            entry["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        entry["seconds"] = time.perf_counter() - began
        report["sections"][key] = entry
        if key != "b_throughput":  # b prints its rows as they come
            print_rows(entry.get("rows", []))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.update(summary(report))
    report["seconds"] = time.perf_counter() - started
    brief = {k: v for k, v in report.items() if k not in ("sections", "plan")}
    print(f"\n## summary\n{json.dumps(brief, indent=1)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    failed = [k for k, v in report["sections"].items() if "error" in v]
    failed += [
        r["check"]
        for v in report["sections"].values()
        for r in v.get("rows", [])
        if r.get("ok") is False
    ]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
