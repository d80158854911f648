"""A pool of worker processes for symbolic checks, with a hard per-check timeout.

Each worker runs checks one at a time and reports after each. A check gets ``timeout`` seconds:
the worker interrupts itself a little earlier (SIGALRM, for checks stuck in Python code), and the
parent kills a worker that has not reported by the deadline (checks stuck in C, e.g. a huge integer
power) and starts a replacement. A check that times out, errors, or kills its worker yields None.

Workers are fresh interpreters (``python -m orz_fast.reward._worker``) talking over two pipes: they
never fork the trainer (threads, CUDA) and never re-import the caller's ``__main__``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

SOFT_TIMEOUT_FRACTION = 0.8
"""The worker interrupts a check itself after this fraction of the timeout."""
STARTUP_TIMEOUT = 120.0
"""Seconds a new worker may take to import sympy and math-verify and report ready."""
_WORKER_MODULE = "orz_fast.reward.symbolic"


class _SoftTimeout(BaseException):
    """Raised in a worker by SIGALRM; a BaseException so library ``except Exception`` blocks let it pass."""


_armed = False
"""True only while a check runs, so a late SIGALRM cannot interrupt the worker's own messaging."""


def _raise_soft_timeout(signum, frame):
    if _armed:
        raise _SoftTimeout


def _limit_memory(limit_bytes: int) -> None:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit_bytes = min(limit_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))
    except (ImportError, ValueError, OSError):
        pass  # no RLIMIT_AS on this platform: the hard timeout still bounds the check


def worker_main(conn_in: Connection, conn_out: Connection, soft_timeout: float, memory_limit_bytes: int) -> None:
    """Worker loop: receive lists of ``(task_id, kind, a, b)``, send ``(task_id, verdict, timed_out)`` after
    each (verdict None when the check timed out or failed)."""
    global _armed
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if memory_limit_bytes > 0:
        _limit_memory(memory_limit_bytes)
    module = importlib.import_module(_WORKER_MODULE)
    checks, clear_caches = module.CHECKS, module.clear_caches
    module.warm_up()
    signal.signal(signal.SIGALRM, _raise_soft_timeout)
    conn_out.send("ready")
    while True:
        try:
            batch = conn_in.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        if batch == "clear":
            clear_caches()
            continue
        for task_id, kind, a, b in batch:
            verdict: bool | None = None
            timed_out = False
            try:
                try:
                    _armed = True
                    signal.setitimer(signal.ITIMER_REAL, soft_timeout)
                    verdict = bool(checks[kind](a, b))
                finally:
                    _armed = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                timed_out = True
            except BaseException:  # RecursionError, MemoryError, parser errors: no verdict
                pass
            conn_out.send((task_id, verdict, timed_out))


@dataclass(eq=False)
class _Worker:
    process: subprocess.Popen
    conn: Connection
    """Reads the worker's messages."""
    send_conn: Connection
    """Writes tasks to the worker."""
    ready: bool = False
    inflight: deque = field(default_factory=deque)
    deadline: float = 0.0


def _kill(w: _Worker) -> None:
    if w.process.poll() is None:
        w.process.kill()
    w.process.wait()
    w.conn.close()
    w.send_conn.close()


def _stop_workers(workers: list[_Worker | None]) -> None:
    for w in workers:
        if w is not None and w.ready and not w.inflight:
            try:
                w.send_conn.send(None)
            except (OSError, ValueError):
                pass
    for i, w in enumerate(workers):
        if w is None:
            continue
        if w.ready and not w.inflight:
            try:
                w.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        _kill(w)  # still starting or busy: nothing to wait for
        workers[i] = None


