"""Reconcile: writes acknowledged by the fallback reach the primary before traffic does.

The pieces, one concept each:

* :class:`Capture` — what a store provides: it records, on the fallback and
  atomically with each write, *which* key changed and the key's image before
  its first change (PostgreSQL: triggers and a change table; MongoDB: an intent
  journal; Redis: a dirty-key set written in the same ``MULTI``). It copies the
  fallback's *final state* of captured keys into the primary, batch by batch,
  and forgets a key only once its value is committed there, so a run can stop at
  any instant (process SIGKILLed, server gone) and the next one finishes it.
* :class:`ConflictPolicy` and :func:`resolve` — the rule applied when the
  primary changed a key after we left it (its current value differs from the
  image captured before the key's first change on the fallback).
* :class:`Reconciler` — the driver owned by a :class:`~failover.core.store.FailoverStore`:
  when the switch enters ``RECONCILING`` it drains the backlog while traffic
  stays on the fallback, then holds new operations of the store for at most
  ``FAILOVER_RECONCILE_HOLD`` seconds, waits for the ones in flight, copies
  what is left and only then lets the switch move to the primary. If the last
  part does not fit in the hold, traffic resumes on the fallback and it tries
  again at the next probe round. One process reconciles a pair at a time
  (:meth:`Capture.lock`, a lock held on the fallback); a process already on the
  primary still sweeps writes that other processes left on the fallback.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import enum
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._urls import redact_text
from .endpoint import Endpoint, Role
from .events import ConflictResolved, ReconcileCompleted, ReconcileStarted, SwitchState, TransitionCause
from .tasks import cancel_and_wait

if TYPE_CHECKING:
    from .store import FailoverStore

__all__ = [
    "BatchResult",
    "Capture",
    "Conflict",
    "ConflictPolicy",
    "Reconciler",
    "Resolution",
    "TIMESTAMP_FIELDS",
    "change_time",
    "resolve",
    "summarize",
]

logger = logging.getLogger("failover.reconcile")

DEFAULT_BATCH_SIZE = 500
DEFAULT_HOLD = 2.0
# A reconcile step (one batch, one count) that takes longer than this is abandoned.
DEFAULT_STEP_TIMEOUT = 30.0
# Summaries of conflicting versions keep values this short and hide these fields.
SUMMARY_VALUE_LIMIT = 80
_SECRET_HINTS = ("password", "passwd", "secret", "token", "api_key", "apikey", "credential", "private")


class ConflictPolicy(enum.StrEnum):
    """What wins when the same key changed on both sides (``FAILOVER_CONFLICT_POLICY``)."""

    FALLBACK_WINS = "fallback_wins"
    """The fallback's final value is copied over the primary's (the default: it is what the
    application last acknowledged)."""
    PRIMARY_WINS = "primary_wins"
    """The primary keeps its value; the fallback's write is dropped (and recorded)."""
    NEWEST_WINS = "newest_wins"
    """The later change wins: the fallback's last capture time against the primary
    version's own timestamp (each store documents which one); without one, the fallback wins."""


class Resolution(enum.StrEnum):
    """How one conflict ended."""

    FALLBACK_KEPT = "fallback_kept"
    PRIMARY_KEPT = "primary_kept"


def resolve(
    policy: ConflictPolicy, fallback_changed_at: float | None, primary_changed_at: float | None
) -> tuple[Resolution, str]:
    """Apply *policy* to one conflict. Times are wall-clock seconds (None when unknown).

    Returns the resolution and a short explanation for the conflict log.
    """
    if policy is ConflictPolicy.PRIMARY_WINS:
        return Resolution.PRIMARY_KEPT, "policy primary_wins"
    if policy is ConflictPolicy.NEWEST_WINS:
        if primary_changed_at is None or fallback_changed_at is None:
            return Resolution.FALLBACK_KEPT, "policy newest_wins: the primary version has no timestamp, fallback kept"
        if primary_changed_at > fallback_changed_at:
            return Resolution.PRIMARY_KEPT, "policy newest_wins: the primary version is newer"
        return Resolution.FALLBACK_KEPT, "policy newest_wins: the fallback version is newer"
    return Resolution.FALLBACK_KEPT, "policy fallback_wins"


