"""RayExplainer on a local 2-CPU Ray instance: same results as in-process, order, faults, cleanup.

Workers load models by spec, so the tiny model here is a seeded torchvision SqueezeNet 1.1 saved
to a state-dict file (64 px input, layer ``features.12``: 512 x 3 x 3, of which Faster Score-CAM
keeps 16 channels), which costs a few milliseconds per frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torchvision
from conftest import seeded_frames
from helpers import wait_gone
from ray.exceptions import RayActorError

from scorecam_stream import ScoreCamError
from scorecam_stream.config import DistributedConfig, EngineConfig, ModelConfig
from scorecam_stream.distributed import RayExplainer
from scorecam_stream.distributed.tasks import run_tasks
from scorecam_stream.records import FrameResult, FrameTask
from scorecam_stream.reuse import ReuseOptions
from scorecam_stream.workers import LocalExplainer, Worker

pytestmark = pytest.mark.slow  # the Ray layer: most tests start a Ray instance or a cluster

ENGINE = EngineConfig(batch_size=8, max_channels=16)
MARK = 7.25  # x[0, 0, 0] of the frame that the flaky worker fails on
MAX_INFLIGHT = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ModelConfig:
    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1(weights=None)
    path = tmp_path_factory.mktemp("weights") / "squeezenet.pt"
    torch.save(net.state_dict(), path)
    return ModelConfig(
        spec="torchvision:squeezenet1_1", layer="features.12", weights=str(path), input_size=64
    )


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """Eight seeded 64 x 64 model inputs, each with a bright square somewhere."""
    return seeded_frames(8, 64, seed=3)


def make_items(frames: torch.Tensor) -> list[tuple[str, FrameTask | None]]:
    """Frames 0-7 with two pass-through items, two frames with fixed targets."""
    fixed = {3: (5,), 6: (7, 1)}
    items: list[tuple[str, FrameTask | None]] = []
    for i, x in enumerate(frames):
        items.append((f"frame{i}", FrameTask(index=i, x=x, targets=fixed.get(i))))
        if i in (1, 4):
            items.append((f"skip{i}", None))
    return items


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, like each Ray worker here, and restore the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def local_results(model: ModelConfig, items) -> dict[str, FrameResult | None]:
    """Return the in-process results (topk=2) by payload."""
    with one_thread():
        return dict(LocalExplainer(Worker(model, ENGINE), topk=2).explain(items))


@pytest.fixture(scope="module")
def reference(model, frames) -> dict[str, FrameResult | None]:
    return local_results(model, make_items(frames))


@pytest.fixture(scope="module")
def _shut_down_at_the_end() -> Iterator[None]:
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_cluster(_shut_down_at_the_end) -> None:
    """A Ray instance this module started and shares between tests (started if not running)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.fixture
def no_ray() -> None:
    """No Ray in this process: for the tests of an explainer that starts and stops its own.

    Shuts down whatever an earlier test started, so these tests run (and can fail) in any order
    and under any -k selection.
    """
    if ray.is_initialized():
        ray.shutdown()
    assert not ray.is_initialized()


def assert_same(out: list[tuple[str, FrameResult | None]], reference) -> None:
    """Every item, in input order, with the in-process maps, targets and probabilities."""
    assert [payload for payload, _ in out] == list(reference)
    for payload, result in out:
        expected = reference[payload]
        if expected is None:
            assert result is None
            continue
        assert result.index == expected.index
        np.testing.assert_array_equal(result.targets, expected.targets)
        assert result.maps.shape == expected.maps.shape and result.maps.dtype == np.float32
        assert expected.maps.max() > 0
        torch.testing.assert_close(
            torch.from_numpy(result.maps.copy()),
            torch.from_numpy(expected.maps),
            rtol=1e-5,
            atol=1e-6 * float(expected.maps.max()),
        )
        torch.testing.assert_close(
            torch.from_numpy(result.probs.copy()),
            torch.from_numpy(expected.probs),
            rtol=1e-5,
            atol=0,
        )
        assert result.skipped == expected.skipped
        assert result.seconds > 0


