"""Redis change capture on the fallback and its copy into the primary.

* **Capture** — every write command the routed client sends to the *fallback*
  travels in one ``MULTI``/``EXEC`` with two small Lua scripts around it
  (:data:`MARK_SCRIPT` before, :data:`NOTE_SCRIPT` after): the changed keys
  (:mod:`~failover.stores.redis.writes` finds them) join the set
  ``failover:dirty``, their version in ``failover:ver`` goes up by one, the
  fallback's clock is noted in ``failover:at``, and at a key's *first* change
  since it was last reconciled its before-image goes to ``failover:before``.
  Pipelines and ``MULTI``/``EXEC`` pipelines get the same scripts inside their
  own transaction (a plain pipeline sent to the fallback becomes one
  ``MULTI``/``EXEC``). Commands sent to the primary are untouched. A crash of the
  application or of the fallback at any instant loses nothing: the key and its
  mark are one transaction.
* **Before-image** — ``type|size|digest|expiry``: a SHA-1 over the value's
  elements (order-free for sets, hashes and sorted sets), computed on the
  fallback by the script, for keys of up to :data:`DIGEST_LIMIT` elements (and
  strings up to 16 MB); larger keys record type and size only. On a cold (empty)
  fallback the before-image of every key is "absent".
* **Copy** — a batch takes up to N dirty keys, reads them on the fallback in one
  script call (an atomic snapshot of type, value, remaining TTL, version), reads
  the primary's version, and writes the fallback's final state into the primary
  with typed commands — ``DEL`` then ``SET``/``RPUSH``/``SADD``/``HSET``/``ZADD``/
  ``XADD`` (+ ``XGROUP CREATE``) then ``PEXPIRE`` — one ``MULTI``/``EXEC`` on the
  primary. A key the fallback no longer has is deleted on the primary. Keys of
  more than :data:`INLINE_LIMIT` elements (strings over 1 MB) are built in
  chunks of :data:`CHUNK` elements into a temporary key ``failover:tmp:...`` that
  then replaces the primary's in one ``MULTI``/``RENAME``/``PEXPIRE``/``EXEC``:
  never half-written, never a long block of either server. No ``DUMP``,
  ``RESTORE`` or ``REPLICAOF`` (Upstash has none).
* **Forgetting** — a key leaves ``failover:dirty`` only after its copy
  committed, and only if its version did not move meanwhile (a Lua
  compare-and-delete): a key written again during the copy is copied again.
* **Nothing stale** — a key whose fallback value equals its exact before-image
  (a write that changed nothing, such as ``SET k v NX`` on an existing key, or a
  command that failed) is forgotten without touching the primary.
* **Conflicts** — a key whose primary value differs both from the before-image
  and from the fallback's value was changed on the primary after we left it (on
  a cold fallback: any key the primary has). ``FAILOVER_CONFLICT_POLICY``
  decides; ``newest_wins`` compares the fallback's clock at the key's last
  capture with the primary value's ``updated_at``/``modified_at`` (a hash field,
  or a field of a JSON object stored as a string; epoch seconds or ISO 8601);
  Redis keeps no modification time, so other values have none and the fallback
  wins. Conflicts go to the capped list ``failover:conflicts`` on the fallback
  before the primary is touched.
* **Deletes** — ``DEL``/``UNLINK``/``GETDEL`` also put their keys in
  ``failover:deleted``: a key the application deleted during the outage is deleted
  on the primary even when the (cold) fallback never had it.
* **Lock** — ``SET failover:reconcile-lock <token> NX PX 30000`` on the
  fallback, renewed every 10 s while held, released by compare-and-delete: a
  SIGKILLed holder blocks the others for 30 s at most.

Keys under ``failover:`` belong to the library: never captured, never copied.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ...core.endpoint import Endpoint, Role
from ...core.reconcile import BatchResult, Capture, Conflict, ConflictPolicy, Resolution, change_time, resolve, summarize
from .writes import REFUSED_ON_FALLBACK, blocking_timeout, command_words, write_keys

__all__ = ["CaptureRefused", "Polled", "RedisCapture", "digest"]

logger = logging.getLogger("failover.redis.capture")

PREFIX = "failover:"
DIRTY = PREFIX + "dirty"
BEFORE = PREFIX + "before"
VERSION = PREFIX + "ver"
CHANGED_AT = PREFIX + "at"
TOMB = PREFIX + "deleted"
BIG = PREFIX + "big"
SIZE = PREFIX + "size"
CONFLICTS = PREFIX + "conflicts"
LOCK = PREFIX + "reconcile-lock"
TMP = PREFIX + "tmp:"

DIGEST_LIMIT = 1000
"""Keys of up to this many elements get an exact before-image; larger ones type and size only."""
INLINE_LIMIT = 1000
"""Keys of up to this many elements are copied in the batch's transaction; larger ones in chunks."""
STRING_INLINE_BYTES = 1 << 20
STRING_DIGEST_BYTES = 1 << 24
CHUNK = 2000
"""Elements read and written per command when a big key is copied."""
STRING_CHUNK_BYTES = 1 << 20
SNAPSHOT_BUDGET = 20000
"""Elements one snapshot script call may touch on the fallback (bounds how long it blocks it)."""
CONFLICT_LOG_SIZE = 1000
LOCK_TTL_MS = 30000
TMP_TTL_MS = 600000
"""A temporary key left by a copy that died expires after this long."""
EXPIRY_TOLERANCE_MS = 100
BIG_KEY_UNIT = 100
"""A big key weighs one backlog unit per this many elements, so that one too big to copy
within the write hold (more than ~50,000 elements at the default batch size) is copied
while traffic still runs on the fallback."""
BATCH_TIME_BUDGET = 5.0
"""Seconds one batch may spend on big keys; those left over stay in the backlog for the next one."""
BLOCKING_POLL_INTERVAL = 0.05
"""Seconds between two attempts of a blocking command (``BLPOP``...) served by the fallback."""

