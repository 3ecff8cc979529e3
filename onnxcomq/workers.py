"""Fan the layer solves of a group out to worker processes (``--workers local:N``) or a Ray cluster (``--workers
ray``, ``ray://HOST:PORT``); docs/design.md, "The pipeline".

The solves of one group are independent once its statistics exist. A task is one layer: its weight matrices, the
LayerStats of its consumers, its LayerPolicy and fan-in; the worker runs ``solve.layer.quantize_layer`` with NumPy
and returns the LayerResult. The parent keeps everything ONNX (loading weights, writing the model). Results come
back in task order and are the bytes of the in-process run.

This module imports only the standard library at import time (the spawned workers import the solver lazily).
"""

from __future__ import annotations

import collections
import multiprocessing.context as _mpc
import os
import re
import time

from .errors import UserError

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_LOCAL = re.compile(r"local:(\d+)")
_RAY = re.compile(r"ray(://[^\s:/]+:\d+)?")


class WorkerError(RuntimeError):
    """A solve failed in a worker (an exception there, or a worker process that died)."""


def parse(spec) -> tuple:
    """("process", None), ("local", N) or ("ray", address or None) for a ``workers`` setting; a bad one is a
    one-line UserError."""
    if spec is None or spec == "":
        return "process", None
    if isinstance(spec, str):
        m = _LOCAL.fullmatch(spec)
        if m and int(m.group(1)) >= 1:
            return "local", int(m.group(1))
        if _RAY.fullmatch(spec):
            return "ray", spec if spec != "ray" else None
    raise UserError(f"--workers (solver.workers) must be local:N (N >= 1 worker processes), ray (a running or new "
                    f"local Ray cluster) or ray://HOST:PORT, got {spec!r}")


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # (not on every platform)
        return os.cpu_count() or 1


def solve_layer(mats: list, policy, fan_in: int, *stats):
    """One layer's solve in a worker: ``quantize_layer`` with NumPy; returns (LayerResult, seconds)."""
    import numpy as np

    from .solve.layer import quantize_layer

    t0 = time.perf_counter()
    res = quantize_layer(list(mats), list(stats), policy, fan_in, np)
    return res, time.perf_counter() - t0


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (it stops the workers), not each worker's."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ready() -> int:
    """A no-op task: starts a worker process and imports the solver and the statistics' class (which the tasks
    unpickle) in it, while the parent captures."""
    from .capture import gram  # noqa: F401
    from .solve import layer  # noqa: F401

    return os.getpid()


def _failure(name: str, e: BaseException) -> BaseException:
    """The one-line error for a task that failed with ``e`` in a worker."""
    if isinstance(e, (UserError, KeyboardInterrupt)):
        return e
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, MemoryError):
        return MemoryError(f"{name}: in a worker: {text}; fewer --workers need less memory")
    return WorkerError(f"{name}: the solve failed in a worker: {type(e).__name__}: {text}")


class InProcess:
    """No workers: ``map`` runs the tasks one after the other here."""

    workers = 1

    def share(self, obj):
        return obj

    def map(self, fn, tasks, names=()):
        for args in tasks:
            yield fn(*args)

    def close(self, kill: bool = False) -> None:
        pass


class _ThreadsProcess(_mpc.SpawnProcess):
    """A spawned process started with BLAS/OpenMP thread counts in its environment (read when it imports NumPy)."""

    env: dict = {}

    def start(self):
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            super().start()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class _SpawnContext(_mpc.SpawnContext):
    """The "spawn" start method (a fork of a process running onnxruntime's threads is unsafe) with ``threads``
    BLAS threads per worker."""

    def __init__(self, threads: int):
        super().__init__()
        self._env = {k: str(threads) for k in THREAD_VARS}

    def Process(self, *args, **kwargs):  # noqa: N802 (multiprocessing's name)
        p = _ThreadsProcess(*args, **kwargs)
        p.env = self._env
        return p


class _Pool:
    """What LocalPool and RayPool share: ``map`` over a window of tasks in flight; each pool submits a task
    (``_submit``), waits for one (``_result``, a failure as a one-line error) and stops or drops the rest
    (``close``)."""

    workers = 1
    _pending = ()  # the tasks in flight (a pool's close stops or drops them)

    def map(self, fn, tasks, names=()):
        """``fn(*args)`` for each args tuple of ``tasks``, in the workers; yields the results in task order, with
        at most 2 x workers tasks submitted ahead (``tasks`` is consumed lazily)."""
        names, it, window, i = list(names), iter(tasks), collections.deque(), 0
        self._pending = window
        try:
            for args in it:
                window.append(self._submit(fn, args))
                if len(window) >= 2 * self.workers:
                    break
            while window:
                out = self._result(window[0], names[i] if i < len(names) else f"task {i}")
                window.popleft()
                i += 1
                nxt = next(it, None)
                if nxt is not None:
                    window.append(self._submit(fn, nxt))
                yield out
        except GeneratorExit:  # the caller stopped reading (after the last result, or on its own error)
            raise
        except BaseException:
            self.close(kill=True)
            raise


