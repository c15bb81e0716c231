"""Redis warm sync: the fallback follows the primary by copying keys' final state.

The primary may be Upstash: no ``REPLICAOF``/``SYNC``, no ``DUMP``/``RESTORE``.
So the library copies keys itself, with the typed copy reconcile already uses
(:mod:`.capture`: one Lua snapshot read of type, value and TTL, then ``DEL`` +
``SET``/``RPUSH``/``SADD``/``HSET``/``ZADD``/``XADD`` + ``PEXPIRE`` in one
``MULTI``/``EXEC``; big keys in chunks into a temporary key renamed into place),
only in the other direction. Two sources of work:

* **Mirror** — every command the routed store sends to the *primary* is noted
  (:meth:`RedisWarmSync.note`: a length check and a ``deque.append``, never
  blocking, never awaiting). A worker drains the queue every
  :data:`DEFAULT_MIRROR_DELAY` seconds, finds the keys each write changes with
  the table of :mod:`.writes`, and copies each distinct key's *current* value
  from the primary: a final state, not a replay, so order, duplicates and
  retries do not matter. The queue holds :data:`DEFAULT_QUEUE_SIZE` commands; a
  command that does not fit is counted (``queue_overflows``) and the next
  re-sync is brought forward to cover its keys. Keys wait in a backlog until
  their copy succeeded: a copy that failed (the primary dying) is kept, and
  the backlog left at a failover is copied first after failback.
* **Re-sync** — every :data:`DEFAULT_RESYNC_INTERVAL` seconds (and at once after
  an overflow, a copy error or a failback), ``SCAN`` walks the primary; a Lua
  digest (type, size, content hash, TTL or not) of each batch is compared with
  the fallback's, and only the keys that differ are copied; a second ``SCAN``
  of the fallback deletes keys the primary no longer has. The first pass after
  setup is the initial copy (state ``copying``, keys done of ``DBSIZE``).
  It covers keys written by other clients, at the interval's pace
  (``resync_copied`` counts the keys it found different).

Never against reconcile:

* Copies are written with the sync's own clients, never through the routed
  store, so the capture of :mod:`.capture` marks none of them dirty.
* Each copy runs in a ``MULTI``/``EXEC`` that ``WATCH``es the capture's
  ``failover:ver`` and ``failover:dirty`` on the fallback, and skips keys that
  are dirty there: a key written on the fallback and not yet reconciled belongs
  to reconcile, and a write captured on the fallback while a copy is under way
  aborts that copy. The copy also checks, after its ``WATCH``, that the store is
  still on its primary, so a copy read before a failover never lands after the
  application's first write to the fallback.
* :meth:`RedisWarmSync.pause` (at failover) cancels the worker and the re-sync
  and forgets the queue; :meth:`RedisWarmSync.resume` (after failback) starts
  them again: the backlog first (the writes the primary acknowledged that had not
  reached the fallback when it failed: the RPO window), then one re-sync that
  copies only the keys that differ.
  Reconciled keys are equal on both sides by then, and a copy always reads the
  primary's current value, so nothing reconciled is ever undone.

Lag: a heartbeat key ``failover:warm:hb:<process>`` is written on the primary and its
number goes through the same queue; it is written on the fallback only once every key
noted before it has been copied (:meth:`RedisWarmSync.applied` reads it there).

Not covered (reported in the status): writes by other clients between two
re-syncs; commands dropped by a full queue until the next re-sync; keys the
key table cannot name (``EVAL``/``FCALL`` scripts, ``FLUSHDB``: the re-sync finds
them); keys of more than :data:`~.capture.DIGEST_LIMIT` elements are compared by
type and size only by the re-sync (the mirror copies them whole).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError

from ...core.endpoint import Endpoint
from ...core.tasks import cancel_and_wait
from ...core.warm import SyncProgress, WarmSync
from .capture import (
    _CONTENT_LUA,
    DIGEST_LIMIT,
    DIRTY,
    PREFIX,
    STRING_INLINE_BYTES,
    TMP,
    VERSION,
    RedisCapture,
    Snapshot,
    _chunk_writes,
    _queue_expiry,
    _queue_replace,
    _write_chunk,
)
from .writes import WRITE_COMMANDS, write_keys

__all__ = ["RedisWarmSync"]

logger = logging.getLogger("failover.redis.warm")

DEFAULT_QUEUE_SIZE = 100_000
"""Commands the mirror queue holds; one more is dropped and counted (the caller never waits)."""
DEFAULT_MIRROR_DELAY = 0.02
"""Seconds the worker lets writes accumulate before a copy (fewer, larger batches: the
primary path shares this process's CPU with the copies)."""
DEFAULT_BATCH = 500
"""Distinct keys per copy."""
DEFAULT_RESYNC_INTERVAL = 60.0
"""Seconds between two typed re-syncs by ``SCAN`` (keys written by other clients)."""
SCAN_COUNT = 500
HEARTBEAT_PREFIX = PREFIX + "warm:hb:"
HEARTBEAT_TTL_MS = 3_600_000
"""A process's heartbeat key expires an hour after its last beat (no litter from dead processes)."""
COPY_ATTEMPTS = 3
"""Tries of one copy aborted by a write captured on the fallback, while still on the primary."""
RETRY_PAUSE = 0.2
"""Seconds before a failed copy or re-sync is tried again; doubled at each failure in a row."""
RETRY_PAUSE_MAX = 5.0
LOG_AGAIN_AFTER = 30.0
"""While copies keep failing, one warning per this many seconds (the rest at DEBUG level)."""

# Per key: 'type|size|digest|ttl?' (ttl? is 1 when the key expires). Same content hash as capture.
DIGEST_SCRIPT = _CONTENT_LUA + r"""
local limit = tonumber(ARGV[1])
local out = {}
for i, k in ipairs(KEYS) do
  local ty, size, digest = content(k, limit)
  local expires = 0
  if ty ~= 'none' and redis.call('PTTL', k) >= 0 then expires = 1 end
  out[i] = ty .. '|' .. size .. '|' .. digest .. '|' .. expires
end
return out
"""


READ_SCRIPT = r"""
-- KEYS: keys. Per key: 's', value, PTTL for a string; 'n' for none; 'o' for any other type
-- or a string too big to copy inline (those take the typed copy).
local out = {}
for _, k in ipairs(KEYS) do
  local ty = redis.call('TYPE', k)['ok']
  if ty == 'string' and redis.call('STRLEN', k) <= tonumber(ARGV[1]) then
    out[#out + 1] = 's'
    out[#out + 1] = redis.call('GET', k)
    out[#out + 1] = redis.call('PTTL', k)
  else
    out[#out + 1] = ty == 'none' and 'n' or 'o'
    out[#out + 1] = ''
    out[#out + 1] = -2
  end
end
return out
"""

APPLY_SCRIPT = r"""
-- KEYS[1]: the capture's dirty set; KEYS[2..]: keys.  ARGV: per key kind ('s'|'n'), value, PTTL.
-- A key that is dirty (written on the fallback, not yet reconciled) is left alone: the check and
-- the write are one atomic step, so a write captured after the primary was read is never undone.
local written = 0
for i = 2, #KEYS do
  local k = KEYS[i]
  if redis.call('SISMEMBER', KEYS[1], k) == 0 then
    local j = (i - 2) * 3
    local pttl = tonumber(ARGV[j + 3])
    if ARGV[j + 1] == 's' and pttl == -1 then
      redis.call('SET', k, ARGV[j + 2])
    elseif ARGV[j + 1] == 's' and pttl > 0 then
      redis.call('SET', k, ARGV[j + 2], 'PX', pttl)
    else
      redis.call('DEL', k)
    end
    written = written + 1
  end
end
return written
"""


_WRITE_NAMES = frozenset(
    name for upper in WRITE_COMMANDS for name in (upper, upper.lower(), upper.encode(), upper.lower().encode())
)
"""Command names (as redis-py sends them, and lower-cased) whose keys the mirror copies."""

_BEAT = object()
"""Queued in place of a command: a heartbeat's number, applied once everything before it is copied."""


class _Stopped(Exception):
    """The store left its primary during a copy: the copy is abandoned."""


class RedisWarmSync(WarmSync):
    """Mirror of the library's writes plus a periodic typed re-sync (see the module docstring).

    Args:
        connect_timeout: seconds to open a connection of its own.
        on_primary: tells whether the store still runs on its primary (checked by every copy
            after its ``WATCH``); default: always.
        queue_size, mirror_delay, batch, resync_interval: see the ``DEFAULT_*`` constants.
    """

    store = "redis"

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        on_primary: Callable[[], bool] | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        mirror_delay: float = DEFAULT_MIRROR_DELAY,
        batch: int = DEFAULT_BATCH,
        resync_interval: float = DEFAULT_RESYNC_INTERVAL,
    ) -> None:
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be greater than 0")
        if queue_size < 1 or batch < 1:
            raise ValueError("queue_size and batch must be at least 1")
        if mirror_delay < 0 or resync_interval <= 0:
            raise ValueError("mirror_delay must be 0 or more and resync_interval greater than 0")
        self.connect_timeout = connect_timeout
        self.on_primary = on_primary or (lambda: True)
        self.queue_size = queue_size
        self.mirror_delay = mirror_delay
        self.batch = batch
        self.resync_interval = resync_interval
        self.heartbeat_key = (HEARTBEAT_PREFIX + secrets.token_hex(6)).encode()
        self._beats = 0
        self._beat_drained: int | None = None
        self._beat_applied: int | None = None
        self._copier = RedisCapture(connect_timeout=connect_timeout)  # its typed copy, nothing else
        self._clients: dict[str, Redis] = {}
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._backlog: dict[bytes, None] = {}
        """Keys to copy, oldest first; kept across a pause: the writes the primary acknowledged
        that had not reached the fallback when it failed are copied first after failback."""
        self._active = False
        self._idle = False
        self._wakeup = asyncio.Event()
        self._resync_now = asyncio.Event()
        self._scripts: dict[tuple[int, str], Any] = {}
        self._lock = asyncio.Lock()  # one copy at a time: a slow read must not overwrite a newer copy
        self._tasks: list[asyncio.Task[None]] = []
        self._generation = 0  # bumped whenever the tasks are stopped: a loop of an older one ends
        self._endpoints: tuple[Endpoint, Endpoint] | None = None
        # What the status reports.
        self.queue_overflows = 0
        self.mirrored_keys = 0
        self.skipped_dirty = 0
        self.aborted_copies = 0
        self.copy_errors = 0
        self.resyncs = 0
        self.resync_copied = 0
        self.resync_deleted = 0
        self.last_resync_s: float | None = None
        self._last_resync_at: float | None = None
        self._copying = False
        self._copy_done = 0
        self._copy_total: int | None = None
        self._error: str | None = None
        self._failing_since: float | None = None
        self._warned_at = 0.0

    # --- the primary path -------------------------------------------------------------------

    def note(self, args: tuple[Any, ...]) -> None:
        """A command the primary served: queue it for the mirror (never blocks, never raises)."""
        if not self._active:
            return
        name = args[0]
        if name not in _WRITE_NAMES and (type(name) is not str or name.partition(" ")[0] not in _WRITE_NAMES):
            return  # a read; or a write the key table does not know, which the re-sync covers
        self._enqueue(args)

    def _enqueue(self, args: tuple[Any, ...]) -> None:
        queue = self._queue
        if len(queue) >= self.queue_size:
            self.queue_overflows += 1
            self._resync_now.set()
            return
        queue.append(args)
        if self._idle:
            self._idle = False
            self._wakeup.set()

    def note_many(self, stack: Sequence[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
        """A pipeline the primary served."""
        for args, _options in stack:
            self.note(args)

    # --- connections ------------------------------------------------------------------------

    def _client(self, endpoint: Endpoint) -> Redis:
        client = self._clients.get(endpoint.url)
        if client is None:
            pool = ConnectionPool.from_url(
                endpoint.url,
                max_connections=4,
                socket_connect_timeout=self.connect_timeout,
                # A hung server must not hold a copy for ever: the worker retries after it.
                socket_timeout=max(5.0, self.connect_timeout * 4),
                retry=Retry(NoBackoff(), 0),
                retry_on_error=[],
            )
            pool.connection_kwargs["decode_responses"] = False
            client = Redis(connection_pool=pool)
            self._clients[endpoint.url] = client
        return client

    async def close(self) -> None:
        self._active = False  # a copy still running stops at its next check
        await self._stop_tasks()
        clients, self._clients = list(self._clients.values()), {}
        self._scripts.clear()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
        await self._copier.close()

    # --- WarmSync ---------------------------------------------------------------------------

    async def setup(self, primary: Endpoint, fallback: Endpoint) -> None:
        await self._client(primary).ping()
        await self._client(fallback).ping()
        self._copying = True
        self._copy_done, self._copy_total = 0, None
        self._start(primary, fallback)
        logger.info("redis: warm sync into %s: initial copy from %s", fallback.name, primary.name)

    async def resume(self, primary: Endpoint, fallback: Endpoint) -> None:
        self._start(primary, fallback)
        self._resync_now.set()  # the keys the primary took after the last mirrored write

    async def pause(self, fallback: Endpoint) -> None:
        self._active = False
        await self._stop_tasks()
        self._drain()

    async def heartbeat(self, primary: Endpoint) -> int:
        self._beats += 1
        await self._client(primary).set(self.heartbeat_key, self._beats, px=HEARTBEAT_TTL_MS)
        if self._active:
            self._enqueue((_BEAT, self._beats))
        return self._beats

    async def applied(self, fallback: Endpoint) -> int | None:
        value = await self._client(fallback).get(self.heartbeat_key)
        return None if value is None else int(value)

    async def progress(self, fallback: Endpoint) -> SyncProgress:
        broken = self._failing_since is not None and time.monotonic() - self._failing_since > 10.0
        state = "broken" if broken else "copying" if self._copying else "streaming"
        return SyncProgress(
            state=state,
            rows_done=self._copy_done if self._copying else None,
            rows_total=self._copy_total if self._copying else None,
            apply_errors=self.copy_errors,
            error=self._error,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "mechanism": "mirror of the library's writes + typed re-sync by SCAN",
            "queue": len(self._queue),
            "backlog_keys": len(self._backlog),
            "queue_size": self.queue_size,
            "queue_overflows": self.queue_overflows,
            "mirrored_keys": self.mirrored_keys,
            "skipped_dirty_keys": self.skipped_dirty,
            "aborted_copies": self.aborted_copies,
            "resync_interval_s": self.resync_interval,
            "resyncs": self.resyncs,
            "resync_copied_keys": self.resync_copied,
            "resync_deleted_keys": self.resync_deleted,
            "last_resync_s": self.last_resync_s,
            "last_resync_age_s": None
            if self._last_resync_at is None
            else round(time.monotonic() - self._last_resync_at, 1),
            "not_covered": "writes by other clients until the next re-sync; commands dropped by a full queue "
            "until the next re-sync",
        }

    # --- tasks ------------------------------------------------------------------------------

    def _start(self, primary: Endpoint, fallback: Endpoint) -> None:
        self._endpoints = (primary, fallback)
        self._active = True
        if not self._tasks or any(task.done() for task in self._tasks):
            for task in self._tasks:
                task.cancel()
            self._next_generation()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._mirror_loop(self._generation), name="failover redis warm mirror"),
                loop.create_task(self._resync_loop(self._generation), name="failover redis warm re-sync"),
            ]

    async def _stop_tasks(self) -> None:
        self._next_generation()
        tasks, self._tasks = self._tasks, []
        await cancel_and_wait(tasks)

    def _next_generation(self) -> None:
        """End the running loops at their next turn, and wake them now so that turn comes at once.

        A loop whose cancel Python 3.11 swallowed (a cancel landing as an ``asyncio.timeout`` inside
        a driver call expires becomes a ``TimeoutError`` the loop handles), or whose ``_stop_tasks``
        was itself cancelled by a deadline, would otherwise wait for its next write or re-sync
        (up to a minute) before it noticed.
        """
        self._generation += 1
        self._wakeup.set()
        self._resync_now.set()

    def _failed(self, what: str, exc: BaseException, failures: int = 1) -> float:
        """Record a failed copy (*failures* in a row); return the pause before the next try.

        A server that stays down costs one warning per :data:`LOG_AGAIN_AFTER` seconds and a
        try per :data:`RETRY_PAUSE_MAX` at most, not a log line per try.
        """
        self.copy_errors += 1
        self._error = f"{what}: {type(exc).__name__}: {exc}"
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        self._resync_now.set()  # what the failed copy held is covered by the next re-sync
        if now - self._warned_at >= LOG_AGAIN_AFTER or self._failing_since == now:
            self._warned_at = now
            logger.warning("redis: warm sync %s failed: %s (tried again until it succeeds)", what, type(exc).__name__)
        else:
            logger.debug("redis: warm sync %s failed again: %s", what, type(exc).__name__)
        return min(RETRY_PAUSE * 2 ** max(0, failures - 1), RETRY_PAUSE_MAX)

    def _succeeded(self) -> None:
        if self._failing_since is not None:
            logger.info("redis: warm sync copies again after %.1f s of failures", time.monotonic() - self._failing_since)
        self._failing_since = None
        self._warned_at = 0.0
        self._error = None

    def _drain(self, limit: int | None = None) -> None:
        """Move queued commands' keys into the backlog (distinct keys, oldest first)."""
        queue, backlog, prefix = self._queue, self._backlog, PREFIX.encode()
        while queue and (limit is None or len(backlog) < limit):
            args = queue.popleft()
            if args[0] is _BEAT:
                # Everything noted before this beat is in the backlog now: the beat reaches the
                # fallback once the backlog is empty (see _mirror_loop), never before.
                self._beat_drained = args[1]
                continue
            for key in write_keys(args) or ():
                key = key if isinstance(key, bytes) else str(key).encode()
                if not key.startswith(prefix):
                    backlog[key] = None
        if len(backlog) > self.queue_size:  # bounded: what does not fit waits for the re-sync
            for key in list(backlog)[self.queue_size :]:
                del backlog[key]
                self.queue_overflows += 1
            self._resync_now.set()

    async def _mirror_loop(self, generation: int) -> None:
        queue, backlog = self._queue, self._backlog
        failures = 0
        while generation == self._generation:
            if not queue and not backlog:
                self._idle = True
                self._wakeup.clear()
                if not queue:
                    await self._wakeup.wait()
                    if generation != self._generation:
                        return
                self._idle = False
            if self.mirror_delay and len(queue) + len(backlog) < self.batch:
                # Light load: let writes accumulate (a hot key is copied once per delay). Under a
                # backlog of a batch or more, copy at once: the delay must not cap the throughput.
                await asyncio.sleep(self.mirror_delay)
            self._drain(self.batch)
            keys = list(itertools.islice(backlog, self.batch))
            if not keys:
                await self._apply_beat()
                continue
            try:
                self.mirrored_keys += await self._copy(keys)
                self._succeeded()
                failures = 0
            except _Stopped:
                await asyncio.sleep(RETRY_PAUSE)  # the store left its primary: pause() follows
                continue
            except (RedisError, OSError, TimeoutError) as exc:
                # The keys stay in the backlog: copied once the primary answers, or after failback.
                failures += 1
                await asyncio.sleep(self._failed("mirror copy", exc, failures))
                continue
            for key in keys:
                backlog.pop(key, None)
            if not backlog:
                await self._apply_beat()

    async def _apply_beat(self) -> None:
        """Write the newest drained heartbeat on the fallback: every write noted before it is there."""
        beat = self._beat_drained
        if beat is None or beat == self._beat_applied:
            return
        assert self._endpoints is not None
        if not (self._active and self.on_primary()):
            return
        try:
            await self._client(self._endpoints[1]).set(self.heartbeat_key, beat, px=HEARTBEAT_TTL_MS)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("heartbeat", exc)
            return
        self._beat_applied = beat

    async def _resync_loop(self, generation: int) -> None:
        failures = 0
        while generation == self._generation:
            self._resync_now.clear()  # a reason to re-sync that arrives during this pass starts another
            try:
                await self._resync()
                self._succeeded()
                failures = 0
            except _Stopped:
                pass  # the store left its primary: pause() follows
            except (RedisError, OSError, TimeoutError) as exc:
                failures += 1
                await asyncio.sleep(self._failed("re-sync", exc, failures))
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.resync_interval):
                    await self._resync_now.wait()

    # --- copies -----------------------------------------------------------------------------

    async def _copy(self, keys: list[bytes]) -> int:
        """Copy *keys*' current value from the primary into the fallback; return how many were written.

        Strings (most keys) take two script calls, one per server; other types the typed copy
        of :mod:`.capture` under a ``WATCH`` (tried again when a captured write aborted it).
        """
        assert self._endpoints is not None
        primary, fallback = self._endpoints
        pconn, fconn = self._client(primary), self._client(fallback)
        async with self._lock:
            self._check()
            reply = await self._script(pconn, READ_SCRIPT)(keys=keys, args=[STRING_INLINE_BYTES], client=pconn)
            strings: list[bytes] = []
            args: list[Any] = []
            typed: list[bytes] = []
            for i, key in enumerate(keys):
                kind, value, pttl = reply[3 * i : 3 * i + 3]
                if kind == b"o":
                    typed.append(key)
                else:
                    strings.append(key)
                    args += [kind, value, pttl]
            written = 0
            if strings:
                self._check()
                written = int(await self._script(fconn, APPLY_SCRIPT)(keys=[DIRTY, *strings], args=args, client=fconn))
                self.skipped_dirty += len(strings) - written
            for _attempt in range(COPY_ATTEMPTS if typed else 0):
                try:
                    written += await self._copy_typed(pconn, fconn, typed)
                    break
                except WatchError:
                    self.aborted_copies += 1
                    self._check()
            return written

    def _check(self) -> None:
        if not (self._active and self.on_primary()):
            raise _Stopped

    def _script(self, client: Redis, text: str) -> Any:
        key = (id(client), text)
        script = self._scripts.get(key)
        if script is None:
            script = self._scripts[key] = client.register_script(text)
        return script

    async def _copy_typed(self, pconn: Redis, fconn: Redis, keys: list[bytes]) -> int:
        big: list[Snapshot] = []
        async with fconn.pipeline(transaction=True) as pipe:
            # A write captured on the fallback from here on aborts this copy (see the docstring).
            await pipe.watch(DIRTY, VERSION)
            dirty = await pipe.smismember(DIRTY, keys)
            clean = [k for k, d in zip(keys, dirty) if not d]
            self.skipped_dirty += len(keys) - len(clean)
            if not clean:
                return 0
            self._check()
            snapshots, _ = await self._copier._snapshot(pconn, clean)
            read_at = time.monotonic()
            pipe.multi()
            for snap in snapshots:
                if snap.inline:
                    _queue_replace(pipe, snap.key, snap, 0)
                else:
                    big.append(snap)
            if pipe.command_stack:
                replies = await pipe.execute(raise_on_error=False)
                errors = [r for r in replies if isinstance(r, Exception)]
                if errors:
                    raise errors[0]
        for snap in big:
            await self._copy_big(pconn, fconn, snap, read_at)
        return len(snapshots)

    async def _copy_big(self, pconn: Redis, fconn: Redis, snap: Snapshot, read_at: float) -> None:
        """A key too big for one transaction: chunks into a temporary key, swapped in under the fence."""
        tmp = (TMP + secrets.token_hex(8)).encode()
        try:
            await fconn.delete(tmp)
            written = 0
            async for commands in _chunk_writes(pconn, snap, tmp):
                await _write_chunk(fconn, commands)
                written += 1
            async with fconn.pipeline(transaction=True) as pipe:
                await pipe.watch(DIRTY, VERSION)
                if await pipe.sismember(DIRTY, snap.key):  # type: ignore[arg-type]  # redis-py 8 annotates the member as str; bytes work
                    self.skipped_dirty += 1
                    return
                self._check()
                if written == 0 or not await pipe.exists(tmp):
                    return  # gone on the primary meanwhile: the next copy of it deletes it
                pipe.multi()
                pipe.rename(tmp, snap.key)
                for name, last_id in snap.groups:
                    pipe.execute_command("XGROUP", "CREATE", snap.key, name, last_id)
                _queue_expiry(pipe, snap.key, snap.pttl, int((time.monotonic() - read_at) * 1000))
                await pipe.execute()
        finally:
            with contextlib.suppress(RedisError, OSError):
                await fconn.delete(tmp)

    async def _resync(self) -> None:
        """One typed re-sync pass (the first one is the initial copy)."""
        assert self._endpoints is not None
        primary, fallback = self._endpoints
        pconn, fconn = self._client(primary), self._client(fallback)
        started = time.monotonic()
        prefix = PREFIX.encode()
        copied = deleted = 0
        if self._copying:
            self._copy_done, self._copy_total = 0, int(await pconn.dbsize())
        cursor: Any = 0
        while True:
            cursor, found = await pconn.scan(cursor, count=SCAN_COUNT)
            keys = [k for k in cast("list[bytes]", found) if not k.startswith(prefix)]  # _client(): bytes replies
            if keys:
                differ = await self._differing(pconn, fconn, keys)
                if differ:
                    copied += await self._copy(differ)
            if self._copying:
                self._copy_done += len(found)
                if self._copy_total is not None and self._copy_done > self._copy_total:
                    self._copy_total = self._copy_done
            if int(cursor) == 0:
                break
        cursor = 0
        while True:
            cursor, found = await fconn.scan(cursor, count=SCAN_COUNT)
            keys = [k for k in cast("list[bytes]", found) if not k.startswith(prefix)]  # _client(): bytes replies
            if keys:
                async with pconn.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.exists(key)
                    present = await pipe.execute()
                gone = [k for k, n in zip(keys, present) if not n]
                if gone:
                    deleted += await self._copy(gone)  # absent on the primary: deleted on the fallback
            if int(cursor) == 0:
                break
        self.resyncs += 1
        self.resync_copied += copied
        self.resync_deleted += deleted
        self.last_resync_s = round(time.monotonic() - started, 3)
        self._last_resync_at = time.monotonic()
        if self._copying:
            self._copying = False
            logger.info(
                "redis: initial copy into %s done: %d keys scanned, %d copied in %.1fs",
                fallback.name, self._copy_done, copied, self.last_resync_s,
            )  # fmt: skip
        elif copied or deleted:
            logger.info("redis: re-sync of %s copied %d keys and deleted %d", fallback.name, copied, deleted)

    async def _differing(self, pconn: Redis, fconn: Redis, keys: list[bytes]) -> list[bytes]:
        theirs, ours = await asyncio.gather(
            pconn.eval(DIGEST_SCRIPT, len(keys), *keys, DIGEST_LIMIT),
            fconn.eval(DIGEST_SCRIPT, len(keys), *keys, DIGEST_LIMIT),
        )
        return [k for k, a, b in zip(keys, theirs, ours) if a != b]
