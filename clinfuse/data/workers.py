"""Per-file work in worker processes, each file bounded in time and memory.

A broken or hostile file can keep a decoder busy for a long time (fuzzing found a 22 kB JPEG-LS file
that takes 10 s to fail), make it allocate gigabytes, or crash the interpreter. Work on such files
runs here, in separate processes: a file that takes longer than its deadline has its worker killed
and replaced, a worker that dies (a decoder's segfault, the kernel's OOM killer) costs that one file,
and a worker's address space is capped so that a file that needs too much memory fails with a
``MemoryError`` inside the worker instead of swapping the machine. Each such file comes back as a
reason; the rest of the batch goes on, on every core.

Workers are started with ``python -m clinfuse.data.workers`` (not ``multiprocessing``'s fork or
spawn), so they never inherit a parent's threads or locks (torch, MLflow) and never re-import the
parent's ``__main__``; a pool is kept for the life of the process and reused by later calls with the
same function and memory cap (a notebook or the test suite builds many cohorts).
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from ..errors import ClinfuseError

__all__ = ["Failed", "BoundedPool", "bounded_map", "default_workers", "close_pools"]


@dataclass(frozen=True)
class Failed:
    """A task that did not return: the reason, in words a user can act on."""

    reason: str


def default_workers() -> int:
    """The cores this process may use (its CPU affinity, not the machine's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


class _Worker:
    def __init__(self, target: str, memory_mb: float | None):
        parent, child = socket.socketpair()
        self.stderr = tempfile.TemporaryFile()  # a native library's last words, for the reason of a death
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the folder holding the clinfuse package
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"  # one process per core already; a thread pool each would only oversubscribe
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clinfuse.data.workers", str(child.fileno()), target, str(memory_mb or 0)],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stderr=self.stderr, env=env, close_fds=True,
        )
        child.close()
        self.conn = Connection(parent.detach())  # the connection owns the socket's descriptor
        self.task: int | None = None
        self.started = 0.0
        self.ready = False  # set by the worker's first message, once its imports are done

    def last_words(self) -> str:
        """The last line the worker wrote to its stderr (e.g. ``std::bad_alloc``), or ''."""
        try:
            self.stderr.seek(max(0, self.stderr.seek(0, 2) - 2000))
            lines = [x.strip() for x in self.stderr.read().decode(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        return lines[-1][:200] if lines else ""

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self._close()

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it has not within 5 s."""
        try:
            self.conn.send(None)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._close()

    def _close(self) -> None:
        self.proc.wait()
        self.conn.close()
        self.stderr.close()


class BoundedPool:
    """Worker processes running ``target`` (``"module:function"``), one task each at a time.

    Args:
        target: the function, importable by name in a fresh interpreter.
        workers: number of processes (default: the usable cores).
        memory_mb: cap on each worker's address space (``RLIMIT_AS``), or None.
    """

    def __init__(self, target: str, workers: int | None = None, memory_mb: float | None = None):
        self.target = target
        self.memory_mb = memory_mb
        self.size = workers or default_workers()
        self._idle: list[_Worker] = []
        # a map owns the workers it took until it ends; only the hand-over of idle ones is shared between
        # threads (a server screening two requests at once), so only that is locked
        self._lock = threading.Lock()

    def _spawn(self) -> _Worker:
        return _Worker(self.target, self.memory_mb)

    def _replace(self, workers: list[_Worker], w: _Worker) -> None:
        """Kill `w` (dead, or past its deadline) and put a fresh worker in its place."""
        workers.remove(w)
        w.kill()
        workers.append(self._spawn())

    def map(self, tasks: Iterable[tuple], seconds: float | None = None,
            what: Callable[[float], str] | None = None) -> Iterator[tuple[int, Any]]:
        """Run every task; yield ``(index, result)`` as each finishes (not in order).

        A result is the function's return value, or a :class:`Failed` when the task raised, ran past
        ``seconds`` (its worker is killed and replaced) or its worker died.
        """
        # tasks are taken as workers free up (an export's million paths are never all in memory); `pending`
        # holds the few taken ahead, and a task whose worker died before it was sent
        source = enumerate(tasks)
        pending = list(itertools.islice(source, self.size))
        pending.reverse()
        with self._lock:
            workers = self._idle[: self.size]
            self._idle = self._idle[self.size:]
        workers += [self._spawn() for _ in range(min(self.size, len(pending)) - len(workers))]
        busy: dict[Connection, _Worker] = {}
        try:
            while pending or busy:
                for w in [w for w in workers if w.task is None and w.ready]:
                    if not pending:
                        break
                    i, args = pending.pop()
                    if not pending:
                        pending.extend(itertools.islice(source, 1))
                    try:
                        w.conn.send((i, args))
                    except OSError:  # died while idle: replace it; the task waits for the next ready worker
                        pending.append((i, args))
                        self._replace(workers, w)
                        continue
                    w.task, w.started = i, time.monotonic()  # the clock starts when a ready worker has the task
                    busy[w.conn] = w
                starting = {w.conn: w for w in workers if not w.ready}
                timeout = None
                if seconds is not None and busy:
                    timeout = max(0.0, min(w.started for w in busy.values()) + seconds - time.monotonic())
                for conn in wait(list(busy) + list(starting), timeout=timeout):
                    if conn in starting:
                        w = starting[conn]
                        try:
                            conn.recv()
                            w.ready = True
                        except (EOFError, OSError):
                            words = w.last_words()
                            raise ClinfuseError(f"a reading process ({self.target}) could not start: "
                                                f"{words or f'exit status {w.proc.wait()}'}") from None
                        continue
                    w = busy.pop(conn)
                    i, w.task = w.task, None
                    try:
                        j, ok, value = conn.recv()
                    except (EOFError, OSError):
                        code = w.proc.wait()
                        why = (f"killed by {_signal_name(-code)}" if code < 0 else f"exit status {code}")
                        words = w.last_words()
                        yield i, Failed(f"the reading process died ({why}) on this file"
                                        + (f": {words}" if words else "")
                                        + (" (out of memory?)" if code == -signal.SIGKILL else ""))
                        self._replace(workers, w)
                        continue
                    yield j, (value if ok else Failed(value))
                if seconds is not None:
                    now = time.monotonic()
                    for conn, w in list(busy.items()):
                        if now - w.started >= seconds:
                            busy.pop(conn)
                            i, w.task = w.task, None
                            self._replace(workers, w)
                            yield i, Failed(what(seconds) if what else f"took longer than {seconds:g} s")
        except BaseException:
            for w in workers:
                w.kill()
            workers = []
            raise
        finally:
            with self._lock:
                self._idle += [w for w in workers if w.task is None]
            for w in workers:
                if w.task is not None:
                    w.kill()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.stop()


_POOLS: dict[tuple[str, float | None], BoundedPool] = {}
_POOLS_LOCK = threading.Lock()


def bounded_map(target: str, tasks: Iterable[tuple], *, workers: int | None = None, seconds: float | None = None,
                memory_mb: float | None = None, what: Callable[[float], str] | None = None
                ) -> Iterator[tuple[int, Any]]:
    """:meth:`BoundedPool.map` on a pool kept for this process (one per target and memory cap)."""
    with _POOLS_LOCK:
        pool = _POOLS.get((target, memory_mb))
        if pool is None:
            pool = _POOLS[(target, memory_mb)] = BoundedPool(target, workers, memory_mb)
    pool.size = workers or default_workers()
    return pool.map(tasks, seconds, what)


@atexit.register
def close_pools() -> None:
    """Stop every idle worker (also run at exit)."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


def _serve(fd: int, target: str, memory_mb: float) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops the workers
    if memory_mb > 0:
        import resource

        cap = int(memory_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    module, name = target.split(":")
    func = getattr(importlib.import_module(module), name)
    conn = Connection(fd)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the parent has gone
            return
        if task is None:
            return
        i, args = task
        try:
            reply = (i, True, func(*args))
        except MemoryError:
            reply = (i, False, f"needs more than the {memory_mb:g} MB of memory a worker may use")
        except BaseException as e:  # noqa: BLE001 - any failure is this task's, the worker serves on
            text = str(e).strip().splitlines()
            reply = (i, False, f"{type(e).__name__}: {text[0] if text else ''}"[:300])
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]))
