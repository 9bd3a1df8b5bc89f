"""Executors: run one picklable function over many work items, locally or on a Ray cluster.

    >>> with make_executor(ExecutorConfig(kind="local", workers=2)) as ex:
    ...     for index, result, error in ex.imap_unordered(task, items):
    ...         ...

- ``local`` (default): a ``concurrent.futures`` pool of ``workers`` processes (``mode="process"``,
  started with ``spawn``: no forked torch state) or threads (``mode="thread"``).
- ``ray``: one Ray task per item (``num_cpus=1`` each). ``address`` connects to a running
  cluster (``"auto"``, ``"HOST:6379"`` on a cluster node, or ``"ray://HOST:10001"`` through Ray
  Client); without it a local Ray is started with ``num_cpus=workers`` and shut down on close.

Executors only compute: tasks return their results to the driver, which alone writes them to
the store (see ``analysis.weights.batch_pipeline``). Workers therefore need the code (the same LensLab version
installed on every node) and read access to the inputs at the same paths, never the store.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from analysis.errors import ConfigError

EXECUTORS = ("local", "ray")
LOCAL_MODES = ("process", "thread")

Outcome = tuple[int, Any, BaseException | None]  # (item index, result or None, error or None)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorConfig:
    """Where tasks run. ``workers``: local processes/threads, or the CPUs of a local Ray (default:
    the usable CPUs); ignored when connecting to a Ray cluster by ``address``."""

    kind: str = "local"
    workers: int | None = None
    mode: str = "process"
    address: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ConfigError(f"unknown executor {self.kind!r}; choose one of {', '.join(EXECUTORS)}")
        if self.mode not in LOCAL_MODES:
            raise ConfigError(f"unknown local mode {self.mode!r}; choose one of {', '.join(LOCAL_MODES)}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}; pass e.g. --workers 2")
        if self.address is not None and self.kind != "ray":
            raise ConfigError(f"--ray-address {self.address!r} needs --executor ray (got {self.kind!r})")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _task_error(exc: BaseException) -> BaseException:
    """The task's own exception (Ray wraps it in a ``RayTaskError`` carrying ``cause``)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class Executor:
    """Maps a function over items; subclasses implement ``imap_unordered``."""

    def __init__(self, config: ExecutorConfig) -> None:
        self.config = config

    def imap_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Outcome]:
        """Yield ``(index, result, None)`` or ``(index, None, error)`` per item as tasks finish."""
        raise NotImplementedError  # pragma: no cover

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """Results in item order; the first failing task's exception is raised."""
        out: list[Any] = [None] * len(items)
        for i, result, error in self.imap_unordered(fn, items):
            if error is not None:
                raise error
            out[i] = result
        return out

    @property
    def parallelism(self) -> int:
        """Tasks that run at once (the driver sizes per-task threads from it)."""
        return 1

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _init_process(threads: int) -> None:
    os.environ["LENSLAB_THREADS"] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)


class LocalExecutor(Executor):
    """A process (spawn) or thread pool on this machine."""

    def __init__(self, config: ExecutorConfig) -> None:
        super().__init__(config)
        self._workers = config.workers or usable_cpus()
        self._pool = None

    @property
    def parallelism(self) -> int:
        return self._workers

    def _get_pool(self):
        import concurrent.futures as cf
        import multiprocessing as mp

        if self._pool is None:  # processes are spawned as tasks need them, up to ``workers``
            n = self._workers
            if self.config.mode == "thread":
                self._pool = cf.ThreadPoolExecutor(max_workers=n, thread_name_prefix="lenslab-task")
            else:
                threads = max(1, usable_cpus() // n)
                self._pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"),
                                                    initializer=_init_process, initargs=(threads,))
        return self._pool

    def imap_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Outcome]:
        import concurrent.futures as cf

        if not items:
            return
        pool = self._get_pool()
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        try:
            for fut in cf.as_completed(futures):
                exc = fut.exception()
                yield (futures[fut], None, exc) if exc is not None else (futures[fut], fut.result(), None)
        finally:
            for fut in futures:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast with a ConfigError when ``HOST:PORT`` / ``ray://HOST:PORT`` accepts no TCP connection."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local" or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"no Ray head answers at {address!r} ({exc}); start one with `ray start --head` there, "
                          "check host and port (6379 for HOST:PORT, 10001 for ray://), or use --executor local") from exc


def ray_cause(exc: BaseException) -> str:
    """The innermost cause of a failed ``ray.init``, as ``Type: message``.

    Ray wraps a refused connection in ConnectionError -> RuntimeError whose text ends in the
    traceback of the real error (e.g. ``AuthenticationError: ... InvalidAuthToken``)."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    inner = seen[-1]
    text = str(inner).strip()
    found = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)", text, flags=re.MULTILINE)
    if found:  # the last exception line of an embedded traceback
        kind, message = found[-1]
        return f"{kind.rsplit('.', 1)[-1]}: {message.strip()}"
    return f"{type(inner).__name__}: {text.splitlines()[0] if text else ''}"


def _init_error(address: str | None, exc: BaseException) -> ConfigError:
    """A ConfigError naming the Ray address, Ray's own cause and the fix."""
    cause = ray_cause(exc)
    where = repr(address) if address is not None else "a local Ray"
    if "InvalidAuthToken" in cause or cause.startswith("AuthenticationError"):
        fix = ("the cluster uses token authentication: set RAY_AUTH_MODE=token here and give this machine the "
               "cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH), or run on a cluster node "
               "with --ray-address auto")
    else:
        fix = ("check --ray-address (e.g. auto, HOST:6379 on a cluster node, ray://HOST:10001), "
               "or use --executor local")
    return ConfigError(f"cannot start or reach {where}: {cause[:600]}; {fix}")


class RayExecutor(Executor):
    """One Ray task per item, on a running cluster (``address``) or a local Ray started here."""

    def __init__(self, config: ExecutorConfig) -> None:
        super().__init__(config)
        try:
            import ray
        except ImportError as exc:
            raise ConfigError("--executor ray needs Ray; install it with `pip install 'lenslab[ray]'` "
                              "(or `pip install ray`), or use --executor local") from exc
        self._ray = ray
        self._started = False
        if config.address is not None:
            _check_reachable(config.address)  # Ray itself retries an unreachable head for minutes
        if not ray.is_initialized():
            import logging

            opts: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
            if config.address is not None:
                opts["address"] = config.address
            else:
                opts.update(num_cpus=config.workers or usable_cpus(), include_dashboard=False)
            try:
                ray.init(**opts)
            except Exception as exc:  # noqa: BLE001 - Ray raises many types; each is reported with its cause
                raise _init_error(config.address, exc) from exc
            self._started = True

    @property
    def parallelism(self) -> int:
        try:
            return max(1, int(self._ray.available_resources().get("CPU", 1)))
        except Exception:  # pragma: no cover - resources unavailable
            return 1

    def imap_unordered(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Outcome]:
        ray = self._ray
        if not items:
            return
        remote = ray.remote(num_cpus=1, max_retries=0)(fn)
        pending = {remote.remote(item): i for i, item in enumerate(items)}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i = pending.pop(ref)
                    try:
                        outcome: Outcome = (i, ray.get(ref), None)
                    except Exception as exc:  # the task's exception, wrapped by Ray
                        outcome = (i, None, _task_error(exc))
                    yield outcome
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(config: ExecutorConfig | None = None) -> Executor:
    """The executor ``config`` names (default: local processes)."""
    config = config or ExecutorConfig()
    return RayExecutor(config) if config.kind == "ray" else LocalExecutor(config)