def slow_worker(delay: float) -> type[Worker]:
    """A Worker whose shards take ``delay`` seconds longer (a kill then lands mid-call)."""

    class SlowWorker(Worker):
        served = 0  # shards computed by this process

        def shard(self, index, x, targets, start, stop):
            time.sleep(delay)
            self.served += 1
            return super().shard(index, x, targets, start, stop)

        def count(self) -> int:
            return self.served

    return SlowWorker


def flaky_worker(counter: Path, failures: int) -> type[Worker]:
    """A Worker whose first shard of the frame marked with MARK raises ``failures`` times in all.

    The count lives in a file, so it is shared by every actor (they run on this machine).
    """

    class FlakyWorker(Worker):
        def shard(self, index, x, targets, start, stop):
            if start == 0 and float(x[0, 0, 0]) == MARK:
                failed = int(counter.read_text()) if counter.exists() else 0
                if failed < failures:
                    counter.write_text(str(failed + 1))
                    raise RuntimeError("CUDA out of memory (simulated)\nTried to allocate 2 GiB")
            return super().shard(index, x, targets, start, stop)

    return FlakyWorker


def titled_worker() -> type[Worker]:
    """A Worker that tells its process title, as ``ps`` and Ray's log lines show it.

    Made in a function, like the other test workers, so that Ray pickles the class by value
    (its workers cannot import this test module).
    """

    class TitledWorker(Worker):
        def title(self) -> str:
            return Path("/proc/self/cmdline").read_text().replace("\0", " ").strip()

    return TitledWorker


# ---------------------------------------------------------------------- without Ray running


def test_starts_and_shuts_down_its_own_local_ray(no_ray, model, frames, reference):
    dist = DistributedConfig(workers=1)
    with RayExplainer(model, ENGINE, dist, topk=2) as explainer:
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] >= 1
        out = list(explainer.explain(make_items(frames)[:3]))
    assert not ray.is_initialized()
    assert_same(out, {payload: reference[payload] for payload, _ in out})


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:1", r"^cannot connect to the Ray cluster at 127\.0\.0\.1:1: "),
        ("ray://127.0.0.1:1", r"^cannot connect to the Ray cluster at ray://127\.0\.0\.1:1: "),
        ("headnode", r"^--address must be auto, HOST:PORT or ray://HOST:PORT, got 'headnode'$"),
    ],
)
def test_unreachable_address_fails_fast(no_ray, model, address, message):
    with pytest.raises(ScoreCamError, match=message):
        RayExplainer(model, ENGINE, DistributedConfig(workers=1, address=address))
    assert not ray.is_initialized()


# ---------------------------------------------------------------------- on the shared instance


def test_matches_local_in_order_with_bounded_inflight_then_closes(
    ray_cluster, model, frames, reference
):
    dist = DistributedConfig(workers=2, shards_per_frame=3, max_inflight_frames=MAX_INFLIGHT)
    pulled = yielded = 0
    held: list[int] = []

    def counted(items) -> Iterator[tuple[str, FrameTask | None]]:
        nonlocal pulled
        for payload, task in items:
            pulled += task is not None
            yield payload, task

    out = []
    explainer = RayExplainer(model, ENGINE, dist, topk=2)
    with explainer:
        actors, info = explainer.actors, explainer.worker_info()
        assert len(info) == 2 and all(i["threads"] == 1 for i in info)
        local = Worker(model, ENGINE)
        assert explainer.meta == local.meta()
        with one_thread():
            expected = local.classify_frames(frames)
        torch.testing.assert_close(explainer.classify(frames), expected, rtol=1e-5, atol=1e-6)
        for payload, result in explainer.explain(counted(make_items(frames))):
            if result is not None:
                yielded += 1
                held.append(pulled - (yielded - 1))  # frames pulled and not yet out, this one too
            out.append((payload, result))
        assert explainer.stats.resubmitted == explainer.stats.retried == 0
        # the batch classification, then 8 frame classifications + 8 x 3 shards (16 channels
        # in 3 ranges of equal work)
        assert explainer.stats.calls == 1 + 8 * 4
    assert_same(out, reference)
    assert max(held) == MAX_INFLIGHT  # pulled lazily up to the bound, never beyond it

    explainer.close()  # idempotent
    assert ray.is_initialized()  # a Ray instance it did not start is left running
    assert wait_gone([i["pid"] for i in info]) == []
    for actor in actors:
        with pytest.raises(RayActorError):
            ray.get(actor.info.remote(), timeout=20)


