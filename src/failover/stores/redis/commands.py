"""Which Redis commands may be sent twice: the table routing reads after a lost reply.

A connection failure after a command was sent leaves its outcome unknown. A
command that sets an absolute state (``SET k v``, ``HSET``, ``DEL``) or only reads
is sent again on the other endpoint; anything else (``INCR``, ``LPUSH``,
``EVAL``...) raises :class:`~failover.errors.OutcomeUnknown`. Which keys a write
changes is another table, :mod:`.writes` (change capture reads it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["IDEMPOTENT_COMMANDS", "command_name", "is_idempotent"]


#: Commands that may run twice without harm, so a connection failure after they
#: were sent is retried on the other endpoint. Reads, plus writes that set an
#: absolute state (``SET k v``, ``HSET``, ``SADD``, ``DEL``...). Anything absent
#: (``INCR``, ``LPUSH``, ``APPEND``, ``EVAL``...) is treated as non-idempotent.
IDEMPOTENT_COMMANDS: frozenset[str] = frozenset(
    {
        # keys and server
        "PING", "ECHO", "TIME", "INFO", "ROLE", "DBSIZE", "EXISTS", "TYPE", "TTL", "PTTL",
        "EXPIRETIME", "PEXPIRETIME", "KEYS", "SCAN", "RANDOMKEY", "OBJECT", "MEMORY USAGE", "TOUCH",
        "SORT_RO", "EVAL_RO", "EVALSHA_RO", "FCALL_RO", "LASTSAVE", "CONFIG GET", "CLIENT ID",
        # strings
        "GET", "MGET", "STRLEN", "GETRANGE", "SUBSTR", "GETBIT", "BITCOUNT", "BITPOS", "LCS",
        # hashes
        "HGET", "HGETALL", "HMGET", "HKEYS", "HVALS", "HLEN", "HEXISTS", "HSTRLEN", "HSCAN", "HRANDFIELD",
        # lists
        "LRANGE", "LLEN", "LINDEX", "LPOS",
        # sets
        "SMEMBERS", "SISMEMBER", "SMISMEMBER", "SCARD", "SRANDMEMBER", "SINTER", "SUNION", "SDIFF",
        "SINTERCARD", "SSCAN",
        # sorted sets
        "ZRANGE", "ZRANGEBYSCORE", "ZREVRANGE", "ZREVRANGEBYSCORE", "ZRANGEBYLEX", "ZREVRANGEBYLEX",
        "ZSCORE", "ZMSCORE", "ZRANK", "ZREVRANK", "ZCARD", "ZCOUNT", "ZLEXCOUNT", "ZSCAN",
        "ZRANDMEMBER", "ZUNION", "ZINTER", "ZDIFF", "ZINTERCARD",
        # streams, geo, hyperloglog
        "XRANGE", "XREVRANGE", "XLEN", "GEOPOS", "GEODIST", "GEOHASH", "GEOSEARCH", "GEORADIUS_RO",
        "GEORADIUSBYMEMBER_RO", "PFCOUNT",
        # writes that set an absolute state: applying them twice leaves the same data
        "MSET", "SETEX", "PSETEX", "HSET", "HMSET", "SADD", "SREM", "ZREM", "DEL", "UNLINK", "HDEL",
        "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST",
    }
)  # fmt: skip

# Options after which SET is no longer idempotent: it returns or depends on the previous value.
_SET_CONDITIONAL = frozenset({"NX", "XX", "GET"})
# ZADD flags that make it depend on the previous score.
_ZADD_CONDITIONAL = frozenset({"NX", "XX", "GT", "LT", "INCR"})


def is_idempotent(args: Sequence[Any]) -> bool:
    """Whether the command *args* may be sent twice (see :data:`IDEMPOTENT_COMMANDS`).

    ``SET key value`` is idempotent, with ``EX``/``PX``/``KEEPTTL`` too, but not
    with ``NX``, ``XX`` or ``GET``; ``ZADD`` only without ``NX/XX/GT/LT/INCR``.
    """
    if not args:
        return False
    name = command_name(args[0])
    if name == "SET":
        return not any(_upper(a) in _SET_CONDITIONAL for a in args[3:])
    if name == "ZADD":
        return not any(_upper(a) in _ZADD_CONDITIONAL for a in args[2:])
    return name in IDEMPOTENT_COMMANDS


def _upper(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode().upper()
        except UnicodeDecodeError:
            return None
    return value.upper() if isinstance(value, str) else None




def command_name(value: Any) -> str:
    """The upper-case name of a command from its first argument (``b"set"`` → ``"SET"``)."""
    return (_upper(value) or "").strip()