def summarize(value: Any, limit: int = SUMMARY_VALUE_LIMIT) -> Any:
    """A copy of *value* fit for a conflict log: secret-looking fields masked, long values cut.

    ``None`` stays ``None`` (the key did not exist on that side).
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in list(value.items())[:50]:
            name = str(key)
            if any(hint in name.lower() for hint in _SECRET_HINTS):
                out[name] = "***"
            else:
                out[name] = summarize(item, limit)
        if len(value) > 50:
            out["…"] = f"{len(value) - 50} more fields"
        return out
    if isinstance(value, (list, tuple)):
        items = [summarize(v, limit) for v in list(value)[:20]]
        if len(value) > 20:
            items.append(f"… {len(value) - 20} more")
        return items
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"… ({len(value)} chars)"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return summarize(str(value), limit)


TIMESTAMP_FIELDS = ("updated_at", "modified_at")
"""Fields read as "when this version changed" by ``newest_wins``, first found wins."""


def change_time(fields: Mapping[str, Any] | None) -> float | None:
    """When a version changed, from its ``updated_at``/``modified_at`` field, as epoch seconds.

    Accepts what the stores hold there: a ``datetime`` (naive means UTC), epoch seconds
    or milliseconds (numbers, or their text), or ISO-8601 text (``Z`` allowed). None
    when no such field holds a usable value.
    """
    if not fields:
        return None
    for name in TIMESTAMP_FIELDS:
        value = fields.get(name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
        if isinstance(value, str):
            text = value
            try:
                value = float(text)
            except ValueError:
                try:
                    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
                except ValueError:
                    continue
                return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) / 1000 if value > 1e11 else float(value)  # epoch ms or s
    return None


@dataclass(frozen=True, slots=True)
class Conflict:
    """One key changed on both sides, and what was done about it."""

    store: str
    key: str
    resolution: Resolution
    at: float
    primary: Any
    """Summary of the primary's version when it was found (None: absent there)."""
    fallback: Any
    """Summary of the fallback's final version (None: deleted there)."""
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "key": self.key,
            "resolution": str(self.resolution),
            "at": self.at,
            "primary": self.primary,
            "fallback": self.fallback,
            "detail": self.detail,
        }


@dataclass(slots=True)
class BatchResult:
    """What one :meth:`Capture.apply_batch` did."""

    applied: int = 0
    """Captured keys whose final state is now on the primary (and left the backlog)."""
    conflicts: list[Conflict] = field(default_factory=list)
    remaining: int | None = None
    """Backlog after the batch, when the store knows it cheaply."""


class Capture(abc.ABC):
    """Change capture on a store's fallback and the copy of captured keys to its primary.

    Every method gets the endpoints it works on and opens its own connections
    (never the routed pools, which follow the switch). Each is called with a
    deadline around it by the :class:`Reconciler`.
    """

    store: str

    @abc.abstractmethod
    async def install(self, fallback: Endpoint, primary: Endpoint | None) -> None:
        """Make sure every write on *fallback* is captured from now on (idempotent).

        Called at start and at every probe round while the fallback is usable, so
        objects created since are protected; *primary* is given when it is usable
        too (for example to keep generated ids apart).
        """

    @abc.abstractmethod
    async def backlog(self, fallback: Endpoint) -> int:
        """How many captured keys wait to be copied."""

    @abc.abstractmethod
    async def apply_batch(
        self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int
    ) -> BatchResult:
        """Copy the final state of up to *limit* captured keys into *primary*.

        A key leaves the backlog only after its value is committed on the
        primary, and only if it did not change again meanwhile. Conflicts are
        resolved with *policy* and recorded durably before they are returned.
        """

    @abc.abstractmethod
    def lock(self, fallback: Endpoint) -> contextlib.AbstractAsyncContextManager[bool]:
        """Try to take the pair's reconcile lock, without waiting; yields whether it was taken.

        The lock must die with its holder (a session lock, a lease with expiry), so a
        SIGKILLed process never blocks the others.
        """

    @abc.abstractmethod
    async def conflicts(self, fallback: Endpoint, limit: int) -> list[dict[str, Any]]:
        """The most recent recorded conflicts, newest first (``Conflict.to_dict`` shape)."""

    def describe(self) -> dict[str, Any]:
        """Store-specific details for the status document (e.g. unprotected tables)."""
        return {}

    async def watermark(self, fallback: Endpoint) -> Any | None:
        """The position of the newest captured change now, or None when the store has no order.

        The final catch-up of a reconcile copies what was captured up to this mark
        (every write of this process is below it: they are held and none is in
        flight); changes captured later come from other processes still on the
        fallback and stay for them, so their traffic cannot keep this failback
        from finishing. With None, the catch-up copies until the backlog is empty.
        """
        return None

    async def backlog_upto(self, fallback: Endpoint, watermark: Any) -> int:
        """Captured keys at or below *watermark* (see :meth:`watermark`)."""
        return await self.backlog(fallback)

    async def apply_upto(
        self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int, watermark: Any
    ) -> BatchResult:
        """:meth:`apply_batch` restricted to keys captured at or below *watermark*."""
        return await self.apply_batch(primary, fallback, policy, limit)

    async def after_reconcile(self, primary: Endpoint, fallback: Endpoint) -> None:
        """Called once the backlog is empty and traffic is back on the primary."""

    async def close(self) -> None:
        """Release anything held."""


