"""Which channels to recompute: the reuse ranking against an oracle, at fixed shares, open loop.

    python scripts/bench_reuse.py --size 96 --frames 96 --fidelity 0.99 --cache /tmp/bc
    python scripts/reuse_predictors.py --cache /tmp/bc

For frame t of each clip cached by ``bench_reuse.py --cache`` (its exact passes of every
frame), the reuse state is given frame t - age as its only cached frame and plans frame t; the
top ``share`` of the live channels are then recomputed in each predictor's order, the rest
keep their cached results, and the map is compared with frame t's exact map. No stop rule and
no controller: what differs between rows is only which channels the passes went to (the
closed-loop runs of ``bench_reuse.py`` are chaotic, this is not). Predictors:

- ``ranking``: the reuse state's own order (``Plan.order``);
- ``ranking+shift``: the same channels, the rest's cached logits moved by a ridge fit, on the
  recomputed channels, of the logits' change on the probe's change (4 x 4 x 3, and its mean);
- ``random``: the moved channels in a seeded random order (the floor);
- ``oracle``: the moved channels by their true change of target score (what a perfect
  predictor would pick; the ceiling).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_reuse import Frame  # also what the cache unpickles, as __main__.Frame

from scorecam_stream.config import EngineConfig, ModelConfig
from scorecam_stream.reuse import PROBE_GRID, ReuseOptions, StreamState, correlation, maps_of
from scorecam_stream.reuse_view import scores_of
from scorecam_stream.weighting import Weighting
from scorecam_stream.workers import Worker

PREDICTORS = ("random", "ranking", "ranking+shift", "oracle")


def shifted(
    logits: torch.Tensor,
    cached: torch.Tensor,
    moves: torch.Tensor,
    fresh: torch.Tensor,
    known: torch.Tensor,
) -> torch.Tensor:
    """Return ``logits`` with the reused rows moved by the shift fitted on the fresh ones.

    ``known``: (K,) the channels live in both frames (a cached result to compare with).
    """
    fit, rest = fresh & known, known & ~fresh
    x = moves[fit]
    if float(x.pow(2).sum()) == 0.0:  # nothing recomputed had moved: nothing to fit
        return logits
    gram = x.T @ x + 0.1 * float(x.pow(2).sum()) / len(x) * torch.eye(x.shape[1])
    weights = torch.linalg.solve(gram, x.T @ (logits[fit] - cached[fit]))
    out = logits.clone()
    out[rest] += moves[rest] @ weights
    return out


def compare(weighting: Weighting, old: Frame, new: Frame, shares: list[float], seed: int) -> dict:
    """Return {(predictor, share): correlation with the exact map} for ``new`` cached at ``old``."""
    state = StreamState(weighting, ReuseOptions(fidelity=0.99))
    first = state.plan(old.view, old.targets)  # the first frame: every pass, all cached
    state.absorb(first, old.logits[first.channels])
    state.finish(first)
    plan = state.plan(new.view, new.targets)
    if plan.keyframe:  # a scene cut: every channel is recomputed, nothing to compare
        return {}
    order = plan.order
    cached = old.logits.clone()
    cached[~new.view.live] = new.view.zero_logits
    change = (plan.probes - first.probes).abs().flatten(1).mean(dim=1)
    moves = F.adaptive_avg_pool2d(plan.probes - first.probes, 4).flatten(1)
    moves = torch.cat([moves, change[:, None]], dim=1)
    known = old.view.live & new.view.live
    truth = (
        scores_of(weighting, new.view, new.logits, new.targets)
        - scores_of(weighting, new.view, cached, new.targets)
    ).abs()[:, 0]
    generator = torch.Generator().manual_seed(seed)
    orders = {
        "random": order[torch.randperm(len(order), generator=generator)],
        "ranking": order,
        "ranking+shift": order,
        "oracle": order[truth[order].argsort(descending=True, stable=True)],
    }
    live = int(new.view.live.sum())
    out = {}
    for share in shares:
        for name, ranked in orders.items():
            fresh = torch.zeros(len(cached), dtype=torch.bool)
            fresh[ranked[: round(share * live)]] = True
            logits = torch.where(fresh[:, None], new.logits, cached)
            if name == "ranking+shift":
                logits = shifted(logits, cached, moves, fresh, known)
            maps = maps_of(weighting, new.view, logits, new.targets)
            out[(name, share)] = correlation(new.exact, maps[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="bench_reuse.py's --cache directory")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--layer", default="bn2")
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--clips", nargs="+", default=["pan", "zoom", "still", "cut"])
    parser.add_argument("--ages", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--shares", type=float, nargs="+", default=[1 / 16, 1 / 8, 1 / 4])
    parser.add_argument("--step", type=int, default=2, help="compare every STEP-th frame")
    args = parser.parse_args()
    model = ModelConfig(spec="efficientnet_lite0", input_size=args.size, layer=args.layer)
    weighting = Worker(model, EngineConfig(batch_size=64)).engine.weighting
    results: dict = {}
    for clip in args.clips:
        path = Path(args.cache) / f"{clip}-{args.size}-{args.layer}-{args.frames}-g{PROBE_GRID}.pt"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run bench_reuse.py with --cache first")
        frames, _ = torch.load(path, weights_only=False)
        for age in args.ages:
            for t in range(age, len(frames), args.step):
                found = compare(weighting, frames[t - age], frames[t], args.shares, seed=t)
                for key, corr in found.items():
                    results.setdefault((age, *key), []).append(corr)
    print(f"{', '.join(args.clips)}; {platform.processor() or platform.machine()}")
    print(f"{'age':>3} {'share':>6} " + " ".join(f"{name:>22}" for name in PREDICTORS))
    for age in args.ages:
        for share in args.shares:
            cells = []
            for name in PREDICTORS:
                corr = np.array(results[(age, name, share)])
                cells.append(f"{corr.mean():.4f} {corr.min():.3f} {(corr < 0.95).sum():4d}")
            print(f"{age:3d} {share:6.4f} " + " ".join(f"{c:>22}" for c in cells))
    print("each cell: r mean, r min, frames below 0.95")


if __name__ == "__main__":
    main()
