"""Blocking commands (``BLPOP``, ``BRPOP``, ``BLMOVE``, ``BZPOPMIN``, ``XREAD BLOCK``, ``WAIT``...).

A blocking command waits on one server for as long as *its own* timeout says
(0: forever), far beyond ``FAILOVER_OPERATION_TIMEOUT``, and must follow a
switch: a consumer blocked on the fallback after a failback would otherwise
wait there forever while producers push to the primary. So it runs as a series
of short *slices*: the same command with its timeout cut to a fraction of a
second (shorter than the delay after which a slow attempt makes its endpoint
suspect, so a quiet queue costs no probes), each slice an ordinary routed
command on the endpoint active at that moment, until one returns something or
the caller's timeout is spent. The reply is redis-py's, as if the command had
blocked once.

* Each slice is retried on the other endpoint after a connection failure, as
  redis-py itself retries them by default: a slice that was waiting has taken
  nothing. (Only a server dying between taking an element and sending it
  could lose that element, the same window any pop has.)
* ``XREAD ... STREAMS key $`` is resolved once, before the first slice, to the
  stream's last entry id, so entries added between two slices are not skipped.
* ``WAIT n`` / ``WAITAOF l n`` slices end when enough replicas acknowledged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

__all__ = ["BLOCKING_COMMANDS", "DEFAULT_SLICE", "blocking_wait", "run_blocking", "with_wait"]

DEFAULT_SLICE = 0.4
"""Longest slice, in seconds (also bounded by the store's suspect delay)."""

_LAST = {"BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BZPOPMIN", "BZPOPMAX"}  # timeout in seconds, last argument
_SECOND = {"BLMPOP", "BZMPOP"}  # timeout in seconds, first argument after the name
_BLOCK_OPTION = {"XREAD", "XREADGROUP"}  # BLOCK <ms>, absent: not blocking
_MS_AT = {"WAIT": 2, "WAITAOF": 3}  # timeout in milliseconds at this position

BLOCKING_COMMANDS: frozenset[str] = frozenset(
    name for names in (_LAST, _SECOND, _BLOCK_OPTION, _MS_AT) for upper in names for name in (upper, upper.lower())
)
"""Command names (as redis-py sends them, and lower-cased) that may block."""


def _name(args: Sequence[Any]) -> str:
    first = args[0]
    return (first.decode() if isinstance(first, bytes) else str(first)).upper()


def _block_index(args: Sequence[Any]) -> int | None:
    for i, arg in enumerate(args[1:-1], start=1):
        text = arg.decode() if isinstance(arg, bytes) else arg
        if isinstance(text, str) and text.upper() == "BLOCK":
            return i + 1
        if isinstance(text, str) and text.upper() == "STREAMS":
            return None
    return None


def blocking_wait(args: Sequence[Any]) -> float | None:
    """Seconds the command *args* may block (0: forever); None when it does not block."""
    name = _name(args)
    try:
        if name in _LAST:
            return float(args[-1])
        if name in _SECOND:
            return float(args[1])
        if name in _BLOCK_OPTION:
            index = _block_index(args)
            return None if index is None else float(args[index]) / 1000
        if name in _MS_AT:
            return float(args[_MS_AT[name]]) / 1000
    except (IndexError, TypeError, ValueError):
        return None
    return None


def with_wait(args: Sequence[Any], seconds: float) -> tuple[Any, ...]:
    """*args* with the command's timeout replaced by *seconds* (never 0, which means forever)."""
    name = _name(args)
    out = list(args)
    if name in _LAST or name in _SECOND:
        out[-1 if name in _LAST else 1] = f"{max(seconds, 0.01):.3f}"
    else:
        index = _block_index(args) if name in _BLOCK_OPTION else _MS_AT[name]
        assert index is not None
        out[index] = max(1, int(seconds * 1000))
    return tuple(out)


def _satisfied(name: str, args: Sequence[Any], reply: Any) -> bool:
    if name == "WAIT":
        return int(reply) >= int(args[1])
    if name == "WAITAOF":
        return int(reply[0]) >= int(args[1]) and int(reply[1]) >= int(args[2])
    return bool(reply)  # nil, [] and {} mean "nothing yet"


async def _resolve_dollar(redis: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """``XREAD ... STREAMS k1 k2 $ $``: each ``$`` becomes the stream's last id now ("0-0" if empty)."""
    words = [a.decode() if isinstance(a, bytes) else a for a in args]
    upper = [w.upper() if isinstance(w, str) else w for w in words]
    if "STREAMS" not in upper:
        return args
    start = upper.index("STREAMS") + 1
    count = (len(args) - start) // 2
    keys, ids = list(args[start : start + count]), list(args[start + count :])
    if not any(i == "$" for i in words[start + count :]):
        return args
    for n, key in enumerate(keys):
        if words[start + count + n] == "$":
            last, _ = await redis._execute(("XREVRANGE", key, "+", "-", "COUNT", 1), {}, idempotent=True)
            ids[n] = last[0][0] if last else "0-0"
    return (*args[:start], *keys, *ids)


async def run_blocking(redis: Any, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
    """Run the blocking command *args* through *redis* (a RedisStore) in routed slices."""
    wait = blocking_wait(args)
    if wait is None:
        result, _ = await redis._execute(args, options)
        return result
    name = _name(args)
    store = redis.failover
    slice_length = max(0.05, min(DEFAULT_SLICE, store._suspect_after * 0.8))
    deadline = None if wait <= 0 else time.monotonic() + wait
    if name == "XREAD":
        args = await _resolve_dollar(redis, args)
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        this = slice_length if remaining is None else max(0.0, min(slice_length, remaining))
        reply, _ = await redis._execute(
            with_wait(args, this), options, idempotent=True, timeout=this + store.options.operation_timeout
        )
        if _satisfied(name, args, reply):
            return reply
        if remaining is not None and remaining <= this:
            return reply