class Reconciler:
    """Drives :class:`Capture` for one store: the ``RECONCILING`` state's work.

    Args:
        store: the failover store it serves (its switch, endpoints, admission gate).
        capture: the store's capture.
        policy: the conflict policy.
        hold: seconds new operations may be held for the final catch-up.
        batch_size: captured keys per batch.
    """

    def __init__(
        self,
        store: FailoverStore[Any],
        capture: Capture,
        *,
        policy: ConflictPolicy = ConflictPolicy.FALLBACK_WINS,
        hold: float = DEFAULT_HOLD,
        batch_size: int = DEFAULT_BATCH_SIZE,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
    ) -> None:
        if hold <= 0:
            raise ValueError("hold must be greater than 0")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._store = store
        self.capture = capture
        self.policy = policy
        self.hold = hold
        self.batch_size = batch_size
        self.step_timeout = step_timeout
        self.installed = False
        self.backlog: int | None = None
        self.applied = 0
        self.conflict_count = 0
        self.state = "idle"
        self.last_error: str | None = None
        self.last_run: dict[str, Any] | None = None
        self._rate = 0.0
        self._held_up_by = 0  # operations still in flight when the last final catch-up ran out
        self._task: asyncio.Task[None] | None = None
        self._refreshing: asyncio.Task[Any] | None = None

    # --- endpoints --------------------------------------------------------------------------

    @property
    def _primary(self) -> Endpoint:
        return self._store.endpoints[Role.PRIMARY]

    @property
    def _fallback(self) -> Endpoint:
        return self._store.endpoints[Role.FALLBACK]

    def _describe(self, exc: BaseException) -> str:
        """*exc* in one line, without the secrets of either endpoint (a step may touch both)."""
        return redact_text(self._store.describe(self._primary, exc), self._fallback.secrets)

    async def _step(self, coro: Any) -> Any:
        async with asyncio.timeout(self.step_timeout):
            return await coro

    # --- called by the store ------------------------------------------------------------------

    async def prepare(self, primary_usable: bool) -> None:
        """Install (or refresh) capture on the fallback and read the backlog. Never raises."""
        try:
            primary = self._primary if primary_usable else None
            await self._step(self.capture.install(self._fallback, primary))
            self.installed = True
            self.backlog = await self._step(self.capture.backlog(self._fallback))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.last_error = self._describe(exc)
            logger.warning("%s: preparing change capture on %s failed: %s", self._store.name, self._fallback.name, self.last_error)

    def refresh(self, primary_usable: bool) -> None:
        """:meth:`prepare` in the background (a probe round never waits for it)."""
        if self.running or (self._refreshing is not None and not self._refreshing.done()):
            return
        self._refreshing = self._store._spawn(self.prepare(primary_usable), "refresh change capture")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def kick(self) -> None:
        """Start a reconcile run unless one is under way."""
        if self.running:
            return
        task = self._store._spawn(self._run(), "reconcile")
        self._task = task

    async def stop(self) -> None:
        await cancel_and_wait([self._task, self._refreshing])
        self._task = self._refreshing = None

    # --- the run ----------------------------------------------------------------------------

    async def _run(self) -> None:
        store = self._store
        gate = store.state is SwitchState.RECONCILING  # else: a sweep while on the primary
        started_wall = store.clock.wall()
        started = time.monotonic()
        applied = conflicts = 0
        hold_s: float | None = None
        result = "failed"
        try:
            async with self.capture.lock(self._fallback) as mine:
                if not mine:
                    self.state = "waiting_for_lock"
                    result = "another process is reconciling"
                    return
                store.bus.emit(ReconcileStarted(store=store.name, at=started_wall, backlog=self.backlog or 0, gated=gate))
                self.state = "draining"
                while True:
                    if gate and store.state is not SwitchState.RECONCILING:
                        result = "interrupted: the store left RECONCILING"
                        return
                    backlog = await self._step(self.capture.backlog(self._fallback))
                    self.backlog = backlog
                    if gate and backlog <= self.batch_size:
                        break
                    if backlog == 0:
                        break
                    a, c = await self._batch()
                    applied += a
                    conflicts += c
                    self._rate = applied / max(1e-6, time.monotonic() - started)
                if gate:
                    self.state = "holding"
                    ok, a, c, hold_s = await self._final_catch_up()
                    applied += a
                    conflicts += c
                    if not ok:
                        result = f"the final catch-up did not fit in the {self.hold:g}s hold; traffic stays on the fallback"
                        if self._held_up_by > 0:
                            result += (
                                f" ({self._held_up_by} operation(s) still in flight: a connection() block, "
                                "SQLAlchemy session or WATCH pipeline kept open longer than the hold)"
                            )
                            logger.warning("%s: reconcile: %s", store.name, result)
                        store._switch.finish_reconcile(False, "reconcile hold ran out", TransitionCause.HOLD_RAN_OUT)
                        return
                self.backlog = 0
                result = "completed"
        except asyncio.CancelledError:
            result = "cancelled"
            raise
        except Exception as exc:
            self.last_error = self._describe(exc)
            result = f"failed: {self.last_error}"
            logger.warning("%s: reconcile failed, traffic stays on the fallback: %s", store.name, self.last_error)
            if gate:
                store._switch.finish_reconcile(False, f"reconcile failed: {self.last_error}")
        finally:
            duration = time.monotonic() - started
            if applied:
                self._rate = applied / max(1e-6, duration)
            self.state = "idle" if result != "another process is reconciling" else "waiting_for_lock"
            if result != "another process is reconciling":
                self.last_run = {
                    "started_at": started_wall,
                    "duration_s": round(duration, 3),
                    "applied": applied,
                    "conflicts": conflicts,
                    "hold_s": None if hold_s is None else round(hold_s, 4),
                    "result": result,
                    "gated": gate,
                }
                if result == "completed":
                    self.last_error = None
                store.bus.emit(
                    ReconcileCompleted(
                        store=store.name,
                        at=store.clock.wall(),
                        applied=applied,
                        conflicts=conflicts,
                        duration=duration,
                        hold=hold_s,
                        ok=result == "completed",
                        result=result,
                    )
                )
        # After the run is recorded: the switch may already be back on the primary, and a status
        # read then must find this run in ``last_run`` (the clean-up below awaits the servers).
        if result == "completed":
            with contextlib.suppress(Exception):
                await self._step(self.capture.after_reconcile(self._primary, self._fallback))

    async def _batch(self, watermark: Any | None = None) -> tuple[int, int]:
        if watermark is None:
            call = self.capture.apply_batch(self._primary, self._fallback, self.policy, self.batch_size)
        else:
            call = self.capture.apply_upto(self._primary, self._fallback, self.policy, self.batch_size, watermark)
        batch = await self._step(call)
        self.applied += batch.applied
        self.conflict_count += len(batch.conflicts)
        for conflict in batch.conflicts:
            self._store.bus.emit(
                ConflictResolved(
                    store=self._store.name,
                    at=conflict.at,
                    key=conflict.key,
                    resolution=str(conflict.resolution),
                    detail=conflict.detail,
                )
            )
        if batch.remaining is not None:
            self.backlog = batch.remaining
        return batch.applied, len(batch.conflicts)

    async def _final_catch_up(self) -> tuple[bool, int, int, float]:
        """Hold new operations, wait for the ones in flight, copy the rest, switch.

        The copy runs as a task of its own: when the hold runs out the gate opens at
        once, whatever a cancelled driver call still waits for (a hung primary).
        """
        store = self._store
        started = time.monotonic()
        ok = False
        counts = [0, 0]
        self._held_up_by = 0

        async def catch_up() -> None:
            await store.admission.idle()
            mark = await self.capture.watermark(self._fallback)
            while True:
                if mark is None:
                    backlog = self.backlog = await self.capture.backlog(self._fallback)
                else:
                    backlog = await self.capture.backlog_upto(self._fallback, mark)
                if backlog == 0:
                    return
                a, c = await self._batch(mark)
                counts[0] += a
                counts[1] += c

        async with store.admission.hold():
            task = asyncio.get_running_loop().create_task(catch_up(), name=f"failover-{store.name}-catch-up")
            done, _pending = await asyncio.wait({task}, timeout=self.hold)
            if task in done and task.exception() is None:
                store._switch.finish_reconcile(True, "reconciled: every write made on the fallback is on the primary")
                ok = store.state is SwitchState.ON_PRIMARY
            elif task in done:
                raise task.exception()  # type: ignore[misc]
            else:
                self._held_up_by = store.admission.inflight  # what the catch-up still waited for
                task.cancel()  # copying again later is harmless: final states, idempotent
                task.add_done_callback(_consume)
        held = time.monotonic() - started
        return ok, counts[0], counts[1], held

    # --- reading --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The ``reconcile`` block of the store's status."""
        doc: dict[str, Any] = {
            "enabled": True,
            "state": self.state,
            "running": self.running,
            "capture_installed": self.installed,
            "backlog": self.backlog,
            "applied": self.applied,
            "conflicts": self.conflict_count,
            "rate_per_s": round(self._rate, 1),
            "policy": str(self.policy),
            "last_run": self.last_run,
            "error": self.last_error,
        }
        doc.update(self.capture.describe())
        return doc