# --- Lua -----------------------------------------------------------------------------------

# The content image of a key: type, size and a digest ('-' when too big). Python mirrors it
# in digest(); both must stay identical.
_CONTENT_LUA = r"""
local function h(s) return redis.sha1hex(s) end
local function score(s)
  local n = tonumber(s)
  if n == nil then return s end
  return string.format('%.17g', n)
end
local function sized(k)
  local ty = redis.call('TYPE', k)['ok']
  if ty == 'none' then return ty, 0 end
  if ty == 'string' then return ty, redis.call('STRLEN', k) end
  if ty == 'list' then return ty, redis.call('LLEN', k) end
  if ty == 'set' then return ty, redis.call('SCARD', k) end
  if ty == 'hash' then return ty, redis.call('HLEN', k) end
  if ty == 'zset' then return ty, redis.call('ZCARD', k) end
  if ty == 'stream' then return ty, redis.call('XLEN', k) end
  return ty, 0
end
local function content(k, limit)
  local ty, size = sized(k)
  local digest = '-'
  if ty == 'string' then
    if size <= 16777216 then digest = h(redis.call('GET', k)) end
  elseif size <= limit then
    local parts = {}
    if ty == 'list' then
      for i, v in ipairs(redis.call('LRANGE', k, 0, -1)) do parts[i] = h(v) end
    elseif ty == 'set' then
      for i, v in ipairs(redis.call('SMEMBERS', k)) do parts[i] = h(v) end
      table.sort(parts)
    elseif ty == 'hash' then
      local flat = redis.call('HGETALL', k)
      for i = 1, #flat, 2 do parts[#parts + 1] = h(h(flat[i]) .. h(flat[i + 1])) end
      table.sort(parts)
    elseif ty == 'zset' then
      local flat = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
      for i = 1, #flat, 2 do parts[#parts + 1] = h(h(flat[i]) .. score(flat[i + 1])) end
      table.sort(parts)
    elseif ty == 'stream' then
      for i, entry in ipairs(redis.call('XRANGE', k, '-', '+')) do
        local fields = {}
        for j = 1, #entry[2] do fields[j] = h(entry[2][j]) end
        parts[i] = h(entry[1] .. ':' .. table.concat(fields))
      end
    end
    if ty == 'list' or ty == 'set' or ty == 'hash' or ty == 'zset' or ty == 'stream' then
      digest = h(table.concat(parts))
    end
  end
  return ty, size, digest
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

MARK_SCRIPT = _CONTENT_LUA + r"""
-- KEYS: dirty, before, ver, at, deleted, key...
-- ARGV: digest limit, '1' when the before-image is unknown, keys an explicit DEL targets...
local limit = tonumber(ARGV[1])
local unknown = ARGV[2] == '1'
local now = now_ms()
local marked = 0
for i = 3, #ARGV do
  if string.sub(ARGV[i], 1, 9) ~= 'failover:' then redis.call('SADD', KEYS[5], ARGV[i]) end
end
for i = 6, #KEYS do
  local k = KEYS[i]
  if string.sub(k, 1, 9) ~= 'failover:' then
    if redis.call('SADD', KEYS[1], k) == 1 then
      local before = '?'
      if not unknown then
        local ty, size, digest = content(k, limit)
        local exp = -1
        if ty ~= 'none' then
          local pttl = redis.call('PTTL', k)
          if pttl >= 0 then exp = now + pttl end
        end
        before = ty .. '|' .. size .. '|' .. digest .. '|' .. exp
      end
      redis.call('HSET', KEYS[2], k, before)
    end
    redis.call('HINCRBY', KEYS[3], k, 1)
    redis.call('HSET', KEYS[4], k, now)
    marked = marked + 1
  end
end
return marked
"""

NOTE_SCRIPT = _CONTENT_LUA + r"""
-- After the command: remember keys that grew big, so the backlog weighs them.
-- KEYS: big, size, key...   ARGV: inline limit
local limit = tonumber(ARGV[1])
for i = 3, #KEYS do
  local k = KEYS[i]
  if string.sub(k, 1, 9) ~= 'failover:' then
    local ty, size = sized(k)
    if ty ~= 'string' and size > limit then
      redis.call('SADD', KEYS[1], k)
      redis.call('HSET', KEYS[2], k, size)
    end
  end