def test_two_runs_at_once_share_the_workers(ray_cluster, model, frames, reference):
    """Two explain runs from two threads (two videos of one batch): each complete and in order."""
    dist = DistributedConfig(workers=2, shards_per_frame=2)
    outs: dict[int, list] = {}
    errors: list[BaseException] = []
    with RayExplainer(model, ENGINE, dist, topk=2) as explainer:

        def run(n: int) -> None:
            try:
                outs[n] = list(explainer.explain(make_items(frames)))
            except BaseException as err:  # reported below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors and not any(t.is_alive() for t in threads)
        assert explainer.stats.calls == 2 * 8 * 3  # per frame: classification + 2 shards
    for n in range(2):
        assert_same(outs[n], reference)


def test_ray_tasks_explain_on_the_driver_s_workers(ray_cluster, model, frames, reference):
    """Two Ray tasks at once (two videos' loops on any node) use the driver's workers through
    a portable explainer; a task that fails is one outcome, not the end of the others."""
    dist = DistributedConfig(workers=2, shards_per_frame=2)
    with RayExplainer(model, ENGINE, dist, topk=2) as explainer:
        portable = explainer.portable()
        items = make_items(frames)

        def explain_there(name: str) -> list:  # runs in a Ray task: its own process
            if name == "bad":
                raise ScoreCamError("not a video")
            # "b" sends the frames in reverse order: the same cache keys, other frames
            return list(portable.open().explain(items if name == "a" else items[::-1]))

        outcomes = {i: (v, e) for i, v, e in run_tasks(explain_there, ["a", "bad", "b"], 2)}
        assert set(outcomes) == {0, 1, 2}
        value, error = outcomes[1]
        assert value is None and isinstance(error, ScoreCamError)
        assert str(error) == "not a video"
        assert outcomes[0][1] is None and outcomes[2][1] is None
        # The workers' caches keep every process's frames apart.
        assert_same(outcomes[0][0], reference)
        assert_same(outcomes[2][0][::-1], reference)
        assert_same(list(explainer.explain(items)), reference)


@pytest.mark.parametrize("kill", ["sigkill", "ray.kill", "ray.kill for good"])
def test_worker_killed_mid_run_is_replaced_and_its_calls_resent(
    ray_cluster, model, frames, reference, kill
):
    items = make_items(frames)
    dist = DistributedConfig(workers=2, max_inflight_frames=4)
    with RayExplainer(model, ENGINE, dist, topk=2, worker_cls=slow_worker(0.2)) as explainer:
        victim = explainer.worker_info()[0]["pid"]
        out = []
        for item in explainer.explain(items):
            if not out:  # both workers are in the middle of a shard now
                if kill == "sigkill":
                    os.kill(victim, signal.SIGKILL)
                else:
                    ray.kill(explainer.actors[0], no_restart=kill.endswith("for good"))
            out.append(item)
        assert explainer.stats.resubmitted >= 1
        assert_same(out, reference)

        if kill.endswith("for good"):
            with pytest.raises(ScoreCamError, match=r"^Ray worker 0 is gone: "):
                explainer.worker_info()
            assert_same(list(explainer.explain(items)), reference)  # worker 1 does it all
            assert explainer.restarts == 0
            return
        assert explainer.worker_info()[0]["pid"] != victim  # Ray restarted it
        # The next run finds it back (a probe call came back) and sends it work again.
        assert_same(list(explainer.explain(items)), reference)
        assert explainer.restarts == 1
        assert ray.get(explainer.actors[0].count.remote()) > 0