class VerifierPool:
    """Worker processes that run symbolic checks under a hard per-check timeout.

    Args:
        workers: number of worker processes (started on first use).
        timeout: seconds one check may take; past it the check yields None and a hung worker is replaced.
        memory_limit_mb: address-space limit of each worker (0: none), so a runaway check fails fast.
        chunk_size: most checks handed to a worker per message.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout: float = 1.0,
        *,
        memory_limit_mb: int = 4096,
        chunk_size: int = 16,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.num_workers = workers
        self.timeout = float(timeout)
        self.memory_limit_bytes = int(memory_limit_mb) * (1 << 20)
        self.chunk_size = chunk_size
        self._workers: list[_Worker | None] = [None] * workers
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        self.timeouts = 0
        """Checks that hit the timeout (worker-side interrupt or kill)."""
        self.failures = 0
        """Checks that raised, or whose worker died."""
        self.restarts = 0
        """Workers killed or found dead and replaced."""

    def _spawn(self) -> _Worker:
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        soft = self.timeout * SOFT_TIMEOUT_FRACTION
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", "orz_fast.reward._worker", str(to_worker_r), str(from_worker_w), repr(soft)]
        cmd.append(str(self.memory_limit_bytes))
        try:
            process = subprocess.Popen(cmd, pass_fds=(to_worker_r, from_worker_w), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(to_worker_r)
            os.close(from_worker_w)
        return _Worker(
            process=process,
            conn=Connection(from_worker_r, writable=False),
            send_conn=Connection(to_worker_w, readable=False),
            deadline=time.monotonic() + STARTUP_TIMEOUT,
        )

    def start(self) -> None:
        """Start any missing workers and wait until all are ready."""
        with self._lock:
            self._ensure_started()
            pending = [w for w in self._workers if w is not None and not w.ready]
            while pending:
                ready = wait([w.conn for w in pending], timeout=STARTUP_TIMEOUT)
                if not ready:
                    raise RuntimeError(f"verifier workers did not start within {STARTUP_TIMEOUT} s")
                for w in pending:
                    if w.conn in ready:
                        self._receive_ready(w)
                pending = [w for w in pending if not w.ready]

    def _ensure_started(self) -> None:
        for i, w in enumerate(self._workers):
            if w is None:
                self._workers[i] = self._spawn()

    def _receive_ready(self, w: _Worker) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError) as e:
            raise RuntimeError(f"verifier worker exited during start-up (exit code {w.process.poll()})") from e
        if msg != "ready":
            raise RuntimeError(f"verifier worker sent {msg!r} instead of 'ready'")
        w.ready = True

    def _replace(self, index: int) -> None:
        w = self._workers[index]
        assert w is not None
        _kill(w)
        self.restarts += 1
        self._workers[index] = self._spawn()

    def run(self, tasks: Sequence[tuple[str, str, str]]) -> list[bool | None]:
        """Run ``(kind, a, b)`` checks (kinds: :data:`orz_fast.reward.symbolic.CHECKS`); one verdict each,
        None where the check timed out or failed."""
        results: list[bool | None] = [None] * len(tasks)
        if not tasks:
            return results
        with self._lock:
            self._ensure_started()
            queue = deque(range(len(tasks)))
            workers = self._workers
            while queue or any(w is not None and w.inflight for w in workers):
                now = time.monotonic()
                idle = [i for i, w in enumerate(workers) if w is not None and w.ready and not w.inflight]
                for i in idle:
                    if not queue:
                        break
                    w = workers[i]
                    share = max(1, min(self.chunk_size, -(-len(queue) // len(idle))))
                    chunk = [queue.popleft() for _ in range(min(share, len(queue)))]
                    try:
                        w.send_conn.send([(tid, *tasks[tid]) for tid in chunk])
                    except OSError:  # the worker died while idle: nothing of this chunk ran
                        queue.extendleft(reversed(chunk))
                        self._replace(i)
                        continue
                    w.inflight.extend(chunk)
                    w.deadline = now + self.timeout
                busy = [w for w in workers if w is not None and (w.inflight or not w.ready)]
                if not busy:
                    continue
                wait_for = max(0.0, min(w.deadline for w in busy) - time.monotonic())
                ready = set(wait([w.conn for w in busy], timeout=wait_for))
                now = time.monotonic()
                for i, w in enumerate(workers):
                    if w is None or w not in busy:
                        continue
                    if w.conn in ready:
                        if not self._drain(i, w, results, queue):
                            continue
                    if (w.inflight or not w.ready) and time.monotonic() > w.deadline:
                        self._fail_current(i, w, results, queue, timed_out=True)
        return results

    def _drain(self, index: int, w: _Worker, results: list, queue: deque) -> bool:
        """Read every message waiting on ``w``; False when the worker died (it has been replaced)."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg == "ready":
                    w.ready = True
                    continue
                task_id, verdict, timed_out = msg
                if w.inflight and w.inflight[0] == task_id:
                    w.inflight.popleft()
                results[task_id] = verdict
                self.timeouts += timed_out
                self.failures += verdict is None and not timed_out
                w.deadline = time.monotonic() + self.timeout
        except (EOFError, OSError):
            self._fail_current(index, w, results, queue, timed_out=False)
            return False
        return True

    def _fail_current(self, index: int, w: _Worker, results: list, queue: deque, *, timed_out: bool) -> None:
        """Kill and replace ``w``: its current check gets None, its other checks go back on the queue."""
        if not w.ready:
            _kill(w)
            self._workers[index] = None
            raise RuntimeError(
                f"verifier worker failed to start (exit code {w.process.returncode}); "
                f"check that {_WORKER_MODULE} imports in a fresh interpreter"
            )
        if w.inflight:
            results[w.inflight.popleft()] = None
            self.timeouts += timed_out
            self.failures += not timed_out
        queue.extendleft(reversed(w.inflight))
        w.inflight.clear()
        self._replace(index)

    def clear_worker_caches(self) -> None:
        """Make every live worker drop its cached parses (for cold-cache measurements)."""
        with self._lock:
            for w in self._workers:
                if w is not None:
                    try:
                        w.send_conn.send("clear")
                    except OSError:
                        pass  # a dead worker has no caches; run() replaces it

    def close(self) -> None:
        """Stop the workers (idempotent); the pool restarts them if used again."""
        with self._lock:
            _stop_workers(self._workers)

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def alive_pids(self) -> list[int]:
        """Process ids of the live workers (for tests and monitoring)."""
        return [w.process.pid for w in self._workers if w is not None and w.process.poll() is None]
