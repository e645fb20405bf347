"""Past one machine: per-case work fanned out on Ray, the project written by the driver alone.

``--ray`` starts a local Ray instance sized to this machine; ``--ray-address ADDRESS`` joins
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .progress import Counter, announce, emit

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
    """The command line's ``--ray`` / ``--ray-address ADDRESS`` (None when neither is given; ``local``: a
    local instance)."""
    if address is None:
        return None
    return RaySpec(None if address == LOCAL else address, workers, threads, retries)


def _where(spec: RaySpec) -> str:
    """The option an error is about: ``--ray`` (a local instance) or ``--ray-address ADDRESS``."""
    return f"--ray-address {spec.address}" if spec.address else "--ray"


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
        for key in ("nnUNet_def_n_proc", "nnUNet_compile", "nnUNet_n_proc_DA"):
            if key in os.environ:
                runtime_env.setdefault("env_vars", {})[key] = os.environ[key]
        try:
            ray.init(address=spec.address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env=runtime_env, **({} if spec.address else {"num_cpus": os.cpu_count()}))
        except ConnectionError as exc:
            raise InputError(f"--ray-address {spec.address}", f"no Ray cluster answers there ({exc})") from exc
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
        os.environ[ON_WORKER] = "1"
        self.threads = threads
        os.environ["OMP_NUM_THREADS"] = str(threads)  # torch imported from now on takes it
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)

    def ready(self) -> str:
        """Answers once the actor is built (its model loaded): where it runs."""
        return worker_name()


ON_WORKER = "ALSEG_RAY_WORKER"  # set in the processes of this module's actors and tasks


def worker_device(device: str) -> str:
    """The device a Ray worker runs on (as a name): a CUDA device asked for (``cuda`` or ``cuda:N``)
    is the one GPU Ray gave this worker (Ray sets ``CUDA_VISIBLE_DEVICES`` to it, so it is ``cuda:0``
    there). Outside a worker of this module the name is returned as given."""
    from .devices import device_name

    name = device_name(device)
    if os.environ.get(ON_WORKER) and name.startswith("cuda") and os.environ.get("CUDA_VISIBLE_DEVICES"):
        return "cuda:0"
    return name


@dataclass
class Failure:
    key: str
    error: str


def fan_out(spec: RaySpec, worker_cls: type, init: dict, inputs: Iterable[tuple[str, Callable[[], tuple]]],
            on_result: Callable[[str, dict], None], *, method: str = "run", gpus: bool = False,
            desc: str = "ray", guard: str | Path | None = None, total: int | None = None) -> list[Failure]:
    """Run ``worker_cls(**init).<method>(*args)`` for every ``(key, make_args)`` of ``inputs`` on
    ``spec.workers`` actors, each input put into the object store once (``make_args`` is called in
    the driver, just before its task is submitted, so the driver holds only the inputs in flight);
    ``on_result(key, result)`` runs in the driver as each finishes (in completion order). Returns the
    keys that failed after the retries, with the error; the others completed. ``init``'s values are
    put into the object store once and shared by every actor (a model's weights). ``worker_cls``
    subclasses :class:`Worker`; ``guard``: the folder its actors may not change (the project);
    ``total``: the number of inputs, for the progress events.

    A worker that dies is restarted by Ray and its task retried (``spec.retries``); one that dies
    more often is replaced by a fresh worker in its slot, and the tasks lost with it run again at
    the end one by one on a worker of their own (a task in flight beside the one that kills its
    worker dies with it): only a task that still fails alone is named. The actors are killed when
    the run ends, however it ends (an error, Ctrl-C)."""
    with connected(spec) as ray:
        return _Fleet(ray, spec, worker_cls, init, method, gpus, desc, guard, total).run(inputs, on_result)


def _workers(ray, spec: RaySpec, gpus: bool) -> tuple[bool, int]:
    """Whether the workers take a GPU each, and how many run at once: ``spec.workers`` (default: all
    the cluster can place), never more than it can place, its GPUs (where used) and its CPUs per
    ``spec.threads`` node by node (a worker lives on one node; actors hold theirs for life, so one
    that cannot be placed would never run)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")] or [ray.cluster_resources()]
    use_gpu = gpus and sum(r.get("GPU", 0) for r in nodes) >= 1
    per_node = [int(r.get("CPU", 0)) // spec.threads for r in nodes]
    if use_gpu:
        per_node = [min(c, int(r.get("GPU", 0))) for c, r in zip(per_node, nodes)]
    capacity = max(1, sum(per_node))
    n = spec.workers or capacity
    if n > capacity:
        announce("ray", f"ray: {n} workers asked for, the cluster holds {capacity} of {spec.threads} thread(s): "
                 f"{capacity} used", workers_asked=n, workers=capacity)
    return use_gpu, min(n, capacity)


def raise_failures(failures: list[Failure], where: str, total: int, again: str) -> None:
    """The cases that failed on the workers after the retries, named in one error (exit code 2) once
    the others are stored; ``again``: how to retry them."""
    if failures:
        named = "; ".join(f"{f.key}: {f.error}" for f in failures[:10])
        raise InputError(where, f"{len(failures)} of {total} case(s) failed on Ray workers after the retries ({named}); "
                                f"the other cases are stored, {again}")


READY_TIMEOUT_S = 900  # a worker that has not loaded its model by then (placed nowhere, stuck) fails the run


class _Fleet:
    """The actors of one :func:`fan_out` run and its bookkeeping."""

    def __init__(self, ray, spec: RaySpec, worker_cls: type, init: dict, method: str, gpus: bool, desc: str,
                 guard, total: int | None):
        self.ray, self.spec, self.method, self.desc = ray, spec, method, desc
        self.use_gpu, self.n = _workers(ray, spec, gpus)
        self.shared = {k: ray.put(v) for k, v in init.items()}
        self.guard = str(guard) if guard else None
        self.remote = ray.remote(worker_cls).options(
            num_cpus=spec.threads, num_gpus=1 if self.use_gpu else 0, max_restarts=spec.retries,
            max_task_retries=spec.retries)
        self.alive: list[object] = []  # every actor started, killed at the end
        self.counter = Counter(desc, total)
        self.failures: list[Failure] = []

    def _actor(self):
        actor = self.remote.remote(**self.shared, guard=self.guard, threads=self.spec.threads)
        self.alive.append(actor)
        return actor

    def _ready(self, actors: list) -> None:
        """Every actor built, or a clear error: a worker that cannot load its model fails the run at once."""
        try:
            names = self.ray.get([a.ready.remote() for a in actors], timeout=READY_TIMEOUT_S)
        except self.ray.exceptions.RayActorError as exc:
            raise InputError(_where(self.spec),
                             f"a worker could not start: {_error_text(exc)}") from exc
        except self.ray.exceptions.GetTimeoutError as exc:
            raise InputError(_where(self.spec),
                             f"the workers were not all started after {READY_TIMEOUT_S} s (the cluster could not place "
                             f"{len(actors)} of {self.spec.threads} CPU(s){' and a GPU' if self.use_gpu else ''} each?)"
                             ) from exc
        hosts = sorted({n.split(":")[0] for n in names})
        announce("ray", f"ray: {len(actors)} worker(s) of {self.spec.threads} thread(s)"
                 f"{' and 1 GPU each' if self.use_gpu else ''} on {self.spec.address or 'a local instance'} "
                 f"({', '.join(hosts)})", workers=len(actors), threads=self.spec.threads, gpus=self.use_gpu, hosts=hosts)

    def _finished(self, key: str, result: dict, on_result) -> None:
        on_result(key, result)
        self.counter.step(case=key, worker=result.get("worker"))

    def _failed(self, key: str, exc: BaseException) -> None:
        self.failures.append(Failure(key, _error_text(exc)))
        emit("ray_failed", stage=self.desc, case=key, error=self.failures[-1].error)

    def _submit(self, actor, make_args: Callable[[], tuple]):
        refs = [self.ray.put(a) for a in make_args()]  # by reference: one copy in the object store
        return getattr(actor, self.method).remote(*refs)

    def run(self, inputs, on_result) -> list[Failure]:
        ray = self.ray
        try:
            slots = [self._actor() for _ in range(self.n)]
            self._ready(slots)
            pending: dict[object, tuple[str, Callable[[], tuple], int, object]] = {}
            todo = iter(inputs)
            suspects: list[tuple[str, Callable[[], tuple]]] = []  # lost with a worker that died: maybe not their fault

            def feed(slot: int) -> None:
                item = next(todo, None)
                if item is not None:
                    key, make_args = item
                    pending[self._submit(slots[slot], make_args)] = (key, make_args, slot, slots[slot])

            for _ in range(2):  # two tasks per worker in flight (the next input is there when one ends), dealt
                for slot in range(self.n):  # round the workers: a few cases still go to every worker
                    feed(slot)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                key, make_args, slot, actor = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayActorError:  # its worker died more often than the retries
                    suspects.append((key, make_args))
                    if slots[slot] is actor:  # the first of its tasks to come back: a fresh worker takes the slot
                        ray.kill(actor, no_restart=True)
                        slots[slot] = self._actor()
                    feed(slot)  # the slot keeps its two tasks in flight
                    continue
                except Exception as exc:  # the task's own error: named
                    self._failed(key, exc)
                else:
                    self._finished(key, result, on_result)
                feed(slot)
            solo = None
            for key, make_args in suspects:  # alone now: a task that still kills its worker is the culprit
                solo = solo or self._actor()
                try:
                    result = ray.get(self._submit(solo, make_args))
                except ray.exceptions.RayActorError as exc:
                    self._failed(key, exc)
                    ray.kill(solo, no_restart=True)
                    solo = None
                except Exception as exc:
                    self._failed(key, exc)
                else:  # the driver's own errors (storing it) stop the run, as in the main loop
                    self._finished(key, result, on_result)
            return self.failures
        finally:  # on a cluster that outlives this run, its workers (and their models) go now, however it ended
            self.counter.close()
            for actor in self.alive:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)


@dataclass
class Job:
    """One task of a run of dependent tasks (:func:`run_jobs`): ``fn`` (a module-level function the
    workers can import) called with ``args(results)``, the results of the jobs named in ``after``
    by key. It may write only where it was told to (its own folder)."""

    key: str
    fn: Callable
    args: Callable[[dict], tuple]
    after: tuple[str, ...] = ()


def run_jobs_here(jobs: Sequence[Job]) -> dict[str, object]:
    """The jobs one after another in this process, in their order (each after the ones it needs)."""
    results: dict[str, object] = {}
    for job in jobs:
        emit("stage", stage="job", job=job.key)
        results[job.key] = job.fn(*job.args(results))
    return results


def run_jobs(spec: RaySpec, jobs: Sequence[Job], *, gpus: bool = False, desc: str = "jobs") -> dict[str, object]:
    """The jobs as Ray tasks, ``spec.workers`` at a time (default: as many as the cluster can
    place, one GPU each where ``gpus`` and there are GPUs), each started once the jobs it needs
    have finished, in the order given among those ready; a task whose worker dies is retried
    (``spec.retries``). Returns every job's result by key, or an error naming the jobs that
    failed (and those that could not start without them) once the others have finished."""
    with connected(spec) as ray:
        use_gpu, n = _workers(ray, spec, gpus)
        task = ray.remote(_run_job).options(num_cpus=spec.threads, num_gpus=1 if use_gpu else 0,
                                            max_retries=spec.retries)
        announce("ray", f"ray: {len(jobs)} {desc}, {n} at a time, {spec.threads} thread(s)"
                 f"{' and 1 GPU' if use_gpu else ''} each, on {spec.address or 'a local instance'}",
                 jobs=len(jobs), workers=n, threads=spec.threads, gpus=use_gpu)
        results: dict[str, object] = {}
        failed: dict[str, str] = {}
        waiting = list(jobs)
        pending: dict[object, Job] = {}
        counter = Counter(desc, len(jobs))
        try:
            while waiting or pending:
                for job in list(waiting):
                    lost = [d for d in job.after if d in failed]
                    if lost:
                        waiting.remove(job)
                        failed[job.key] = f"not run: it needs {lost[0]}, which failed"
                    elif len(pending) < n and all(d in results for d in job.after):
                        waiting.remove(job)
                        pending[task.remote(job.fn, job.args(results), spec.threads)] = job
                if not pending:  # left waiting for jobs that are not in the list
                    failed.update({j.key: f"not run: it needs {', '.join(d for d in j.after if d not in results)}, "
                                          "which no job made" for j in waiting})
                    break
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                try:
                    results[job.key], worker = ray.get(ready[0])
                except Exception as exc:
                    failed[job.key] = _error_text(exc)
                    emit("ray_failed", stage=desc, case=job.key, error=failed[job.key])
                else:
                    counter.step(case=job.key, worker=worker)
        finally:
            counter.close()
            for ref in pending:  # an error or Ctrl-C in the driver: nothing keeps running for it
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        if failed:
            named = "; ".join(f"{k}: {e}" for k, e in list(failed.items())[:10])
            raise InputError(_where(spec), f"{len(failed)} of {len(jobs)} {desc} failed ({named}); "
                             "the others finished, their folders are kept")
        return results


def _run_job(fn: Callable, args: tuple, threads: int) -> tuple[object, str]:
    """A Ray task's body: ``fn(*args)`` with ``threads`` torch threads; returns it and where it ran.

    A Ray worker runs threads of its own: a process pool forked from it can hang in a child (nnU-Net's
    planning forks one), so this worker's pools start their processes from a fork server instead."""
    import multiprocessing
    import sys

    if multiprocessing.get_start_method(allow_none=True) != "forkserver":
        multiprocessing.set_start_method("forkserver", force=True)
    os.environ[ON_WORKER] = "1"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return fn(*args), worker_name()


def _error_text(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # RayTaskError wraps the worker's own exception
    text = str(cause if cause is not None else exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]