def _consume(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


class Admission:
    """The gate every routed operation of a store passes, and the count of those in flight.

    Normally open and nearly free: one attribute test and two integer updates.
    :meth:`hold` closes it for the final catch-up of a reconcile; operations that
    arrive meanwhile wait (within their own deadline) and then take the route the
    switch decided.
    """

    __slots__ = ("inflight", "_opened", "_idle")

    def __init__(self) -> None:
        self.inflight = 0
        self._opened: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None

    @property
    def held(self) -> bool:
        return self._opened is not None

    async def wait(self, deadline: float) -> None:
        """Wait until the gate is open, at most until *deadline* (``time.monotonic()``)."""
        opened = self._opened
        if opened is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await opened.wait()

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight <= 0 and self._idle is not None:
            self._idle.set()

    def leave_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """:meth:`leave` on *loop*'s thread: at once when called there, else scheduled on it (a
        garbage-collection finalizer may run on any thread); nothing if *loop* is closed."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.leave()
            return
        with contextlib.suppress(RuntimeError):  # closed: nothing waits for the count any more
            loop.call_soon_threadsafe(self.leave)

    @contextlib.asynccontextmanager
    async def admitted(self, deadline: float) -> AsyncIterator[None]:
        """Wait for the gate, then count the block as in flight."""
        if self._opened is not None:
            await self.wait(deadline)
        self.inflight += 1
        try:
            yield
        finally:
            self.leave()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Close the gate for the duration of the block."""
        if self._opened is not None:
            raise RuntimeError("the admission gate is already held")
        self._opened = asyncio.Event()
        self._idle = asyncio.Event()
        try:
            yield
        finally:
            opened, self._opened, self._idle = self._opened, None, None
            opened.set()

    async def idle(self) -> None:
        """Wait until no admitted operation is in flight (call inside :meth:`hold`)."""
        if self.inflight <= 0:
            return
        assert self._idle is not None, "idle() is meant for inside hold()"
        await self._idle.wait()
