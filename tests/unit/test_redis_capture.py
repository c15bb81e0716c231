"""Which keys a Redis write command changes, and the pure parts of change capture."""

from __future__ import annotations

from typing import Any

import pytest

from failover.stores.redis.capture import Image, RedisCapture, CaptureRefused, _timestamp, digest
from failover.stores.redis.writes import WRITE_COMMANDS, blocking_timeout, write_keys


@pytest.mark.parametrize(
    ("args", "keys"),
    [
        # strings
        (("SET", "k", "v"), ["k"]),
        (("SET", "k", "v", "NX", "EX", 10), ["k"]),
        ((b"set", b"k", b"v"), [b"k"]),
        (("INCR", "n"), ["n"]),
        (("INCRBYFLOAT", "n", 1.5), ["n"]),
        (("APPEND", "k", "x"), ["k"]),
        (("GETDEL", "k"), ["k"]),
        (("GETEX", "k", "PERSIST"), ["k"]),
        (("MSET", "a", "1", "b", "2", "c", "3"), ["a", "b", "c"]),
        (("MSETNX", "a", "1", "b", "2"), ["a", "b"]),
        (("BITOP", "AND", "dest", "s1", "s2"), ["dest"]),
        (("SETBIT", "k", 7, 1), ["k"]),
        (("BITFIELD", "k", "INCRBY", "u8", 0, 1), ["k"]),
        # keys
        (("DEL", "a"), ["a"]),
        (("DEL", "a", "b", "c"), ["a", "b", "c"]),
        (("UNLINK", "a", "b"), ["a", "b"]),
        (("RENAME", "old", "new"), ["old", "new"]),
        (("RENAMENX", "old", "new"), ["old", "new"]),
        (("COPY", "src", "dst", "REPLACE"), ["dst"]),
        (("MOVE", "k", 1), ["k"]),
        (("EXPIRE", "k", 10), ["k"]),
        (("PEXPIREAT", "k", 10), ["k"]),
        (("PERSIST", "k"), ["k"]),
        (("SORT", "src"), []),
        (("SORT", "src", "BY", "w_*", "LIMIT", 0, 10, "GET", "#", "ALPHA", "STORE", "dst"), ["dst"]),
        (("SORT", "src", "GET", "STORE", "DESC"), []),  # a pattern that spells STORE is a pattern
        (("MIGRATE", "h", 6379, "k", 0, 100), ["k"]),
        (("MIGRATE", "h", 6379, "", 0, 100, "KEYS", "a", "b"), ["a", "b"]),
        (("MIGRATE", "h", 6379, "k", 0, 100, "COPY"), []),
        # hashes, lists, sets
        (("HSET", "h", "f", "v", "g", "w"), ["h"]),
        (("HINCRBY", "h", "f", 1), ["h"]),
        (("LPUSH", "l", "a", "b"), ["l"]),
        (("LMOVE", "src", "dst", "LEFT", "RIGHT"), ["src", "dst"]),
        (("RPOPLPUSH", "src", "dst"), ["src", "dst"]),
        (("BLMOVE", "src", "dst", "LEFT", "RIGHT", 5), ["src", "dst"]),
        (("BRPOPLPUSH", "src", "dst", 5), ["src", "dst"]),
        (("BLPOP", "a", "b", 5), ["a", "b"]),
        (("BRPOP", "a", 0), ["a"]),
        (("LMPOP", 2, "a", "b", "LEFT", "COUNT", 3), ["a", "b"]),
        (("BLMPOP", 1.5, 2, "a", "b", "LEFT"), ["a", "b"]),
        (("SADD", "s", "m"), ["s"]),
        (("SMOVE", "src", "dst", "m"), ["src", "dst"]),
        (("SINTERSTORE", "dst", "a", "b"), ["dst"]),
        (("SUNIONSTORE", "dst", "a", "b"), ["dst"]),
        (("SDIFFSTORE", "dst", "a"), ["dst"]),
        # sorted sets
        (("ZADD", "z", 1, "m"), ["z"]),
        (("ZUNIONSTORE", "dst", 2, "a", "b", "WEIGHTS", 1, 2), ["dst"]),
        (("ZINTERSTORE", "dst", 2, "a", "b"), ["dst"]),
        (("ZDIFFSTORE", "dst", 2, "a", "b"), ["dst"]),
        (("ZRANGESTORE", "dst", "src", 0, -1), ["dst"]),
        (("ZMPOP", 2, "a", "b", "MIN"), ["a", "b"]),
        (("BZPOPMIN", "a", "b", 1), ["a", "b"]),
        (("BZMPOP", 1, 1, "a", "MAX"), ["a"]),
        # geo, hyperloglog, streams
        (("GEOADD", "g", 13.36, 38.11, "Palermo"), ["g"]),
        (("GEORADIUS", "g", 15, 37, 200, "km", "WITHDIST"), []),
        (("GEORADIUS", "g", 15, 37, 200, "km", "STORE", "dst"), ["dst"]),
        (("GEORADIUSBYMEMBER", "g", "Palermo", 200, "km", "STOREDIST", "dst"), ["dst"]),
        (("GEOSEARCHSTORE", "dst", "src", "FROMMEMBER", "m", "BYRADIUS", 1, "km"), ["dst"]),
        (("PFADD", "hll", "a"), ["hll"]),
        (("PFMERGE", "dst", "a", "b"), ["dst"]),
        (("XADD", "st", "*", "f", "v"), ["st"]),
        (("XTRIM", "st", "MAXLEN", 10), ["st"]),
        (("XGROUP CREATE", "st", "g", "$"), ["st"]),  # redis-py sends the subcommand in the name
        (("XGROUP", "CREATE", "st", "g", "$"), ["st"]),
        (("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "STREAMS", "s1", "s2", ">", ">"), ["s1", "s2"]),
        (("XACK", "st", "g", "1-0"), ["st"]),
        # scripts
        (("EVAL", "return 1", 2, "a", "b", "arg"), ["a", "b"]),
        (("EVALSHA", "abc", 0, "arg"), []),
        (("FCALL", "fn", 1, "a", "arg"), ["a"]),
    ],
)
def test_write_keys(args: tuple[Any, ...], keys: list[Any]) -> None:
    assert write_keys(args) == keys


@pytest.mark.parametrize(
    "args",
    [("GET", "k"), ("MGET", "a", "b"), ("HGETALL", "h"), ("SCAN", 0), ("XREAD", "STREAMS", "s", "0"), ("PING",), ()],
)
def test_reads_write_nothing(args: tuple[Any, ...]) -> None:
    assert write_keys(args) is None


@pytest.mark.parametrize(
    ("args", "timeout"),
    [
        (("BLPOP", "a", "b", 5), 5.0),
        (("BRPOP", "a", 0), 0.0),
        (("BLMOVE", "s", "d", "LEFT", "RIGHT", 0.5), 0.5),
        (("BRPOPLPUSH", "s", "d", 2), 2.0),
        (("BLMPOP", 1.5, 1, "a", "LEFT"), 1.5),
        (("BZPOPMAX", "z", 3), 3.0),
        (("XREADGROUP", "GROUP", "g", "c", "BLOCK", 1500, "STREAMS", "s", ">"), 1.5),
        (("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">"), None),
        (("LPOP", "a"), None),
        (("GET", "a"), None),
    ],
)
def test_blocking_timeout(args: tuple[Any, ...], timeout: float | None) -> None:
    assert blocking_timeout(args) == timeout


def test_every_table_entry_finds_its_keys_without_raising() -> None:
    for name, spec in WRITE_COMMANDS.items():
        assert isinstance(spec.keys((name, "a", "b", "c", "d", "e", "f", "g")), list), name


@pytest.mark.parametrize("name", ["FLUSHDB", "FLUSHALL", "SWAPDB", "flushdb"])
def test_bulk_wipes_are_refused_on_the_fallback(name: str) -> None:
    with pytest.raises(CaptureRefused, match="FAILOVER_RECONCILE=false"):
        RedisCapture().write_keys((name,))


def test_unknown_commands_use_the_server_table() -> None:
    capture = RedisCapture()
    capture._server_commands = {"json.set": (True, 1, 1, 1, False), "json.get": (False, 1, 1, 1, False)}
    assert capture.write_keys(("JSON.SET", "doc", "$", "{}")) == ["doc"]
    assert capture.write_keys(("JSON.GET", "doc")) is None
    assert capture.write_keys(("NOPE", "x")) is None


def test_image_comparison() -> None:
    small = Image("hash", 2, "abc")
    assert small.same(Image("hash", 2, "abc"))
    assert not small.same(Image("hash", 2, "abd"))
    assert not small.same(Image("set", 2, "abc"))
    big = Image("hash", 5000, "-")
    assert big.same(Image("hash", 5000, "-")) and not big.exact
    assert not big.same(Image("hash", 5001, "-"))
    assert Image.parse(b"none|0|-|-1") == (Image("none", 0, "-"), -1)
    assert Image.parse(b"string|3|x|1700000000000") == (Image("string", 3, "x"), 1700000000000)
    assert Image.parse(b"?") == (None, -1)
    assert Image.parse(None) == (None, -1)


def test_digest_is_order_free_where_redis_is() -> None:
    assert digest("set", [b"a", b"b"]) == digest("set", [b"b", b"a"])
    assert digest("hash", [(b"f", b"1"), (b"g", b"2")]) == digest("hash", [(b"g", b"2"), (b"f", b"1")])
    assert digest("hash", [(b"f", b"1")]) != digest("hash", [(b"f", b"2")])
    assert digest("list", [b"a", b"b"]) != digest("list", [b"b", b"a"])
    assert digest("zset", [(b"m", b"1.5")]) == digest("zset", [(b"m", 1.5)])


def test_newest_wins_reads_updated_at_of_hashes_and_json_strings() -> None:
    assert _timestamp("hash", [(b"updated_at", b"1700000000")]) == 1700000000.0
    assert _timestamp("hash", [(b"modified_at", b"1700000000500")]) == 1700000000.5
    assert _timestamp("string", b'{"updated_at": "2023-11-14T22:13:20+00:00"}') == 1700000000.0
    assert _timestamp("string", b"plain") is None
    assert _timestamp("list", [b"x"]) is None
