"""--workers-per-gpu on a Ray instance that declares one (logical) GPU: K actors share it.

There is no GPU here, so the actors run their model on the CPU (a Worker subclass), but Ray
places them by the planned fractional GPU resources exactly as on a GPU machine.
"""

from __future__ import annotations

import dataclasses

import pytest
import ray
import test_distributed as shared
from test_distributed import ENGINE, assert_same, make_items

from scorecam_stream.config import DistributedConfig, ModelConfig
from scorecam_stream.distributed import RayExplainer
from scorecam_stream.workers import Worker

# The module-scoped fixtures of test_distributed: the seeded SqueezeNet, its frames, the
# in-process results.
model, frames, reference = shared.model, shared.frames, shared.reference


def cpu_worker() -> type[Worker]:
    """Return a worker class that Ray places on a GPU share but that computes on the CPU.

    Defined in a function so that Ray's pickling sends the class itself to the actors (this
    test module is not importable there).
    """

    class CpuWorker(Worker):
        def __init__(self, config: ModelConfig, *args, **kwargs) -> None:
            super().__init__(dataclasses.replace(config, device="cpu"), *args, **kwargs)

        def gpu_ids(self) -> list[str]:
            return [str(i) for i in ray.get_gpu_ids()]

    return CpuWorker


@pytest.fixture(scope="module")
def one_gpu_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_workers_share_one_gpu_and_give_the_same_maps(one_gpu_ray, model, frames, reference):
    gpu_model = dataclasses.replace(model, device="cuda")
    dist = DistributedConfig(gpus=1, workers_per_gpu=2, startup_timeout=60)
    with RayExplainer(gpu_model, ENGINE, dist, topk=2, worker_cls=cpu_worker()) as explainer:
        assert len(explainer.actors) == 2
        # both placed on the one GPU, half of it each: none of it is left
        ids = ray.get([a.gpu_ids.remote() for a in explainer.actors])
        assert ids == [["0"], ["0"]]
        assert ray.available_resources().get("GPU", 0.0) == pytest.approx(0.0, abs=1e-3)
        out = list(explainer.explain(make_items(frames)))
        assert {info["device"] for info in explainer.worker_info()} == {"cpu"}
    assert_same(out, reference)
