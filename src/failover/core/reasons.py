"""Error descriptions a user reads: status ``last_error``, transition reasons, the dashboard.

They say what happened in words ("connection refused", "timed out connecting")
and never carry a Python class name: neither ours (``_NotSent``,
``CommandNotSent``: internal routing signals) nor, where a plain phrase says the
same, a driver's or the standard library's (``ConnectionRefusedError``). The
exception itself still reaches the log with its type, for whoever debugs.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable

from .._urls import redact_text

__all__ = ["describe_exception", "MAX_LENGTH"]

MAX_LENGTH = 300

# Exceptions whose message is empty or only an errno: what to say instead.
_PLAIN: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectionRefusedError, "connection refused"),
    (ConnectionResetError, "connection reset by the server"),
    (ConnectionAbortedError, "connection aborted"),
    (BrokenPipeError, "connection closed by the server"),
    (asyncio.IncompleteReadError, "connection closed by the server"),
    (EOFError, "connection closed by the server"),
    (TimeoutError, "timed out"),
    (asyncio.CancelledError, "cancelled"),
)

# "SomeError: " at the start of a message that wraps another exception's text.
_CLASS_PREFIX = re.compile(r"^_?[A-Z][A-Za-z0-9]*(?:Error|Exception|Failure|Timeout|Sent|Exhausted|Unknown|Unavailable): ")
_ERRNO = re.compile(r"\[Errno -?\d+\] ")
# redis-py: "Error 111 connecting to 127.0.0.1:6379. Connection refused."
_REDIS_CONNECT = re.compile(r"Error -?\d+ connecting to (\S+?)\.? ([^.()]+)\.?")
# PyMongo appends its whole topology (class reprs included) to selection errors.
_MONGO_TOPOLOGY = re.compile(r",? Topology Description: .*$")


def describe_exception(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """A one-line, password-free description of *exc* in plain words, at most :data:`MAX_LENGTH` long."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    previous = None
    while text != previous:
        previous = text
        text = _CLASS_PREFIX.sub("", text)
    text = _ERRNO.sub("", text)
    text = _REDIS_CONNECT.sub(lambda m: f"cannot connect to {m.group(1)}: {_lower_first(m.group(2))}", text)
    text = _MONGO_TOPOLOGY.sub("", text).strip()
    plain = next((words for kind, words in _PLAIN if isinstance(exc, kind)), None)
    if not text or (plain is not None and text.lower().rstrip(".") == plain):
        text = plain or _words(type(exc).__name__)
    elif isinstance(exc, OSError) and plain is not None and exc.errno is not None and text == (exc.strerror or "").strip():
        text = plain  # "[Errno 111] Connection refused" said plainly
    return redact_text(_lower_first(text), secrets)[:MAX_LENGTH]


def _words(class_name: str) -> str:
    """``OperationTimeout`` → "operation timeout": the last resort for an exception without a message."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", class_name.strip("_"))
    return spaced.lower() or "unknown error"


def _lower_first(text: str) -> str:
    # "Connection refused" → "connection refused", but "DNS lookup failed" stays.
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text
