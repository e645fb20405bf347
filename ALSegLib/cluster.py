"""Past one machine: per-case work fanned out on Ray, the project written by the driver alone.

``--ray`` (no address) starts a local Ray instance sized to this machine; ``--ray ADDRESS`` joins
an existing cluster (``auto``, ``ray://host:10001``, ``host:6379``). Without ``--ray`` nothing here
is imported or run.

The rule: **workers compute, the driver writes**. A worker is an actor that loads its model once
(:func:`fan_out` builds ``workers`` of them) and turns inputs into arrays and metadata; it never
opens the project folder. The driver puts each input (an image array) into Ray's object store once,
hands the reference to a worker, and stores what comes back under the project's lock with the same
atomic writes and provenance as the single-machine path. A worker that dies is restarted and its
task retried (``retries`` times); a task lost with it that may have been another task's victim runs
again alone on a fresh worker; a task that still fails names its case, and the rest completes.
A driver killed mid-run leaves the project as an interrupted single-machine run does: each case is
stored whole or not at all, and the run resumes where it stopped.

Workers run the engine the driver runs: on a local instance through ``PYTHONPATH``, on a remote
cluster by shipping the ``ALSegLib`` package with the job (Ray's ``py_modules``); its other packages
(torch, nnunetv2, ...) must be installed on the cluster's nodes.
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .progress import announce, emit

ENGINE_DIR = Path(__file__).resolve().parent  # the ALSegLib package the driver runs


@dataclass(frozen=True)
class RaySpec:
    """Where and how wide to fan out: ``address`` None for a local instance sized to this machine;
    ``workers`` actors (default: one per CPU the cluster has, or per GPU where the work uses GPUs);
    ``threads`` torch threads per worker; a dead worker's task is retried ``retries`` times."""

    address: str | None = None
    workers: int | None = None
    threads: int = 1
    retries: int = 2

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise InputError("--ray-workers", f"must be at least 1, not {self.workers}")
        if self.threads < 1:
            raise InputError("--ray-threads", f"must be at least 1, not {self.threads}")
        if self.retries < 0:
            raise InputError("--ray-retries", f"must be 0 or more, not {self.retries}")

    def to_json(self) -> dict:
        return {"address": self.address, "workers": self.workers, "threads": self.threads, "retries": self.retries}


LOCAL = "local"  # `--ray` given without an address


def spec_from_options(address: str | None, workers: int | None = None, threads: int = 1,
                      retries: int = 2) -> RaySpec | None:
    """The command line's ``--ray [ADDRESS]`` (None when not given; ``local``: a local instance)."""
    if address is None:
        return None
    return RaySpec(None if address == LOCAL else address, workers, threads, retries)