class LocalPool(_Pool):
    """``local:N``: N spawned worker processes on this machine (concurrent.futures), each with cores / N BLAS
    threads; tasks and results travel pickled."""

    def __init__(self, n: int):
        from concurrent.futures import ProcessPoolExecutor

        self.workers = n
        self.threads = max(1, cores() // n)
        self._ex = ProcessPoolExecutor(n, mp_context=_SpawnContext(self.threads), initializer=_ignore_sigint)
        self._warm = [self._ex.submit(_ready) for _ in range(n)]  # start the workers while the parent captures

    def share(self, obj):
        return obj  # (pickled into each task that reads it)

    def _submit(self, fn, args):
        return self._ex.submit(fn, *args)

    def _result(self, future, name: str):
        from concurrent.futures.process import BrokenProcessPool

        try:
            return future.result()
        except BrokenProcessPool:
            raise WorkerError(f"{name}: a worker process died while solving it (killed by the system: out "
                              "of memory is the usual cause; try fewer --workers)") from None
        except Exception as e:
            raise _failure(name, e) from None

    def close(self, kill: bool = False) -> None:
        """Shut the workers down; ``kill``: at once (after a failure or an interrupt), not after their tasks."""
        if self._ex is None:
            return
        ex, self._ex = self._ex, None
        if kill:
            for p in list((getattr(ex, "_processes", None) or {}).values()):
                if p.is_alive():
                    p.terminate()
        # (waits for the executor's manager thread even after a kill, which ends once the killed workers are gone:
        # left running, CPython 3.11's exit handler raced it to the closed wake-up pipe and printed a traceback
        # after the one-line error, "OSError: [Errno 9] Bad file descriptor")
        ex.shutdown(wait=True, cancel_futures=True)


class RayPool(_Pool):
    """``ray`` / ``ray://HOST:PORT``: one Ray task per layer (1 CPU each); the statistics of a group are put into
    the object store once (``share``) and read there by every task that needs them."""

    def __init__(self, address: str | None):
        try:
            import ray
        except ImportError:
            raise UserError("--workers ray needs Ray: pip install onnxcomq[ray] (or pip install ray)") from None
        import logging

        self._ray, self._started = ray, False
        if not ray.is_initialized():
            try:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            except Exception as e:
                text = " ".join(str(e).split())[:300]
                raise UserError(f"--workers {address or 'ray'}: cannot start or reach the Ray cluster: "
                                f"{type(e).__name__}: {text}") from None
            self._started = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remote = {}
        self._pending = []

    def share(self, obj):
        return self._ray.put(obj)

    def _submit(self, fn, args):
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(num_cpus=1, max_retries=0)(fn)
        return remote.remote(*args)

    def _result(self, ref, name: str):
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            raise _failure(name, getattr(e, "cause", None) or e) from None
        except ray.exceptions.RayError as e:  # a worker or node lost, the object store full, ...
            text = " ".join(str(e).split())[:300]
            raise WorkerError(f"{name}: a Ray worker failed while solving it: {type(e).__name__}: "
                              f"{text}") from None

    def close(self, kill: bool = False) -> None:
        """After a failure (``kill``) collect the tasks in flight that end within a few seconds, so that Ray does
        not log their errors as never handled; shut Ray down if this pool started it (which stops the rest).

        No ``ray.cancel``: cancelling a task as it ends races with its reply in Ray's core worker and can abort
        the driver with a C++ check failure ("Tried to complete task that was not pending", ray-project/ray
        #54798); the tasks left running on a cluster this pool did not start are at most 2 x workers layer
        solves, whose results are dropped (and Ray stops them when this process exits)."""
        ray = self._ray
        if ray is None:
            return
        pending, self._pending = list(self._pending), []
        if kill and pending:
            try:
                done, _ = ray.wait(pending, num_returns=len(pending), timeout=0 if self._started else 5)
                for ref in done:
                    try:
                        ray.get(ref)
                    except Exception:
                        pass
            except Exception:
                pass
        if self._started:
            ray.shutdown()
        self._ray = None


def open_pool(spec):
    """The executor for a ``workers`` setting (see ``parse``)."""
    kind, arg = parse(spec)
    if kind == "local":
        return LocalPool(arg)
    if kind == "ray":
        return RayPool(arg)
    return InProcess()


__all__ = ["WorkerError", "cores", "parse", "open_pool", "solve_layer", "InProcess", "LocalPool", "RayPool"]
