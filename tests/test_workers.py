"""The layer solves fanned out (``--workers local:N`` / ``ray``; onnxcomq/workers.py): the same bytes as the
in-process run, results in task order, one-line errors for a failing or dying worker and for a bad setting.

The Ray cases run on a local Ray cluster of 2 CPU workers; they are skipped only where Ray is not importable
(tools/test.sh installs it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import builders
import pytest
from builders import recipe

from onnxcomq.config import Recipe
from onnxcomq.errors import UserError
from onnxcomq.pipeline import run
from onnxcomq.workers import LocalPool, cores, open_pool, parse

MODELS = "models/"
CALIB = MODELS + "fmnist_calib.npz"
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
CASES = [("fmnist_cnn.onnx", {}), ("fmnist_vit.onnx", {}),
         ("fmnist_cnn.onnx", dict(sequential=True, stages=2, damping="auto"))]
IDS = ["cnn", "vit", "cnn-sequential-damping-auto"]
_BASELINE: dict = {}


def _recipe(flat: dict, workers=None):
    r = recipe(batch_size=8, max_samples=32, device="cpu", **flat)
    return r.updated({"solver": {"workers": workers}}) if workers else r


def _baseline(model: str, flat: dict) -> bytes:
    """The in-process run's model bytes (computed once per case), with the BLAS threads of each worker (cores / 2,
    as local:2 and a 2-CPU Ray cluster run them): OpenBLAS's float32 products can depend on its thread count (they
    do on an AMD EPYC), so "the same bytes" holds for the same threads per solve."""
    from threadpoolctl import threadpool_limits

    key = (model, repr(sorted(flat.items())))
    if key not in _BASELINE:
        with threadpool_limits(limits=max(1, cores() // 2), user_api="blas"):
            _BASELINE[key] = run(MODELS + model, CALIB, _recipe(flat))[0].SerializeToString()
    return _BASELINE[key]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray; tools/test.sh installs it)")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.parametrize("model,flat", CASES, ids=IDS)
def test_local_workers_write_the_bytes_of_the_in_process_run(model, flat, capsys):
    want = _baseline(model, flat)
    capsys.readouterr()
    got, rep = run(MODELS + model, CALIB, _recipe(flat, "local:2"), progress=True)
    assert got.SerializeToString() == want
    n = len(rep.layers)
    solve_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("onnxcomq: solve:")]
    assert solve_lines and solve_lines[-1].startswith(f"onnxcomq: solve: {n}/{n} layers"), solve_lines


@pytest.mark.parametrize("model,flat", CASES, ids=IDS)
def test_ray_workers_write_the_bytes_of_the_in_process_run(model, flat, ray_cluster):
    want = _baseline(model, flat)
    assert ray_cluster.cluster_resources().get("CPU") == 2
    got, _ = run(MODELS + model, CALIB, _recipe(flat, "ray"))
    assert got.SerializeToString() == want
    assert ray_cluster.is_initialized()  # a cluster the run did not start is left running


# ------------------------------------------------------------------------------------------------- the executor

def _echo_after(x, delay):
    time.sleep(delay)
    return x, os.environ.get("OPENBLAS_NUM_THREADS"), os.getpid()


def test_local_pool_returns_results_in_task_order_and_limits_blas_threads():
    consumed = []

    def tasks():
        for i in range(9):
            consumed.append(i)
            yield i, 0.3 if i % 3 == 0 else 0.0  # early tasks slower than later ones

    pool = LocalPool(2)
    try:
        results = pool.map(_echo_after, tasks(), [f"t{i}" for i in range(9)])
        first = next(results)
        assert len(consumed) <= 2 * 2 + 1  # submitted a window ahead, not all at once
        out = [first] + list(results)
    finally:
        pool.close()
    assert [x for x, _, _ in out] == list(range(9))
    assert {t for _, t, _ in out} == {str(max(1, cores() // 2))}
    assert len({p for _, _, p in out}) <= 2 and os.getpid() not in {p for _, _, p in out}


def test_workers_setting_is_validated():
    assert parse(None) == parse("") == ("process", None)
    assert parse("local:3") == ("local", 3)
    assert parse("ray") == ("ray", None) and parse("ray://head:10001") == ("ray", "ray://head:10001")
    for bad in ["local:0", "local:", "local:two", "4", "ray:/head", "ray://head", "dask://h:1", 2]:
        with pytest.raises(UserError, match="solver.workers"):
            parse(bad)
    assert Recipe().updated({"solver": {"workers": "local:2"}}).validate().solver.workers == "local:2"
    with pytest.raises(UserError, match="local:N"):
        Recipe().updated({"solver": {"workers": "local:-1"}}).validate()
    with pytest.raises(UserError, match="--device gpu"):
        Recipe().updated({"solver": {"workers": "local:2", "device": "gpu"}}).validate()


@pytest.mark.parametrize("value", ["local:0", "locl:2", "ray://nohost"])
def test_a_bad_workers_option_is_a_one_line_cli_error(tmp_path, capsys, value):
    builders.assert_cli_one_line_error(tmp_path, capsys, ["--workers", value], "--workers")


def test_ray_not_installed_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # (import ray raises ImportError)
    with pytest.raises(UserError, match="pip install"):
        open_pool("ray")


# ------------------------------------------------------------------------------------------------- failures

def _solve_out_of_memory(*args):
    raise MemoryError("cannot allocate the sweep buffers")


def _solve_raises(*args):
    raise ValueError("a bug\nin two lines")


def _worker_dies(*args):
    os._exit(9)


def _solve_raises_or_hangs(mats, policy, fan_in, *stats):
    """The 3x3 convs on one channel (fan-in 9: the first layer and the depthwise one) fail; the layers that start
    after a failure take minutes, those that start before it are solved (Ray may start any task in flight first:
    two tasks that took minutes on its 2 CPUs kept the failing one waiting, on a busy machine)."""
    failed = os.environ["ONNXCOMQ_TEST_FAILED"]
    if fan_in == 9:
        open(failed, "w").close()
        raise ValueError("a bug")
    if os.path.exists(failed):
        time.sleep(300)
    from onnxcomq.workers import solve_layer
    return solve_layer(mats, policy, fan_in, *stats)


def _cli_with_solve(fn: str, workers: str, tmp_path, ray: bool = False, extra: tuple = ()) -> tuple:
    """``onnxcomq quantize --workers ...`` in a child process whose solve is ``fn`` of this file; (rc, stderr)."""
    out = tmp_path / "q.onnx"
    args = ["quantize", os.path.join(ROOT, MODELS, "fmnist_cnn.onnx"), "-o", str(out), "--calib",
            os.path.join(ROOT, CALIB), "--max-samples", "16", "--device", "cpu", "--quiet", "--workers", workers,
            *extra]
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        import onnxcomq.pipeline, test_workers
        onnxcomq.pipeline.solve_layer = test_workers.{fn}
        if {ray!r}:
            import ray
            ray.cloudpickle.register_pickle_by_value(test_workers)  # (Ray's workers cannot import the tests)
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        from onnxcomq.cli import main
        sys.exit(main({args!r}))
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                ONNXCOMQ_TEST_FAILED=str(tmp_path / "failed")))
    assert not out.exists()
    return p.returncode, p.stderr


@pytest.mark.parametrize("fn,needle", [
    ("_solve_out_of_memory", "out of memory (layer /features/features.0/features.0.0/Conv: in a worker: cannot "
                             "allocate the sweep buffers"),
    ("_solve_raises", "WorkerError: layer /features/features.0/features.0.0/Conv: the solve failed in a worker: "
                      "ValueError: a bug in two lines"),
    ("_worker_dies", "a worker process died while solving it"),
], ids=["memory-error", "exception", "worker-killed"])
def test_a_failing_local_worker_is_a_one_line_error(fn, needle, tmp_path):
    rc, err = _cli_with_solve(fn, "local:2", tmp_path)
    lines = builders.error_lines(err)
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("onnxcomq: error:") and needle in lines[0], err


def test_a_failed_local_run_kills_the_workers_still_solving(tmp_path):
    """local:2, one pass: the first layer's solve fails while the other worker's runs for minutes; the run ends
    with the first error, the busy worker killed (closing waits for the pool's manager thread, not for the task)."""
    t0 = time.perf_counter()
    rc, err = _cli_with_solve("_solve_raises_or_hangs", "local:2", tmp_path, extra=("--preset", "fast"))
    lines = builders.error_lines(err)
    assert rc == 1 and len(lines) == 1, err
    assert "features.0.0/Conv: the solve failed in a worker: ValueError: a bug" in lines[0], err
    assert time.perf_counter() - t0 < 120, "the run waited for the tasks still running"


def test_a_failing_ray_task_is_a_one_line_error(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install ray; tools/test.sh installs it)")
    rc, err = _cli_with_solve("_solve_raises", "ray", tmp_path, ray=True)
    lines = builders.error_lines(err)
    assert rc == 1 and len(lines) == 1, err
    assert "the solve failed in a worker: ValueError: a bug in two lines" in lines[0], err


def test_a_failed_ray_run_does_not_wait_for_the_tasks_still_running(tmp_path):
    """One pass (all six layers at once, four tasks in flight on 2 CPUs): the first layer's task fails while the
    second runs for minutes; the run ends with the first error, without waiting for (or cancelling) the others."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install ray; tools/test.sh installs it)")
    t0 = time.perf_counter()
    rc, err = _cli_with_solve("_solve_raises_or_hangs", "ray", tmp_path, ray=True, extra=("--preset", "fast"))
    lines = builders.error_lines(err)
    assert rc == 1 and len(lines) == 1, err
    assert "features.0.0/Conv: the solve failed in a worker: ValueError: a bug" in lines[0], err
    assert time.perf_counter() - t0 < 120, "the run waited for the tasks still running"