def test_shard_failures_are_retried(ray_cluster, model, frames, reference, tmp_path):
    marked = frames.clone()
    marked[2, 0, 0, 0] = MARK
    items = make_items(marked)
    dist = DistributedConfig(workers=2, max_shard_retries=2)
    worker = flaky_worker(tmp_path / "failures", failures=2)
    with RayExplainer(model, ENGINE, dist, topk=2, worker_cls=worker) as explainer:
        out = list(explainer.explain(items))
        assert explainer.stats.retried == 2
    assert (tmp_path / "failures").read_text() == "2"
    assert_same(out, local_results(model, items))


def test_failures_past_the_retries_name_the_frame_then_interrupt_and_close(
    ray_cluster, model, frames, reference, tmp_path
):
    marked = frames.clone()
    marked[5, 0, 0, 0] = MARK
    items = make_items(marked)
    dist = DistributedConfig(workers=2, max_shard_retries=1)
    worker = flaky_worker(tmp_path / "failures", failures=10**6)
    explainer = RayExplainer(model, ENGINE, dist, topk=2, worker_cls=worker)
    actors, pids = explainer.actors, [i["pid"] for i in explainer.worker_info()]
    try:
        with pytest.raises(ScoreCamError) as err:
            list(explainer.explain(items))
        assert str(err.value) == (
            "frame 5: shard [0, 8) failed: RuntimeError: CUDA out of memory (simulated)"
        )
        assert (tmp_path / "failures").read_text() == "2"  # the call and its one retry
        # A frame that cannot be computed at all (wrong input shape), after an abandoned run.
        bad = [("a", FrameTask(0, frames[0])), ("b", FrameTask(1, torch.zeros(1, 64, 64)))]
        with pytest.raises(ScoreCamError, match=r"^frame 1: classification failed: RuntimeError"):
            list(explainer.explain(bad))
        # Ctrl-C while a run is in flight: the pipeline's finally calls close().
        run = explainer.explain(make_items(frames))
        assert next(run)[0] == "frame0"
        with pytest.raises(KeyboardInterrupt):
            run.throw(KeyboardInterrupt)
        # Abandoned runs leave nothing behind: the next one is complete and right.
        assert_same(list(explainer.explain(make_items(frames))), reference)
    finally:
        explainer.close()
    explainer.close()  # idempotent
    assert wait_gone(pids) == []
    for actor in actors:
        with pytest.raises(RayActorError):
            ray.get(actor.info.remote(), timeout=20)


def test_more_gpus_than_the_cluster_has(ray_cluster, model):
    gpu_model = ModelConfig(
        spec=model.spec, layer=model.layer, weights=model.weights, input_size=64, device="cuda"
    )
    with pytest.raises(
        ScoreCamError,
        match=r"^--gpus 4: the Ray cluster has 0 GPU\(s\); use "
        r"--workers 4 --device cpu$",
    ):
        RayExplainer(gpu_model, ENGINE, DistributedConfig(gpus=4))
    with pytest.raises(
        ScoreCamError,
        match=r"^--gpus 1 --workers-per-gpu 2: the Ray cluster has 0 GPU\(s\); use "
        r"--workers 2 --device cpu$",
    ):
        RayExplainer(gpu_model, ENGINE, DistributedConfig(gpus=1, workers_per_gpu=2))


