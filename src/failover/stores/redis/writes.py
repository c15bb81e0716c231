"""Which Redis commands write, and which keys they write: the table change capture reads.

redis-py carries no static command metadata (its cluster client asks the server
with ``COMMAND``), so the write commands of its API are listed here, each with a
small function that finds the keys it may change in the command's arguments.
A key a command only *reads* (the sources of ``ZUNIONSTORE``, of ``COPY``) is
not listed: capture records what changes. Commands absent from the table fall
back to the fallback server's own ``COMMAND INFO`` (see
:meth:`~failover.stores.redis.capture.RedisCapture.write_keys`).

Blocking commands (``BLPOP``...) also say where their timeout is: on the
fallback they run inside ``MULTI``, where Redis answers at once, so the caller
polls them until their timeout (see :func:`blocking_timeout`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

__all__ = [
    "REFUSED_ON_FALLBACK",
    "WRITE_COMMANDS",
    "WriteSpec",
    "blocking_timeout",
    "command_words",
    "write_keys",
]

Args = Sequence[Any]
KeyFinder = Callable[[Args], list[Any]]


class WriteSpec(NamedTuple):
    """How to find the keys a write command changes, and its timeout if it blocks."""

    keys: KeyFinder
    timeout: Callable[[Args], float | None] | None = None
    """For blocking commands: seconds the command may wait (0: forever), read from its arguments."""


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("latin-1").upper()
    return str(value).upper()


def command_words(args: Args) -> list[Any]:
    """*args* with a multi-word command name split (redis-py sends ``"XGROUP CREATE"`` as one)."""
    if args and isinstance(args[0], (str, bytes)) and (" " in args[0] if isinstance(args[0], str) else b" " in args[0]):
        return [*args[0].split(), *args[1:]]
    return list(args)


# --- key finders ---------------------------------------------------------------------------


def _at(*positions: int) -> KeyFinder:
    def find(args: Args) -> list[Any]:
        return [args[p] for p in positions if p < len(args)]

    return find


def _from(start: int) -> KeyFinder:
    def find(args: Args) -> list[Any]:
        return list(args[start:])

    return find


def _pairs_from(start: int) -> KeyFinder:
    """``MSET k1 v1 k2 v2``: every other argument."""

    def find(args: Args) -> list[Any]:
        return list(args[start::2])

    return find


def _all_but_last(start: int) -> KeyFinder:
    """``BLPOP k1 k2 timeout``."""

    def find(args: Args) -> list[Any]:
        return list(args[start:-1])

    return find


def _numkeys(position: int) -> KeyFinder:
    """``EVAL script numkeys k1 k2 ...``, ``LMPOP numkeys k1 k2 ...``: *position* holds the count."""

    def find(args: Args) -> list[Any]:
        if position >= len(args):
            return []
        try:
            count = int(args[position])
        except (TypeError, ValueError):
            return []
        return list(args[position + 1 : position + 1 + count])

    return find


def _sort(args: Args) -> list[Any]:
    """``SORT key [BY p] [LIMIT o c] [GET p ...] [ASC|DESC] [ALPHA] [STORE dest]``: only STORE writes."""
    i = 2
    while i < len(args):
        word = _text(args[i])
        if word == "STORE" and i + 1 < len(args):
            return [args[i + 1]]
        i += 3 if word == "LIMIT" else 2 if word in ("BY", "GET") else 1
    return []


def _georadius(first_option: int) -> KeyFinder:
    """``GEORADIUS ... [STORE key] [STOREDIST key]``: the store keys; a plain query writes nothing."""

    def find(args: Args) -> list[Any]:
        out = []
        for i in range(first_option, len(args) - 1):
            if _text(args[i]) in ("STORE", "STOREDIST"):
                out.append(args[i + 1])
        return out

    return find


def _streams(args: Args) -> list[Any]:
    """``XREADGROUP GROUP g c [COUNT n] [BLOCK ms] [NOACK] STREAMS k1 k2 id1 id2``."""
    for i, arg in enumerate(args):
        if _text(arg) == "STREAMS":
            rest = list(args[i + 1 :])
            return rest[: len(rest) // 2]
    return []


def _migrate(args: Args) -> list[Any]:
    """``MIGRATE host port key|"" db timeout [COPY] [REPLACE] [AUTH ...] [KEYS k ...]``: moved keys leave."""
    words = [_text(a) for a in args]
    if "COPY" in words[6:]:
        return []
    if "KEYS" in words[6:]:
        return list(args[words.index("KEYS", 6) + 1 :])
    return [args[3]] if len(args) > 3 else []


def _subcommand_key(args: Args) -> list[Any]:
    """``XGROUP CREATE key ...``, ``XGROUP DESTROY key ...``: the key follows the subcommand."""
    if len(args) > 2 and _text(args[1]) not in ("HELP",):
        return [args[2]]
    return []


# --- blocking timeouts -------------------------------------------------------------------


def _seconds_at(position: int) -> Callable[[Args], float | None]:
    def timeout(args: Args) -> float | None:
        try:
            return float(args[position])
        except (IndexError, TypeError, ValueError):
            return None

    return timeout


def _block_option(args: Args) -> float | None:
    """``XREADGROUP ... BLOCK ms ...``: None when it does not block."""
    for i, arg in enumerate(args[:-1]):
        if _text(arg) == "BLOCK":
            try:
                return float(args[i + 1]) / 1000
            except (TypeError, ValueError):
                return None
    return None


_first = _at(1)

#: Write commands of redis-py's API (and Redis 7's), by name, with the keys they change.
WRITE_COMMANDS: dict[str, WriteSpec] = {
    # strings
    "SET": WriteSpec(_first), "SETNX": WriteSpec(_first), "SETEX": WriteSpec(_first),
    "PSETEX": WriteSpec(_first), "GETSET": WriteSpec(_first), "GETDEL": WriteSpec(_first),
    "GETEX": WriteSpec(_first), "APPEND": WriteSpec(_first), "SETRANGE": WriteSpec(_first),
    "SETBIT": WriteSpec(_first), "BITFIELD": WriteSpec(_first), "INCR": WriteSpec(_first),
    "DECR": WriteSpec(_first), "INCRBY": WriteSpec(_first), "DECRBY": WriteSpec(_first),
    "INCRBYFLOAT": WriteSpec(_first), "MSET": WriteSpec(_pairs_from(1)), "MSETNX": WriteSpec(_pairs_from(1)),
    "BITOP": WriteSpec(_at(2)),
    # keys
    "DEL": WriteSpec(_from(1)), "UNLINK": WriteSpec(_from(1)), "RENAME": WriteSpec(_at(1, 2)),
    "RENAMENX": WriteSpec(_at(1, 2)), "COPY": WriteSpec(_at(2)), "MOVE": WriteSpec(_first),
    "RESTORE": WriteSpec(_first), "MIGRATE": WriteSpec(_migrate), "EXPIRE": WriteSpec(_first),
    "PEXPIRE": WriteSpec(_first), "EXPIREAT": WriteSpec(_first), "PEXPIREAT": WriteSpec(_first),
    "PERSIST": WriteSpec(_first), "SORT": WriteSpec(_sort),
    # hashes (field TTLs of Redis 7.4+ are not copied)
    "HSET": WriteSpec(_first), "HSETNX": WriteSpec(_first), "HMSET": WriteSpec(_first),
    "HDEL": WriteSpec(_first), "HINCRBY": WriteSpec(_first), "HINCRBYFLOAT": WriteSpec(_first),
    "HEXPIRE": WriteSpec(_first), "HPEXPIRE": WriteSpec(_first), "HEXPIREAT": WriteSpec(_first),
    "HPEXPIREAT": WriteSpec(_first), "HPERSIST": WriteSpec(_first), "HGETDEL": WriteSpec(_first),
    "HGETEX": WriteSpec(_first), "HSETEX": WriteSpec(_first),
    # lists
    "LPUSH": WriteSpec(_first), "RPUSH": WriteSpec(_first), "LPUSHX": WriteSpec(_first),
    "RPUSHX": WriteSpec(_first), "LINSERT": WriteSpec(_first), "LSET": WriteSpec(_first),
    "LREM": WriteSpec(_first), "LTRIM": WriteSpec(_first), "LPOP": WriteSpec(_first),
    "RPOP": WriteSpec(_first), "RPOPLPUSH": WriteSpec(_at(1, 2)), "LMOVE": WriteSpec(_at(1, 2)),
    "LMPOP": WriteSpec(_numkeys(1)),
    "BLPOP": WriteSpec(_all_but_last(1), _seconds_at(-1)),
    "BRPOP": WriteSpec(_all_but_last(1), _seconds_at(-1)),
    "BRPOPLPUSH": WriteSpec(_at(1, 2), _seconds_at(3)),
    "BLMOVE": WriteSpec(_at(1, 2), _seconds_at(5)),
    "BLMPOP": WriteSpec(_numkeys(2), _seconds_at(1)),
    # sets
    "SADD": WriteSpec(_first), "SREM": WriteSpec(_first), "SPOP": WriteSpec(_first),
    "SMOVE": WriteSpec(_at(1, 2)), "SINTERSTORE": WriteSpec(_first), "SUNIONSTORE": WriteSpec(_first),
    "SDIFFSTORE": WriteSpec(_first),
    # sorted sets
    "ZADD": WriteSpec(_first), "ZINCRBY": WriteSpec(_first), "ZREM": WriteSpec(_first),
    "ZREMRANGEBYRANK": WriteSpec(_first), "ZREMRANGEBYSCORE": WriteSpec(_first),
    "ZREMRANGEBYLEX": WriteSpec(_first), "ZPOPMIN": WriteSpec(_first), "ZPOPMAX": WriteSpec(_first),
    "ZUNIONSTORE": WriteSpec(_first), "ZINTERSTORE": WriteSpec(_first), "ZDIFFSTORE": WriteSpec(_first),
    "ZRANGESTORE": WriteSpec(_first), "ZMPOP": WriteSpec(_numkeys(1)),
    "BZPOPMIN": WriteSpec(_all_but_last(1), _seconds_at(-1)),
    "BZPOPMAX": WriteSpec(_all_but_last(1), _seconds_at(-1)),
    "BZMPOP": WriteSpec(_numkeys(2), _seconds_at(1)),
    # geo and hyperloglog
    "GEOADD": WriteSpec(_first), "GEOSEARCHSTORE": WriteSpec(_first),
    "GEORADIUS": WriteSpec(_georadius(6)), "GEORADIUSBYMEMBER": WriteSpec(_georadius(5)),
    "PFADD": WriteSpec(_first), "PFMERGE": WriteSpec(_first),
    # streams (consumer groups are copied by name and last-delivered id, not their pending lists)
    "XADD": WriteSpec(_first), "XDEL": WriteSpec(_first), "XTRIM": WriteSpec(_first),
    "XSETID": WriteSpec(_first), "XACK": WriteSpec(_first), "XCLAIM": WriteSpec(_first),
    "XAUTOCLAIM": WriteSpec(_first), "XGROUP": WriteSpec(_subcommand_key),
    "XREADGROUP": WriteSpec(_streams, _block_option),
    # scripts and functions: the keys they declare
    "EVAL": WriteSpec(_numkeys(2)), "EVALSHA": WriteSpec(_numkeys(2)), "FCALL": WriteSpec(_numkeys(2)),
}  # fmt: skip

#: Commands that change keys in bulk without naming them: refused on the fallback while
#: capture is on (they would strand writes, or wipe the capture log itself).
REFUSED_ON_FALLBACK: frozenset[str] = frozenset({"FLUSHDB", "FLUSHALL", "SWAPDB"})


def write_keys(args: Args) -> list[Any] | None:
    """The keys the command *args* may change; None when it is not a known write command.

    An empty list is a write command that changes no key with these arguments
    (``SORT`` without ``STORE``, ``MIGRATE ... COPY``).
    """
    if not args:
        return None
    words = command_words(args)
    spec = WRITE_COMMANDS.get(_text(words[0]))
    if spec is None:
        return None
    return spec.keys(words)


def blocking_timeout(args: Args) -> float | None:
    """Seconds a blocking command may wait (0: forever); None for commands that do not block."""
    if not args:
        return None
    words = command_words(args)
    spec = WRITE_COMMANDS.get(_text(words[0]))
    if spec is None or spec.timeout is None:
        return None
    return spec.timeout(words)