def worker_name() -> str:
    """The host and process a result came from (recorded in provenance and progress events)."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def connected(spec: RaySpec) -> Iterator[object]:
    """Ray, initialised for ``spec`` for the duration (and shut down after, if this started it)."""
    try:
        import ray
    except ImportError as exc:
        raise InputError("--ray", "Ray is not installed here (pip install 'ray>=2.40')") from exc
    started = not ray.is_initialized()
    if started:
        engine_root = str(ENGINE_DIR.parent)
        if spec.address is None:
            env = {"PYTHONPATH": os.pathsep.join(p for p in (engine_root, os.environ.get("PYTHONPATH")) if p)}
            runtime_env = {"env_vars": env}
        else:
            runtime_env = {"py_modules": [str(ENGINE_DIR)]}
        for key in ("nnUNet_def_n_proc", "nnUNet_compile"):
            if key in os.environ:
                runtime_env.setdefault("env_vars", {})[key] = os.environ[key]
        try:
            ray.init(address=spec.address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env=runtime_env, **({} if spec.address else {"num_cpus": os.cpu_count()}))
        except ConnectionError as exc:
            raise InputError(f"--ray {spec.address}", f"no Ray cluster answers there ({exc})") from exc
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHANGING_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.truncate", "os.chmod", "os.utime",
                    "os.symlink", "os.link", "shutil.rmtree", "shutil.move", "shutil.copyfile"}


def guard_folder(root: str | Path) -> None:
    """From now on this process may not change anything under ``root``: opening a file there for
    writing, or removing, renaming, creating or changing one, raises PermissionError (an audit hook;
    a worker installs it for the project folder, so "workers compute, the driver writes" is enforced,
    not only intended). Reading stays allowed."""
    import sys

    base = os.path.realpath(root)

    def inside(path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        try:
            real = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return real == base or real.startswith(base + os.sep)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writes and inside(path):
                raise PermissionError(f"a Ray worker may not write the project folder ({path})")
        elif event in _CHANGING_EVENTS and any(inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"a Ray worker may not change the project folder ({event} {args[0]})")

    sys.addaudithook(hook)


class Worker:
    """Base of the actors :func:`fan_out` runs: sets the torch threads and guards the project
    folder (``guard``) before the subclass loads its model."""

    def __init__(self, guard: str | None = None, threads: int = 1):
        import sys

        if guard:
            guard_folder(guard)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # torch imported from now on takes it
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


@dataclass
class Failure:
    key: str
    error: str


def fan_out(spec: RaySpec, worker_cls: type, init: dict, inputs: Iterable[tuple[str, Callable[[], tuple]]],
            on_result: Callable[[str, dict], None], *, method: str = "run", gpus: bool = False,
            desc: str = "ray", guard: str | Path | None = None) -> list[Failure]:
    """Run ``worker_cls(**init).<method>(*args)`` for every ``(key, make_args)`` of ``inputs`` on
    ``spec.workers`` actors, each input put into the object store once (``make_args`` is called in
    the driver, just before its task is submitted, so the driver holds only the inputs in flight);
    ``on_result(key, result)`` runs in the driver as each finishes (in completion order). Returns the
    keys that failed after the retries, with the error; the others completed. ``init``'s values are
    put into the object store once and shared by every actor (a model's weights). ``worker_cls``
    subclasses :class:`Worker`; ``guard``: the folder its actors may not change (the project)."""
    with connected(spec) as ray:
        resources = ray.cluster_resources()
        use_gpu = gpus and resources.get("GPU", 0) >= 1
        capacity = int(resources.get("GPU", 0)) if use_gpu else max(1, int(resources.get("CPU", 1)) // spec.threads)
        n = spec.workers or capacity
        if n > capacity:  # actors hold their CPUs or GPUs for life: the ones that cannot be placed would never run
            announce("ray", f"ray: {n} workers asked for, the cluster holds {capacity} of {spec.threads} thread(s): "
                     f"{capacity} used", workers_asked=n, workers=capacity)
            n = capacity
        shared = {k: ray.put(v) for k, v in init.items()}
        remote = ray.remote(worker_cls).options(
            num_cpus=spec.threads, num_gpus=1 if use_gpu else 0, max_restarts=spec.retries,
            max_task_retries=spec.retries)
        actors = [remote.remote(**shared, guard=str(guard) if guard else None, threads=spec.threads) for _ in range(n)]
        announce("ray", f"ray: {n} worker(s) of {spec.threads} thread(s){' and 1 GPU each' if use_gpu else ''} "
                 f"on {spec.address or 'a local instance'}", workers=n, threads=spec.threads, gpus=use_gpu)
        pending: dict[object, tuple[str, int]] = {}
        failures: list[Failure] = []
        inputs_of: dict[str, Callable[[], tuple]] = {}
        todo = iter(inputs)
        done = total = 0
        busy = [0] * n

        def submit(slot: int) -> bool:
            nonlocal total
            item = next(todo, None)
            if item is None:
                return False
            key, make_args = item
            inputs_of[key] = make_args
            refs = [ray.put(a) for a in make_args()]  # by reference: one copy in the object store
            pending[getattr(actors[slot], method).remote(*refs)] = (key, slot)
            busy[slot] += 1
            total += 1
            return True

        for slot in range(n):  # two tasks per worker in flight: the next input is there when one ends
            for _ in range(2):
                submit(slot)
        suspects: list[tuple[str, Callable[[], tuple]]] = []  # lost with a worker that died: maybe another task's fault

        def finished(key: str, result: dict) -> None:
            nonlocal done
            on_result(key, result)
            done += 1
            emit("progress", stage=desc, done=done, total=None, case=key, worker=result.get("worker"))

        def failed(key: str, exc: BaseException) -> None:
            failures.append(Failure(key, _error_text(exc)))
            emit("ray_failed", stage=desc, case=key, error=failures[-1].error)

        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            key, slot = pending.pop(ref)
            busy[slot] -= 1
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError:  # its worker died more often than the retries
                suspects.append((key, inputs_of[key]))
            except Exception as exc:  # the task's own error: named
                failed(key, exc)
            else:
                finished(key, result)
            submit(slot)
        # a task in flight beside one that kills its worker dies with it: each such task runs again alone, on a
        # fresh worker, and only a task that still kills it is named
        for key, make_args in suspects:
            solo = remote.remote(**shared, guard=str(guard) if guard else None, threads=spec.threads)
            try:
                finished(key, ray.get(getattr(solo, method).remote(*[ray.put(a) for a in make_args()])))
            except Exception as exc:
                failed(key, exc)
            finally:
                ray.kill(solo)
        for actor in actors:  # on a cluster that outlives this run, its workers (and their models) go now
            ray.kill(actor)
        return failures


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the worker's own exception
    text = str(cause if cause is not None else exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]
