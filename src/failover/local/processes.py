"""Signalling a server's whole process tree: the one place that sends SIGKILL, SIGSTOP and friends.

A server is more than its first process: PostgreSQL's backends and redis-server's
threads outlive a signal sent to the postmaster alone, and some run in sessions of
their own, so a signal goes to the process group *and* to every descendant found
under ``/proc/<pid>/task/<pid>/children``. A crash is simulated by freezing the
whole tree first (SIGSTOP) and only then killing it, so no process can notice the
others dying and say goodbye to its clients.

Linux only, like the rest of :mod:`failover.local`; ``psutil`` would bring other
systems, which the embedded servers do not support anyway.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["pid_alive", "process_tree", "signal_tree", "stopped", "wait_gone"]


def process_tree(pid: int) -> list[int]:
    """*pid* first, then every process below it (PostgreSQL backends run in sessions of their own)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        queue.extend(int(c) for c in children)
    return found


def _state(pid: int) -> str | None:
    """The one-letter state of *pid* in ``/proc/<pid>/stat`` (R, S, T, Z...), None when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether *pid* exists and is not a zombie (a zombie is dead for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = _state(pid)
    return state is not None and state != "Z"


def stopped(pid: int) -> bool:
    """Whether *pid* is stopped by a signal (SIGSTOP: a hung server)."""
    return _state(pid) == "T"


def signal_tree(pid: int, sig: signal.Signals, *, freeze: bool = False, pids: list[int] | None = None) -> list[int]:
    """Send *sig* to the process group led by *pid* and to every process of its tree.

    *freeze* sends SIGSTOP to all of them first (a crash gives no notice). *pids* is
    the tree when the caller already has it (a frozen tree no longer changes).
    Processes already gone are skipped. Returns the tree.
    """
    if freeze:
        signal_tree(pid, signal.SIGSTOP, pids=pids)
        # A frozen tree forks no more: this listing is complete.
    pids = pids if pids is not None else process_tree(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for each in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(each, sig)
    return pids


def wait_gone(
    pids: Iterable[int],
    timeout: float,
    *,
    reap: Callable[[], object] | None = None,
    also: Callable[[], bool] | None = None,
    interval: float = 0.02,
) -> bool:
    """Wait until every process of *pids* is gone (and ``also()`` is false); True when so.

    *reap* runs before each check: the parent of a process must collect it, or it
    lingers as a zombie (which :func:`pid_alive` already counts as dead).
    """
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        if reap is not None:
            reap()
        if not any(pid_alive(p) for p in pids) and not (also is not None and also()):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