end
return 1
"""

SNAPSHOT_SCRIPT = _CONTENT_LUA + r"""
-- KEYS: ver, before, at, deleted   ARGV: digest limit, inline limit, string inline bytes, budget, key...
-- Per key: 'type|size|pttl|digest|deleted|at|ver|before', value|false, groups|false; stops when the
-- budget of elements is spent (the caller asks again for the rest). Element 1 is the server time.
local limit = tonumber(ARGV[1])
local inline = tonumber(ARGV[2])
local inline_bytes = tonumber(ARGV[3])
local budget = tonumber(ARGV[4])
local out = {now_ms()}
for i = 5, #ARGV do
  if budget <= 0 and #out > 1 then break end
  local k = ARGV[i]
  local ty, size, digest = content(k, limit)
  local pttl = -2
  local value = false
  local groups = false
  local cost = 1
  if ty ~= 'none' then
    pttl = redis.call('PTTL', k)
    if ty == 'string' then
      cost = 1 + math.floor(size / 4096)
      if size <= inline_bytes then value = redis.call('GET', k) end
    else
      if size <= limit then cost = cost + size end
      if size <= inline then
        cost = cost + size
        if ty == 'list' then value = redis.call('LRANGE', k, 0, -1)
        elseif ty == 'set' then value = redis.call('SMEMBERS', k)
        elseif ty == 'hash' then value = redis.call('HGETALL', k)
        elseif ty == 'zset' then value = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
        elseif ty == 'stream' then value = redis.call('XRANGE', k, '-', '+') end
      end
      if ty == 'stream' then
        groups = {}
        for _, g in ipairs(redis.call('XINFO', 'GROUPS', k)) do
          local name, last
          for j = 1, #g, 2 do
            if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then last = g[j + 1] end
          end
          groups[#groups + 1] = name
          groups[#groups + 1] = last
        end
      end
    end
  end
  budget = budget - cost
  -- Three entries per key, the metadata packed in one string (fewer replies to parse).
  out[#out + 1] = table.concat({ty, size, pttl, digest, redis.call('SISMEMBER', KEYS[4], k),
                                redis.call('HGET', KEYS[3], k) or '', redis.call('HGET', KEYS[1], k) or '',
                                redis.call('HGET', KEYS[2], k) or ''}, '|')
  out[#out + 1] = value
  out[#out + 1] = groups
end
return out
"""

FORGET_SCRIPT = r"""
-- KEYS: dirty, before, ver, at, big, size, deleted   ARGV: key, version, key, version...
local n = 0
for i = 1, #ARGV, 2 do
  local k = ARGV[i]
  if redis.call('HGET', KEYS[3], k) == ARGV[i + 1] then
    redis.call('SREM', KEYS[1], k)
    redis.call('HDEL', KEYS[2], k)
    redis.call('HDEL', KEYS[3], k)
    redis.call('HDEL', KEYS[4], k)
    redis.call('SREM', KEYS[5], k)
    redis.call('HDEL', KEYS[6], k)
    redis.call('SREM', KEYS[7], k)
    n = n + 1
  end
end
return n
"""

BACKLOG_SCRIPT = r"""
-- KEYS: dirty, big, size   ARGV: elements per unit. Dirty keys, a big one weighing one per unit.
local n = redis.call('SCARD', KEYS[1])
local unit = tonumber(ARGV[1])
for _, k in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('SISMEMBER', KEYS[1], k) == 1 then
    local size = tonumber(redis.call('HGET', KEYS[3], k) or '0')
    n = n + math.floor(size / unit)
  else
    redis.call('SREM', KEYS[2], k)
    redis.call('HDEL', KEYS[3], k)
  end
end
return n
"""

RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class CaptureRefused(ResponseError):
    """A command that change capture cannot record was sent to the fallback."""


@dataclass(slots=True)
class Polled:
    """A blocking command answered at once by the fallback (inside ``MULTI``) with nothing yet."""

    reply: Any
    timeout: float


# --- images --------------------------------------------------------------------------------


def _h(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _score(value: Any) -> str:
    try:
        return "%.17g" % float(value)
    except (TypeError, ValueError):
        return value.decode() if isinstance(value, bytes) else str(value)


def digest(kind: str, value: Any) -> str:
    """The digest of a value as the capture script computes it (see ``_CONTENT_LUA``).

    *value*: bytes (string), a list of bytes (list, set), ``(field, value)`` pairs
    (hash), ``(member, score)`` pairs (zset), ``(id, [field, value, ...])`` entries (stream).
    """
    if kind == "string":
        return _h(value)
    if kind == "list":
        parts = [_h(v) for v in value]
    elif kind == "set":
        parts = sorted(_h(v) for v in value)
    elif kind == "hash":
        parts = sorted(_h((_h(f) + _h(v)).encode()) for f, v in value)
    elif kind == "zset":
        parts = sorted(_h((_h(m) + _score(s)).encode()) for m, s in value)
    elif kind == "stream":
        parts = [_h(bytes(entry_id) + b":" + "".join(_h(x) for x in fields).encode()) for entry_id, fields in value]
    else:
        return "-"
    return _h("".join(parts).encode())


@dataclass(frozen=True, slots=True)
class Image:
    """What is known of a key's content: type, size, digest ('-' when the key was too big)."""

    kind: str
    size: int
    digest: str

    @classmethod
    def parse(cls, text: bytes | str | None) -> tuple[Image | None, int]:
        """A recorded before-image and its absolute expiry in ms (-1: none); None when unknown."""
        if text is None:
            return None, -1
        if isinstance(text, bytes):
            text = text.decode()
        parts = text.split("|")
        if len(parts) != 4:
            return None, -1
        return cls(parts[0], int(float(parts[1])), parts[2]), int(float(parts[3]))

    @property
    def exact(self) -> bool:
        return self.kind == "none" or self.digest != "-"

    def same(self, other: Image) -> bool:
        """Same content as far as both images tell (a big key compares by type and size)."""
        if self.kind != other.kind:
            return False
        if self.kind == "none":
            return True
        if self.size != other.size:
            return False
        return self.digest == "-" or other.digest == "-" or self.digest == other.digest


ABSENT = Image("none", 0, "-")


@dataclass(slots=True)
class Snapshot:
    """One dirty key as the fallback has it, read atomically by the snapshot script."""

    key: bytes
    kind: str
    size: int
    pttl: int
    version: bytes | None
    before: Image | None
    before_expiry: int
    changed_at: float | None
    image: Image
    value: Any
    groups: list[tuple[bytes, bytes]] = field(default_factory=list)
    deleted: bool = False
    """An explicit DEL/UNLINK/GETDEL targeted the key (it must go on the primary even if the
    fallback never had it)."""

    @property
    def absent(self) -> bool:
        return self.kind == "none"

    @property
    def inline(self) -> bool:
        return self.absent or self.value is not None


def _pairs(flat: Sequence[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[0::2], flat[1::2]))


def _typed_value(kind: str, raw: Any) -> Any:
    """The snapshot script's raw value in the shapes :func:`digest` takes."""
    if raw is None:
        return None
    if kind in ("hash", "zset"):
        return _pairs(raw)
    if kind == "stream":
        return [(entry[0], list(entry[1])) for entry in raw]
    return raw


def _text(key: bytes) -> str:
    return key.decode("utf-8", "replace")


def _summary(kind: str, size: int, value: Any) -> Any:
    if kind == "none":
        return None
    if value is None:
        return f"<{kind} of {size} elements>"
    if kind == "string":
        return summarize(value)
    if kind == "hash":
        return summarize({_text(f): v for f, v in value})
    if kind == "zset":
        return summarize({_text(m): float(s) for m, s in value})
    if kind == "stream":
        return summarize([_text(i) for i, _ in value])
    return summarize(value)


def _timestamp(kind: str, value: Any) -> float | None:
    """The primary version's own change time, for newest_wins: a field of a hash or of a JSON string."""
    fields: dict[str, Any] | None = None
    if kind == "hash" and value is not None:
        fields = {_text(f): v for f, v in value}
    elif kind == "string" and value is not None and value[:1] == b"{":
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        fields = parsed if isinstance(parsed, dict) else None
    return change_time(fields)


@dataclass(slots=True)
class _PrimaryView:
    kind: str = "none"
    size: int = 0
    value: Any = None

    @property
    def image(self) -> Image:
        if self.kind == "none":
            return ABSENT
        if self.value is None:
            return Image(self.kind, self.size, "-")
        return Image(self.kind, self.size, digest(self.kind, self.value))


_SIZE_COMMANDS = {"string": "STRLEN", "list": "LLEN", "set": "SCARD", "hash": "HLEN", "zset": "ZCARD", "stream": "XLEN"}


def _flatten(pairs: Sequence[tuple[Any, Any]]) -> list[Any]:
    out: list[Any] = []
    for a, b in pairs:
        out.append(a)
        out.append(b)
    return out


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)] or [items]


# --- the capture -----------------------------------------------------------------------------


class RedisCapture(Capture):
    """Capture on a Redis fallback and the copy into the primary (see the module docstring).

    Args:
        connect_timeout: seconds to open a connection of its own.
        socket_timeout: seconds one reply may take (None: no timer per reply; every call the
            reconciler makes is bounded by its step timeout, the lock's by the lease).
    """

    store = "redis"

    def __init__(
        self, *, connect_timeout: float = 2.0, socket_timeout: float | None = None, lock_ttl_ms: int = LOCK_TTL_MS
    ) -> None:
        if connect_timeout <= 0 or (socket_timeout is not None and socket_timeout <= 0):
            raise ValueError("connect_timeout and socket_timeout must be greater than 0")
        if lock_ttl_ms < 1000:
            raise ValueError("lock_ttl_ms must be at least 1000")
        self.connect_timeout = connect_timeout
        self.socket_timeout = socket_timeout
        self.lock_ttl_ms = lock_ttl_ms
        self._clients: dict[Role, Redis] = {}
        self._server_commands: dict[str, tuple[bool, int, int, int, bool]] | None = None
        self._scripting_checked = False
        self._lock_lost = False

    # --- connections --------------------------------------------------------------------------

    def _client(self, endpoint: Endpoint) -> Redis:
        """A client of its own for *endpoint* (never the routed pool), replies as bytes."""
        client = self._clients.get(endpoint.role)
        if client is None:
            pool = ConnectionPool.from_url(
                endpoint.url,
                max_connections=4,
                socket_connect_timeout=self.connect_timeout,
                socket_timeout=self.socket_timeout,
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
            )
            # Whatever the URL says, reconcile works on bytes.
            pool.connection_kwargs["decode_responses"] = False
            client = Redis(connection_pool=pool)
            self._clients[endpoint.role] = client
        return client

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    # --- which keys a command writes ------------------------------------------------------------

    def write_keys(self, args: Sequence[Any]) -> list[Any] | None:
        """The keys *args* may change on the fallback; None for a command that writes nothing.

        Raises :class:`CaptureRefused` for commands that cannot be captured.
        """
        keys = write_keys(args)
        if keys is not None:
            return keys
        words = command_words(args)
        name = str(words[0].decode() if isinstance(words[0], bytes) else words[0]).upper() if words else ""
        if name in REFUSED_ON_FALLBACK:
            raise CaptureRefused(
                f"{name} is refused on the Redis fallback while change capture is on: the keys it changes "
                "could not be copied to the primary at failback (set FAILOVER_RECONCILE=false to allow it)"
            )
        info = (self._server_commands or {}).get(name.lower())
        if info is None or not info[0]:
            return None
        _write, first, last, step, _movable = info
        if first <= 0:
            return []
        end = len(words) + last if last < 0 else last
        return list(words[first : end + 1 : max(1, step)])

    async def _load_command_table(self, client: Redis) -> None:
        """The fallback's own ``COMMAND`` table, for write commands the static table lacks."""
        table: dict[str, tuple[bool, int, int, int, bool]] = {}
        reply = await client.execute_command("COMMAND")
        for entry in reply.values() if isinstance(reply, dict) else reply:
            if isinstance(entry, dict):  # redis-py parses COMMAND into dicts
                name = str(entry.get("name", "")).lower()
                flags = {str(f) for f in entry.get("flags", [])}
                table[name] = (
                    "write" in flags,
                    int(entry.get("first_key_pos", 0)),
                    int(entry.get("last_key_pos", 0)),
                    int(entry.get("step_count", 0)),
                    "movablekeys" in flags,
                )
        self._server_commands = table

    # --- the routed path on the fallback ----------------------------------------------------------

    def _mark(
        self, keys: Sequence[Any], unknown: bool = False, deleted: Sequence[Any] = ()
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (
            (
                "EVAL", MARK_SCRIPT, 5 + len(keys), DIRTY, BEFORE, VERSION, CHANGED_AT, TOMB, *keys,
                DIGEST_LIMIT, "1" if unknown else "0", *deleted,
            ),
            {},
        )  # fmt: skip

    def _note(self, keys: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (("EVAL", NOTE_SCRIPT, 2 + len(keys), BIG, SIZE, *keys, INLINE_LIMIT), {})

    async def execute(self, backend: Any, endpoint: Endpoint, args: tuple[Any, ...], options: dict[str, Any]) -> Any:
        """Run one command on the fallback, marking the keys it writes in the same transaction."""
        keys = self.write_keys(args)
        if not keys:
            return await backend.execute(endpoint, args, dict(options))
        stack = [self._mark(keys, deleted=_deleted(args)), (args, dict(options)), self._note(keys)]
        replies = await backend.execute_pipeline(endpoint, stack, True, False)
        await self._check_mark(backend, endpoint, replies[0], keys)
        reply = replies[1]
        if isinstance(reply, Exception):
            raise reply
        timeout = blocking_timeout(args)
        if timeout is not None and (reply is None or reply == [] or reply == {}):
            return Polled(reply, timeout)
        return reply

    async def execute_pipeline(
        self, backend: Any, endpoint: Endpoint, stack: list[tuple[tuple[Any, ...], dict[str, Any]]], transaction: bool, raise_on_error: bool
    ) -> list[Any]:
        """Run a pipeline on the fallback as one ``MULTI``/``EXEC`` that also marks every key it writes."""
        keys = self._pipeline_keys(stack)
        if not keys:
            return await backend.execute_pipeline(endpoint, stack, transaction, raise_on_error)
        wrapped = [self._mark(keys, deleted=_stack_deleted(stack)), *stack, self._note(keys)]
        replies = await backend.execute_pipeline(endpoint, wrapped, True, False)
        await self._check_mark(backend, endpoint, replies[0], keys)
        return _replies(replies[1:-1], stack, raise_on_error)

    async def execute_bound(
        self, pipe: Pipeline, stack: list[tuple[tuple[Any, ...], dict[str, Any]]], raise_on_error: bool
    ) -> list[Any]:
        """Run a watched pipeline's transaction with the marks inside it."""
        keys = self._pipeline_keys(stack)
        if not keys:
            pipe.command_stack = stack  # type: ignore[assignment]  # redis-py 8 types the stack with str|bytes args (list invariance): same tuples
            return await pipe.execute(raise_on_error=raise_on_error)
        pipe.command_stack = [self._mark(keys, deleted=_stack_deleted(stack)), *stack, self._note(keys)]
        replies = await pipe.execute(raise_on_error=False)
        if isinstance(replies[0], Exception):
            logger.error("redis: marking keys on the fallback failed: %s", replies[0])
            await pipe.immediate_execute_command(*self._mark(keys, unknown=True)[0])
        return _replies(replies[1:-1], stack, raise_on_error)

    async def mark_before(self, pipe: Pipeline, args: tuple[Any, ...]) -> None:
        """Mark the keys of a write sent outside a transaction on a watched connection (before it)."""
        keys = self.write_keys(args)
        if keys:
            await pipe.immediate_execute_command(*self._mark(keys, deleted=_deleted(args))[0])

    def _pipeline_keys(self, stack: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        keys: list[Any] = []
        for args, _options in stack:
            found = self.write_keys(args)
            if found:
                keys.extend(found)
        return keys

    async def _check_mark(self, backend: Any, endpoint: Endpoint, reply: Any, keys: Sequence[Any]) -> None:
        if not isinstance(reply, Exception):
            return
        # The write went through but its mark did not (should never happen: out of memory?).
        # Mark again, with an unknown before-image so the key is copied, never skipped.
        logger.error("redis: marking %d key(s) on %s failed: %s; marking them again", len(keys), endpoint.name, reply)
        await backend.execute(endpoint, self._mark(keys, unknown=True)[0], {})

    # --- install, backlog -------------------------------------------------------------------------

    async def install(self, fallback: Endpoint, primary: Endpoint | None) -> None:
        """Nothing to install on the server: check it runs Lua, and read its command table once."""
        client = self._client(fallback)
        if not self._scripting_checked:
            try:
                await client.eval("return 1", 0)
            except ResponseError as exc:
                raise RuntimeError(
                    f"change capture needs Lua scripting on the Redis fallback {fallback.name} ({exc}); "
                    "set FAILOVER_RECONCILE=false to run without it"
                ) from exc
            self._scripting_checked = True
        if self._server_commands is None:
            try:
                await self._load_command_table(client)
            except ResponseError:
                self._server_commands = {}

    async def backlog(self, fallback: Endpoint) -> int:
        """Dirty keys; a big key weighs one more per :data:`BIG_KEY_UNIT` elements, so the
        reconciler copies it before its final write hold rather than inside it."""
        return int(await self._client(fallback).eval(BACKLOG_SCRIPT, 3, DIRTY, BIG, SIZE, BIG_KEY_UNIT))

    # --- copy ----------------------------------------------------------------------------------

    async def apply_batch(
        self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int
    ) -> BatchResult:
        if self._lock_lost:
            raise RuntimeError("the reconcile lock on the fallback was lost")
        result = BatchResult()
        fconn, pconn = self._client(fallback), self._client(primary)
        # With a count SRANDMEMBER replies with a list; this client's replies are bytes (see _client()).
        keys = cast("list[bytes]", await fconn.srandmember(DIRTY, limit))
        if not keys:
            result.remaining = 0
            return result
        snapshots, fallback_now = await self._snapshot(fconn, [bytes(k) for k in keys])
        read_at = time.monotonic()
        views = await self._primary_views(pconn, snapshots)
        now = time.time()
        conflicts: list[Conflict] = []
        copies: list[Snapshot] = []
        done: list[Snapshot] = []
        for snap in snapshots:
            view = views[snap.key]
            if snap.deleted and snap.absent:
                pass  # an explicit delete: the primary's copy goes too, even if the fallback never had it
            elif snap.before is not None and snap.before.exact and snap.image.exact and snap.image.same(snap.before):
                expiry = fallback_now + snap.pttl if snap.pttl >= 0 else -1
                if (expiry < 0) == (snap.before_expiry < 0) and abs(expiry - snap.before_expiry) <= EXPIRY_TOLERANCE_MS:
                    done.append(snap)  # the fallback did not change it: nothing to copy, nothing stale
                    continue
            theirs = view.image
            if snap.before is not None and not theirs.same(snap.before) and not theirs.same(snap.image):
                resolution, why = resolve(policy, snap.changed_at, _timestamp(view.kind, view.value))
                conflicts.append(
                    Conflict(
                        store=self.store,
                        key=_text(snap.key),
                        resolution=resolution,
                        at=now,
                        primary=_summary(view.kind, view.size, view.value),
                        fallback=_summary(snap.kind, snap.size, snap.value),
                        detail=why,
                    )
                )
                if resolution is Resolution.PRIMARY_KEPT:
                    done.append(snap)
                    continue
            copies.append(snap)

        if conflicts:
            await self._record_conflicts(fconn, conflicts)

        inline = [s for s in copies if s.inline]
        big = [s for s in copies if not s.inline]
        await self._copy_inline(pconn, inline, read_at)
        done.extend(inline)
        started = time.monotonic()
        for snap in big:
            if time.monotonic() - started > BATCH_TIME_BUDGET:
                break  # left in the backlog for the next batch
            if await self._copy_big(fconn, pconn, snap, read_at):
                done.append(snap)

        if done:
            args: list[Any] = []
            for snap in done:
                if snap.version is not None:
                    args += [snap.key, snap.version]
            if args:
                result.applied = int(
                    await fconn.eval(FORGET_SCRIPT, 7, DIRTY, BEFORE, VERSION, CHANGED_AT, BIG, SIZE, TOMB, *args)
                )
        result.conflicts = conflicts
        result.remaining = int(await fconn.scard(DIRTY))
        return result

    async def _snapshot(self, conn: Redis, keys: list[bytes]) -> tuple[list[Snapshot], int]:
        """Read *keys* on the fallback, a few script calls each bounded by SNAPSHOT_BUDGET."""
        out: list[Snapshot] = []
        now = 0
        pending = keys
        while pending:
            reply = await conn.eval(
                SNAPSHOT_SCRIPT, 4, VERSION, BEFORE, CHANGED_AT, TOMB,
                DIGEST_LIMIT, INLINE_LIMIT, STRING_INLINE_BYTES, SNAPSHOT_BUDGET, *pending,
            )  # fmt: skip
            now = int(reply[0])
            done = (len(reply) - 1) // 3
            for i, key in enumerate(pending[:done]):
                meta, raw_value, raw_groups = reply[1 + 3 * i : 4 + 3 * i]
                kind, size_text, pttl, digest_text, deleted, at, version, before_text = meta.decode().split("|", 7)
                size = int(float(size_text))
                before, before_expiry = Image.parse(before_text or None)
                out.append(
                    Snapshot(
                        key=key,
                        kind=kind,
                        size=size,
                        pttl=int(float(pttl)),
                        version=version.encode() if version else None,
                        before=before,
                        before_expiry=before_expiry,
                        changed_at=int(float(at)) / 1000 if at else None,
                        image=Image(kind, size, digest_text),
                        value=_typed_value(kind, raw_value) if kind != "string" else raw_value,
                        groups=_pairs(raw_groups) if raw_groups else [],
                        deleted=deleted == "1",
                    )
                )
            pending = pending[done:]
        return out, now

    async def _primary_views(self, conn: Redis, snapshots: list[Snapshot]) -> dict[bytes, _PrimaryView]:
        """Type, size and (for keys of up to DIGEST_LIMIT elements) value of each key on the primary.

        A key that is a string on the fallback is read with one ``GET`` (nil: absent; an error:
        another type); other keys take ``TYPE``, then their size, then their value.
        """
        views = {s.key: _PrimaryView() for s in snapshots}
        guessed = {
            s.key for s in snapshots
            if (s.kind == "string" or (s.absent and s.before is not None and s.before.kind == "string"))
            and s.size <= STRING_DIGEST_BYTES
        }  # fmt: skip
        async with conn.pipeline(transaction=False) as pipe:
            for key in views:
                if key in guessed:
                    pipe.get(key)
                else:
                    pipe.type(key)
            replies = await pipe.execute(raise_on_error=False)
        typed = []
        for (key, view), reply in zip(views.items(), replies):
            if key not in guessed:
                view.kind = reply.decode() if isinstance(reply, bytes) else str(reply)
            elif isinstance(reply, bytes):
                view.kind, view.value, view.size = "string", reply, len(reply)
            elif reply is None:
                view.kind = "none"
            else:
                typed.append(key)  # WRONGTYPE: not a string on the primary
        if typed:
            async with conn.pipeline(transaction=False) as pipe:
                for key in typed:
                    pipe.type(key)
                for key, reply in zip(typed, await pipe.execute()):
                    views[key].kind = reply.decode() if isinstance(reply, bytes) else str(reply)
        sized = [key for key, view in views.items() if view.kind in _SIZE_COMMANDS and view.value is None]
        if not sized:
            return views
        async with conn.pipeline(transaction=False) as pipe:
            for key in sized:
                pipe.execute_command(_SIZE_COMMANDS[views[key].kind], key)
            sizes = await pipe.execute(raise_on_error=False)
        readable = []
        async with conn.pipeline(transaction=False) as pipe:
            for key, size in zip(sized, sizes):
                view = views[key]
                if isinstance(size, Exception):  # it changed type meanwhile: compare by type only
                    continue
                view.size = int(size)
                if view.kind == "string":
                    if view.size > STRING_DIGEST_BYTES:
                        continue
                    pipe.execute_command("GET", key)
                elif view.size > DIGEST_LIMIT:
                    continue
                elif view.kind == "list":
                    pipe.execute_command("LRANGE", key, 0, -1)
                elif view.kind == "set":
                    pipe.execute_command("SMEMBERS", key)
                elif view.kind == "hash":
                    pipe.execute_command("HGETALL", key)
                elif view.kind == "zset":
                    pipe.execute_command("ZRANGE", key, 0, -1, "WITHSCORES")
                elif view.kind == "stream":
                    pipe.execute_command("XRANGE", key, "-", "+")
                else:
                    continue
                readable.append(key)
            values = await pipe.execute(raise_on_error=False) if readable else []
        for key, value in zip(readable, values):
            if not isinstance(value, Exception):
                views[key].value = _primary_value(views[key].kind, value)
        return views

    async def _copy_inline(self, conn: Redis, snapshots: list[Snapshot], read_at: float) -> None:
        """Write the final state of small keys.

        A string (``SET k v [PX ms]``) or a deletion (``DEL k``) is one command, atomic by
        itself: those go in one plain pipeline. Other types need ``DEL`` then their writes
        then the TTL: one ``MULTI``/``EXEC`` each group of bounded size.
        """
        if not snapshots:
            return
        elapsed_ms = int((time.monotonic() - read_at) * 1000)
        single: list[Snapshot] = []
        groups: list[list[Snapshot]] = [[]]
        weight = 0
        for snap in snapshots:
            if snap.absent or snap.kind == "string":
                single.append(snap)
                continue
            cost = 1 + snap.size
            if groups[-1] and weight + cost > SNAPSHOT_BUDGET:
                groups.append([])
                weight = 0
            groups[-1].append(snap)
            weight += cost
        if single:
            async with conn.pipeline(transaction=False) as pipe:
                for snap in single:
                    remaining = snap.pttl - elapsed_ms
                    if snap.absent or (snap.pttl >= 0 and remaining <= 0):
                        pipe.delete(snap.key)
                    elif snap.pttl >= 0:
                        pipe.set(snap.key, snap.value, px=remaining)
                    else:
                        pipe.set(snap.key, snap.value)
                replies = await pipe.execute(raise_on_error=False)
            errors = [r for r in replies if isinstance(r, Exception)]
            if errors:
                raise errors[0]
        for group in groups:
            if not group:
                continue
            async with conn.pipeline(transaction=True) as pipe:
                for snap in group:
                    _queue_replace(pipe, snap.key, snap, elapsed_ms)
                replies = await pipe.execute(raise_on_error=False)
            errors = [r for r in replies if isinstance(r, Exception)]
            if errors:
                raise errors[0]

    async def _copy_big(self, fconn: Redis, pconn: Redis, snap: Snapshot, read_at: float) -> bool:
        """Copy a big key in chunks into a temporary key, then swap it in atomically.

        The next chunk is read from the fallback while the last one is written to the
        primary. False when the key vanished or changed type on the fallback during the
        copy (it stays dirty: its version moved, and a later batch copies it again).
        """
        if snap.kind not in ("string", "list", "set", "hash", "zset", "stream"):
            logger.warning("redis: key %r has type %s, which reconcile cannot copy", _text(snap.key), snap.kind)
            return False
        tmp = (TMP + secrets.token_hex(8)).encode()
        writing: asyncio.Task[Any] | None = None
        written = 0
        try:
            await pconn.delete(tmp)
            async for command in _chunk_writes(fconn, snap, tmp):
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(_write_chunk(pconn, command))
                written += 1
            if writing is not None:
                await writing
            if written == 0 or not await pconn.exists(tmp):
                return False
            elapsed_ms = int((time.monotonic() - read_at) * 1000)
            async with pconn.pipeline(transaction=True) as pipe:
                pipe.rename(tmp, snap.key)
                for name, last_id in snap.groups:
                    pipe.execute_command("XGROUP", "CREATE", snap.key, name, last_id)
                _queue_expiry(pipe, snap.key, snap.pttl, elapsed_ms)
                replies = await pipe.execute(raise_on_error=False)
            errors = [r for r in replies if isinstance(r, Exception)]
            if errors:
                raise errors[0]
            return True
        finally:
            if writing is not None and not writing.done():
                writing.cancel()
                with contextlib.suppress(BaseException):
                    await writing
            with contextlib.suppress(RedisError, OSError):
                await pconn.delete(tmp)

    async def _record_conflicts(self, conn: Redis, conflicts: list[Conflict]) -> None:
        async with conn.pipeline(transaction=True) as pipe:
            pipe.lpush(CONFLICTS, *[json.dumps(c.to_dict(), default=str) for c in conflicts])
            pipe.ltrim(CONFLICTS, 0, CONFLICT_LOG_SIZE - 1)
            await pipe.execute()

    # --- lock and conflict log ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock(self, fallback: Endpoint) -> AsyncIterator[bool]:
        # A run starts on fresh connections: pooled ones may be to a server that restarted since.
        for pooled in self._clients.values():
            await pooled.connection_pool.disconnect()
        client = self._client(fallback)
        token = secrets.token_hex(16)
        async with asyncio.timeout(self.connect_timeout * 2):
            taken = await client.set(LOCK, token, nx=True, px=self.lock_ttl_ms)
        if not taken:
            yield False
            return
        self._lock_lost = False
        renewer = asyncio.get_running_loop().create_task(self._renew(client, token))
        try:
            yield True
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewer
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.connect_timeout * 2):
                    await client.eval(RELEASE_SCRIPT, 1, LOCK, token)

    async def _renew(self, client: Redis, token: str) -> None:
        while True:
            await asyncio.sleep(self.lock_ttl_ms / 3000)
            try:
                async with asyncio.timeout(self.lock_ttl_ms / 3000):
                    renewed = await client.eval(RENEW_SCRIPT, 1, LOCK, token, self.lock_ttl_ms)
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("redis: renewing the reconcile lock failed: %s", type(exc).__name__)
                continue
            if not renewed:
                logger.warning("redis: the reconcile lock expired and was taken by another process")
                self._lock_lost = True
                return

    async def conflicts(self, fallback: Endpoint, limit: int) -> list[dict[str, Any]]:
        raw = await self._client(fallback).lrange(CONFLICTS, 0, limit - 1)
        out = []
        for item in raw:
            with contextlib.suppress(ValueError):
                out.append(json.loads(item))
        return out

    def describe(self) -> dict[str, Any]:
        return {"capture": f"dirty-key set {DIRTY} on the fallback", "big_key_chunk": CHUNK}


_DELETES = frozenset({"DEL", "UNLINK", "GETDEL"})


def _deleted(args: Sequence[Any]) -> list[Any]:
    """The keys an explicit delete command targets (empty for any other command)."""
    if not args:
        return []
    name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    return list(args[1:]) if name.upper() in _DELETES else []


def _stack_deleted(stack: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
    return [key for args, _options in stack for key in _deleted(args)]


def _replies(replies: list[Any], stack: list[tuple[tuple[Any, ...], dict[str, Any]]], raise_on_error: bool) -> list[Any]:
    if raise_on_error:
        for i, (reply, (args, _options)) in enumerate(zip(replies, stack)):
            if isinstance(reply, Exception):
                raise reply
    return replies


def _primary_value(kind: str, raw: Any) -> Any:
    if kind in ("hash", "zset"):
        if isinstance(raw, dict):
            return list(raw.items())
        if raw and isinstance(raw[0], (tuple, list)):
            return [tuple(x) for x in raw]
        return _pairs(raw)
    if kind == "stream":
        return [(entry[0], _flatten(list(entry[1].items())) if isinstance(entry[1], dict) else list(entry[1])) for entry in raw]
    return raw


async def _chunk_writes(fconn: Redis, snap: Snapshot, tmp: bytes) -> AsyncIterator[list[tuple[Any, ...]]]:
    """Read *snap*'s key on the fallback chunk by chunk; yield the commands that add each to *tmp*."""
    key = snap.key
    if snap.kind == "string":
        offset = 0
        while True:
            chunk = await fconn.getrange(key, offset, offset + STRING_CHUNK_BYTES - 1)
            if not chunk:
                return
            yield [("APPEND", tmp, chunk)]
            offset += len(chunk)
            if len(chunk) < STRING_CHUNK_BYTES:
                return
    elif snap.kind == "list":
        start = 0
        while True:
            items = await fconn.lrange(key, start, start + CHUNK - 1)
            if not items:
                return
            yield [("RPUSH", tmp, *items)]
            start += len(items)
    elif snap.kind == "stream":
        begin: Any = "-"
        while True:
            # XRANGE entries are (id, fields); both callers' clients reply in bytes (decode_responses off).
            entries = cast("list[tuple[bytes, dict[bytes, bytes]]]", await fconn.xrange(key, begin, "+", count=CHUNK))
            if not entries:
                return
            yield [("XADD", tmp, entry_id, *_flatten(list(fields.items()))) for entry_id, fields in entries]
            begin = b"(" + bytes(entries[-1][0])
    else:
        cursor: Any = 0
        while True:
            if snap.kind == "set":
                cursor, members = await fconn.sscan(key, cursor, count=CHUNK)
                command: tuple[Any, ...] = ("SADD", tmp, *members)
            elif snap.kind == "hash":
                cursor, fields = await fconn.hscan(key, cursor, count=CHUNK)
                command = ("HSET", tmp, *_flatten(list(fields.items())))  # type: ignore[union-attr]  # a dict unless no_values
            else:
                # Scores as the server wrote them (bytes), so none is rounded on the way.
                cursor, scored = await fconn.zscan(key, cursor, count=CHUNK, score_cast_func=bytes)
                command = ("ZADD", tmp, *_flatten([(score, member) for member, score in scored]))
            if len(command) > 2:
                yield [command]
            if int(cursor) == 0:
                return


async def _write_chunk(pconn: Redis, commands: list[tuple[Any, ...]]) -> None:
    if len(commands) == 1:
        await pconn.execute_command(*commands[0])
        return
    async with pconn.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        await pipe.execute()


def _queue_expiry(pipe: Pipeline, key: bytes, pttl: int, elapsed_ms: int) -> None:
    if pttl >= 0:
        pipe.pexpire(key, max(1, pttl - elapsed_ms))
    else:
        pipe.persist(key)


def _queue_replace(pipe: Pipeline, key: bytes, snap: Snapshot, elapsed_ms: int) -> None:
    """Queue, inside the caller's MULTI, the commands that make *key* equal to *snap*."""
    pipe.delete(key)
    if snap.absent or (snap.pttl >= 0 and snap.pttl - elapsed_ms <= 0):
        return  # deleted (or expired by now) on the fallback
    value = snap.value
    if snap.kind == "string":
        pipe.set(key, value)
    elif snap.kind == "list":
        for part in _chunks(value, CHUNK):
            pipe.rpush(key, *part)
    elif snap.kind == "set":
        for part in _chunks(value, CHUNK):
            pipe.sadd(key, *part)
    elif snap.kind == "hash":
        for part in _chunks(value, CHUNK):
            pipe.execute_command("HSET", key, *_flatten(part))
    elif snap.kind == "zset":
        for part in _chunks(value, CHUNK):
            pipe.execute_command("ZADD", key, *_flatten([(s, m) for m, s in part]))
    elif snap.kind == "stream":
        if value:
            for entry_id, fields in value:
                pipe.execute_command("XADD", key, entry_id, *fields)
        elif not snap.groups:
            pipe.execute_command("XADD", key, "MAXLEN", 0, "*", "failover", "empty")
        for name, last_id in snap.groups:
            pipe.execute_command("XGROUP", "CREATE", key, name, last_id, "MKSTREAM")
        if value or snap.groups:
            pass
    else:
        logger.warning("redis: key %r has type %s, which reconcile cannot copy", _text(key), snap.kind)
        return
    if snap.pttl >= 0:
        pipe.pexpire(key, max(1, snap.pttl - elapsed_ms))