def test_model_error_in_a_worker_surfaces_as_one_line(ray_cluster, model):
    missing = ModelConfig(spec=model.spec, weights="/nonexistent/squeezenet.pt", input_size=64)
    with pytest.raises(ScoreCamError) as err:
        RayExplainer(missing, ENGINE, DistributedConfig(workers=1))
    assert str(err.value) == (
        "a Ray worker failed to start: weights file not found: /nonexistent/squeezenet.pt"
    )


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_actors_are_named_after_their_worker_class(ray_cluster, model):
    """Ray's actor list, handles, process titles and logs name the worker's own class."""
    worker_cls = titled_worker()
    name = worker_cls.__qualname__  # "titled_worker.<locals>.TitledWorker"
    with RayExplainer(model, ENGINE, DistributedConfig(workers=1), worker_cls=worker_cls) as ex:
        actor = ex.actors[0]
        assert ray.get(actor.title.remote(), timeout=60) == "ray::TitledWorker.title"
        assert repr(actor).startswith(f"Actor({name}, ")
        # What `ray list actors` shows (read from the GCS: this instance runs no dashboard).
        listed = ray._private.state.actors(actor_id=actor._actor_id.hex())
        assert listed["ActorClassName"] == name


def test_workers_that_cannot_be_placed_time_out(ray_cluster, model):
    dist = DistributedConfig(workers=3, startup_timeout=2)  # 3 x 1 CPU on a 2-CPU instance
    began = time.monotonic()
    with pytest.raises(
        ScoreCamError,
        match=r"^[123] of 3 Ray workers did not start within 2 s \(the cluster has 2 CPUs "
        r"and 0 GPUs, each worker needs 1 CPU\): ",
    ):
        RayExplainer(model, ENGINE, dist)
    assert time.monotonic() - began < 60
    # close() on the failure freed the CPUs: two workers fit again
    with RayExplainer(model, ENGINE, DistributedConfig(workers=2, startup_timeout=60)) as ex:
        assert len(ex.worker_info()) == 2


def test_reusing_streams_on_ray_equal_in_process(ray_cluster, model):
    """--fidelity below 1 on Ray workers: two streams at once, each its own state on the driver,
    the maps and costs of the in-process run with the same fidelity."""
    engine = EngineConfig(batch_size=32)  # every channel: reuse needs them all
    options = ReuseOptions(fidelity=0.5, keyframe_interval=3)
    g = torch.Generator().manual_seed(4)
    x = seeded_frames(1, 64, seed=4)[0]
    streams = []
    for n in range(2):
        frames = [x + 0.05 * n + 0.03 * i * torch.randn(x.shape, generator=g) for i in range(5)]
        streams.append([(i, FrameTask(index=i, x=f)) for i, f in enumerate(frames)])
    with one_thread():
        local = [list(LocalExplainer(Worker(model, engine)).explain(s, options)) for s in streams]
    outs: dict[int, list] = {}
    with RayExplainer(model, engine, DistributedConfig(workers=2, shards_per_frame=2)) as ex:
        threads = [
            threading.Thread(
                target=lambda n=n: outs.__setitem__(n, list(ex.explain(streams[n], options)))
            )
            for n in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    for n in range(2):
        assert [p for p, _ in outs[n]] == [p for p, _ in local[n]]
        for (_, a), (_, b) in zip(local[n], outs[n], strict=True):
            np.testing.assert_array_equal(a.targets, b.targets)
            np.testing.assert_allclose(b.maps, a.maps, rtol=1e-5, atol=1e-6)
            assert (a.passes, a.reused, a.keyframe) == (b.passes, b.reused, b.keyframe)
        assert sum(r.reused for _, r in outs[n]) > 0  # something was reused


# --- --workers-per-gpu on a Ray instance that declares one (logical) GPU: K actors share it.
# There is no GPU here, so the actors run their model on the CPU (a Worker subclass), but Ray
# places them by the planned fractional GPU resources exactly as on a GPU machine.


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
