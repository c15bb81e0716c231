"""A store with a primary and a fallback: the generic half that every driver shares.

A :class:`Backend` knows one driver: how to open and drain a client for an
endpoint, how to probe it, and how to classify the driver's errors. The
:class:`FailoverStore` owns everything else: health, breaker, switch, monitor,
routing with retries, status.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from .reasons import describe_exception
from ..errors import ClosedError, NoEndpointAvailable, OperationTimeout, OutcomeUnknown
from .attempt import AttemptClock, Watchdog
from .clock import Clock, SystemClock
from .endpoint import Endpoint, ProbeResult, Role
from .events import EventBus, OperationRetried, StateChanged, SwitchState
from .health import EndpointHealth
from .monitor import Monitor
from .reconcile import Admission, Capture, ConflictPolicy, Reconciler
from .routing import Action, ErrorKind, decide
from .snapshot import EndpointSnapshot, StoreSnapshot, frozen
from .switch import Switch
from .warm import WarmDriver, WarmSync

__all__ = ["Backend", "ErrorKind", "FailoverStore", "StoreOptions", "last_served"]

logger = logging.getLogger("failover.store")

_last_served: contextvars.ContextVar[Endpoint | None] = contextvars.ContextVar("failover_last_served", default=None)


def last_served() -> Endpoint | None:
    """The endpoint that served the last successful routed operation of the current task.

    Exact even across a switch or a retry (the active endpoint after the call may differ).
    """
    return _last_served.get()


DEFAULT_SUSPECT_AFTER = 0.5
"""Seconds an operation may wait before its endpoint gets a confirmation probe."""

T = TypeVar("T")


ClientT = TypeVar("ClientT")


class Backend(abc.ABC, Generic[ClientT]):
    """What failover needs to know about one driver."""

    store: str

    @abc.abstractmethod
    async def open(self, endpoint: Endpoint) -> None:
        """Create the client/pool of *endpoint* without waiting for the server."""

    @abc.abstractmethod
    async def drain(self, endpoint: Endpoint) -> None:
        """Close the pooled connections of *endpoint*; the client may be re-opened later."""

    async def warm(self, endpoint: Endpoint, timeout: float) -> None:
        """Make *endpoint* ready for a burst of traffic (called before failback)."""
        await self.open(endpoint)

    @abc.abstractmethod
    async def close(self, endpoint: Endpoint) -> None:
        """Release everything held for *endpoint*."""

    @abc.abstractmethod
    async def probe(self, endpoint: Endpoint) -> bool:
        """Check *endpoint*; return whether it accepts writes, raise when unreachable.

        The caller bounds it with the probe timeout.
        """

    @abc.abstractmethod
    def classify(self, exc: BaseException) -> ErrorKind:
        """Say what *exc*, raised by this driver, means for routing."""


class StoreOptions:
    """The tuning a store reads from :class:`~failover.Settings`."""

    def __init__(
        self,
        *,
        probe_interval: float,
        probe_timeout: float,
        operation_timeout: float,
        unhealthy_threshold: int,
        healthy_threshold: int,
        breaker_threshold: int,
        failback_delay: float,
        history_size: int = 50,
        reconcile: bool = True,
        conflict_policy: ConflictPolicy | str = ConflictPolicy.FALLBACK_WINS,
        reconcile_hold: float = 2.0,
        reconcile_batch: int = 500,
    ) -> None:
        for name, value in (
            ("probe_interval", probe_interval),
            ("probe_timeout", probe_timeout),
            ("operation_timeout", operation_timeout),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be greater than 0")
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.operation_timeout = operation_timeout
        self.unhealthy_threshold = unhealthy_threshold
        self.healthy_threshold = healthy_threshold
        self.breaker_threshold = breaker_threshold
        self.failback_delay = failback_delay
        self.history_size = history_size
        self.reconcile = reconcile
        self.conflict_policy = ConflictPolicy(conflict_policy)
        self.reconcile_hold = reconcile_hold
        self.reconcile_batch = reconcile_batch

    @classmethod
    def from_settings(cls, settings: Any) -> StoreOptions:
        return cls(
            probe_interval=settings.health_check_interval,
            probe_timeout=settings.probe_timeout,
            operation_timeout=settings.operation_timeout,
            unhealthy_threshold=settings.unhealthy_threshold,
            healthy_threshold=settings.healthy_threshold,
            breaker_threshold=settings.breaker_threshold,
            failback_delay=settings.failback_delay,
            history_size=settings.history_size,
            reconcile=settings.reconcile,
            conflict_policy=settings.conflict_policy,
            reconcile_hold=settings.reconcile_hold,
            reconcile_batch=settings.reconcile_batch,
        )


class FailoverStore(Generic[ClientT]):
    """One store (postgres, mongodb or redis) with its endpoints, switch and monitor."""

    def __init__(
        self,
        backend: Backend[ClientT],
        endpoints: list[Endpoint],
        options: StoreOptions,
        *,
        bus: EventBus | None = None,
        clock: Clock | None = None,
        capture: Capture | None = None,
        warm: WarmSync | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError(f"the {backend.store} store needs at least one endpoint")
        self.name = backend.store
        self.backend = backend
        self.options = options
        self.bus = bus or EventBus()
        self.clock = clock or SystemClock()
        self.endpoints: dict[Role, Endpoint] = {ep.role: ep for ep in endpoints}
        self._health: dict[Role, EndpointHealth] = {
            ep.role: EndpointHealth(
                ep,
                unhealthy_threshold=options.unhealthy_threshold,
                healthy_threshold=options.healthy_threshold,
                breaker_threshold=options.breaker_threshold,
                clock=self.clock,
                bus=self.bus,
            )
            for ep in endpoints
        }
        self._switch = Switch(
            self.name,
            self._health.get(Role.PRIMARY),
            self._health.get(Role.FALLBACK),
            failback_delay=options.failback_delay,
            clock=self.clock,
            bus=self.bus,
            history_size=options.history_size,
            reconcile_gate=capture is not None and len(endpoints) == 2,
        )
        self.monitor = Monitor(self, options.probe_interval)
        self.watchdog = Watchdog(self.clock)
        """Keeps every attempt of this store (operations, probes) on time, from one timer."""
        self.admission = Admission()
        self.reconciler: Reconciler | None = None
        if capture is not None and self._switch.reconcile_gate:
            self.reconciler = Reconciler(
                self,
                capture,
                policy=options.conflict_policy,
                hold=options.reconcile_hold,
                batch_size=options.reconcile_batch,
            )
        self.warm: WarmDriver | None = None
        if warm is not None and len(endpoints) == 2:
            self.warm = WarmDriver(self, warm, interval=min(options.probe_interval, 1.0))
            self._switch.lag_at_failover = self.warm.lag_at_failover
        self._counters = {"operations": 0, "retries": 0, "errors": 0}
        self._started = False
        self._closed = False
        self._confirming: dict[Role, asyncio.Task[Any]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._unsubscribe = self.bus.subscribe(self._on_event)

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Open clients, run the first probes, pick the starting endpoint, start the monitor."""
        if self._started:
            return
        for endpoint in self.endpoints.values():
            await self.backend.open(endpoint)
        await self.probe_round(evaluate=False)
        backlog = await self._prepare_reconcile()
        self._switch.initialize(reconcile_first=bool(backlog))
        if self._switch.state is SwitchState.RECONCILING and self.reconciler is not None:
            self.reconciler.kick()
        # Pools are filled only for endpoints that answered: a dead endpoint's pool
        # would spend its life reconnecting in the background.
        usable = [h.endpoint for h in self._health.values() if h.healthy]
        results = await asyncio.gather(
            *(self.backend.warm(ep, self.options.probe_timeout) for ep in usable), return_exceptions=True
        )
        for endpoint, result in zip(usable, results):
            if isinstance(result, BaseException):
                logger.warning("warming %s %s failed: %s", self.name, endpoint.name, self.describe(endpoint, result))
        self.monitor.start()
        if self.warm is not None:
            self.warm.start()
        self._started = True

    async def close(self) -> None:
        self._closed = True
        await self.monitor.stop()
        if self.warm is not None:
            await self.warm.stop()
        if self.reconciler is not None:
            await self.reconciler.stop()
            with contextlib.suppress(Exception):
                await self.reconciler.capture.close()
        # Let drains finish (they are bounded): a cancelled drain could leak the pool it took.
        if self._background:
            _done, pending = await asyncio.wait(set(self._background), timeout=self.options.operation_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for endpoint in self.endpoints.values():
            try:
                await self.backend.close(endpoint)
            except Exception:
                logger.exception("closing %s %s failed", self.name, endpoint.name)
        self._unsubscribe()
        self._started = False

    # --- probing --------------------------------------------------------------------------

    async def probe(self, role: Role) -> ProbeResult:
        """Probe one endpoint, never raising, bounded by the probe timeout."""
        endpoint = self.endpoints[role]
        started = time.monotonic()
        timeout = self.options.probe_timeout
        try:
            with AttemptClock(self.clock.monotonic() + timeout, watchdog=self.watchdog):
                writable = await self.backend.probe(endpoint)
        except TimeoutError:
            return ProbeResult(role, False, False, None, f"probe timed out after {self.options.probe_timeout:g}s", self.clock.monotonic())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return ProbeResult(role, False, False, None, self.describe(endpoint, exc), self.clock.monotonic())
        latency = time.monotonic() - started
        error = None if writable else "reachable but read-only (not a writable primary)"
        return ProbeResult(role, True, writable, latency, error, self.clock.monotonic())

    async def probe_round(self, evaluate: bool = True) -> None:
        """Probe every endpoint at once, record the results, then let the switch decide."""
        roles = list(self.endpoints)
        results = await asyncio.gather(*(self.probe(role) for role in roles))
        for result in results:
            self._health[result.role].record_probe(result)
        if not evaluate:
            return
        self._refresh_capture()
        primary = self._health.get(Role.PRIMARY)
        if (
            self._switch.state is SwitchState.ON_FALLBACK
            and self._switch.pinned is None
            and primary is not None
            and primary.healthy
            and primary.healthy_for() >= self._switch.failback_delay
        ):
            # Open the primary's pool before traffic lands on it.
            try:
                await self.backend.warm(primary.endpoint, self.options.probe_timeout)
            except Exception as exc:
                logger.warning("warming %s %s failed: %s", self.name, primary.endpoint.name, self.describe(primary.endpoint, exc))
                self._switch.evaluate(allow_failback=False)
                return
        self._switch.evaluate()
        self._maybe_reconcile()

    def _usable(self, role: Role) -> bool:
        probe = self._health[role].last_probe
        return bool(probe and probe.usable)

    async def _prepare_reconcile(self) -> int:
        """At start: install capture on a usable fallback; return the backlog seen (0 if unknown)."""
        reconciler = self.reconciler
        if reconciler is None or not self._usable(Role.FALLBACK):
            return 0
        try:
            async with asyncio.timeout(max(5.0, self.options.probe_timeout * 4)):
                await reconciler.prepare(self._usable(Role.PRIMARY))
        except TimeoutError:
            reconciler.last_error = f"installing change capture on {self.endpoints[Role.FALLBACK].name} timed out"
            logger.warning("%s: %s; retrying at the next probe round", self.name, reconciler.last_error)
        return reconciler.backlog or 0

    def _refresh_capture(self) -> None:
        """Keep capture installed (new tables) and the backlog known, without blocking the probe round."""
        reconciler = self.reconciler
        if reconciler is not None and self._usable(Role.FALLBACK):
            reconciler.refresh(self._usable(Role.PRIMARY))

    def _maybe_reconcile(self) -> None:
        """Start a run when the switch waits for one, or to sweep writes other processes left."""
        reconciler = self.reconciler
        if reconciler is None or reconciler.running or self._closed:
            return
        state = self._switch.state
        if state is SwitchState.RECONCILING:
            reconciler.kick()
        elif state is SwitchState.ON_PRIMARY and reconciler.backlog and self._health[Role.FALLBACK].healthy:
            reconciler.kick()

    # --- routing --------------------------------------------------------------------------

    async def run(
        self,
        operation: Callable[[Endpoint], Awaitable[T]],
        *,
        idempotent: bool = False,
        timeout: float | None = None,
        label: str = "operation",
        gated: bool = True,
    ) -> T:
        """Run *operation* on the active endpoint, retrying elsewhere when that is safe.

        *operation* receives the endpoint to use. It is retried on the other
        endpoint when the driver says it never reached the server, or, when
        *idempotent*, after any connection-level failure (the rules are the
        decision table of :mod:`failover.core.routing`). The whole call, retries
        included, is bounded by *timeout* (default: the operation timeout).
        While a reconcile holds the store's writes (its final catch-up) the call
        first waits for the hold to end; ``gated=False`` is for steps of a block
        that was already admitted (see :attr:`admission`).
        """
        if self._closed:
            raise ClosedError(f"the {self.name} store is closed")
        self._counters["operations"] += 1
        clock = self.clock
        now = clock.monotonic()
        budget = self.options.operation_timeout if timeout is None else timeout
        deadline = now + budget
        admission = self.admission
        if gated:
            if admission.held:
                await admission.wait(time.monotonic() + (deadline - now))
                now = clock.monotonic()
            admission.inflight += 1
        try:
            # The normal case, kept to the minimum: one attempt on the active endpoint,
            # its deadline watched by the store's watchdog (no timer of its own).
            switch = self._switch
            role = switch.active_role
            if role is None or now >= deadline:
                return await self._recover(operation, None, None, 0.0, idempotent, budget, deadline, label)
            end = deadline
            if idempotent and switch.alternative() is not None:
                # An idempotent operation keeps time for a second attempt elsewhere.
                remaining = deadline - now
                end = now + min(remaining, max(self.options.probe_timeout, remaining / 2))
            endpoint = self.endpoints[role]
            try:
                # A long wait makes the endpoint suspect: it is probed at once while this
                # attempt goes on waiting, so new operations leave a hung server early.
                with AttemptClock(
                    end,
                    suspect_at=now + self._suspect_after,
                    on_suspect=self.suspect,
                    suspect_args=(role, label),
                    watchdog=self.watchdog,
                ):
                    result = await operation(endpoint)
            except Exception as exc:
                return await self._recover(operation, exc, role, end - now, idempotent, budget, deadline, label)
            health = self._health[role]
            if health.consecutive_operation_failures:
                health.record_operation_success()
            _last_served.set(endpoint)
            return result
        finally:
            if gated:
                admission.leave()

    async def _recover(
        self,
        operation: Callable[[Endpoint], Awaitable[T]],
        exc: Exception | None,
        role: Role | None,
        attempt: float,
        idempotent: bool,
        budget: float,
        deadline: float,
        label: str,
    ) -> T:
        """Everything but the normal case: account for a failed attempt (*exc* on *role*, which had
        *attempt* seconds), let the decision table say what follows, try the other endpoints."""
        clock = self.clock
        tried: list[Role] = []
        failures: list[str] = []
        maybe_sent = False  # did any attempt get as far as possibly reaching a server?
        while True:
            if exc is not None and role is not None:
                endpoint = self.endpoints[role]
                if isinstance(exc, TimeoutError):
                    kind = ErrorKind.TIMEOUT
                    reason = f"{label} timed out on {endpoint.name} after {attempt:.2g}s"
                    # Slow is not dead (a long query, a lock): a probe decides.
                    self.suspect(role, reason)
                else:
                    kind = self.backend.classify(exc)
                    reason = "" if kind is ErrorKind.APPLICATION else self.describe(endpoint, exc)
                tried.append(role)
                maybe_sent = maybe_sent or kind is ErrorKind.OUTCOME_UNKNOWN or kind is ErrorKind.TIMEOUT
                action = decide(
                    kind,
                    idempotent=idempotent,
                    maybe_sent=maybe_sent,
                    elsewhere=self._has_candidate(tried),
                    time_left=clock.monotonic() < deadline,
                )
                if action is Action.SETTLE:
                    # Busy because of load, or because a hung server holds every connection?
                    # A confirmation probe may be deciding that right now: let it finish.
                    await self._settle(role, deadline)
                    action = decide(
                        kind,
                        idempotent=idempotent,
                        maybe_sent=maybe_sent,
                        elsewhere=self._has_candidate(tried),
                        time_left=clock.monotonic() < deadline,
                        switched_away=self._switch.active_role is not role,
                    )
                    reason = "every connection was busy and the store switched"
                elif kind is ErrorKind.NOT_SENT or kind is ErrorKind.OUTCOME_UNKNOWN:
                    self.record_failure(role, reason)
                if action is Action.RAISE_DRIVER_ERROR:
                    if kind is ErrorKind.APPLICATION:
                        self._health[role].record_operation_success()
                    raise exc
                failures.append(reason if kind is ErrorKind.TIMEOUT else f"{endpoint.name}: {reason}")
                if action is Action.RETRY_ELSEWHERE:
                    self._note_retry(role, reason)
                else:
                    self._counters["errors"] += 1
                    raise self._give_up(action, kind, endpoint, label, budget, deadline, failures, reason) from exc
            roles = [r for r in self._switch.candidates() if r not in tried]
            if not roles:
                self._counters["errors"] += 1
                raise NoEndpointAvailable(
                    f"{self.name}: no endpoint could take the {label}: " + ("; ".join(failures) or self._why_unavailable()),
                    store=self.name,
                    endpoint=self.endpoints[tried[-1]].name if tried else None,
                )
            role = roles[0]
            endpoint = self.endpoints[role]
            now = clock.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                self._counters["errors"] += 1
                action = Action.RAISE_TIMEOUT if maybe_sent else Action.RAISE_NOT_APPLIED
                raise self._give_up(action, None, endpoint, label, budget, deadline, failures)
            attempt = remaining
            if idempotent and self._has_candidate([*tried, role]):
                attempt = min(remaining, max(self.options.probe_timeout, remaining / 2))
            try:
                with AttemptClock(
                    now + attempt,
                    suspect_at=now + self._suspect_after,
                    on_suspect=self.suspect,
                    suspect_args=(role, label),
                    watchdog=self.watchdog,
                ):
                    result = await operation(endpoint)
            except Exception as caught:
                exc = caught
                continue
            self._health[role].record_operation_success()
            _last_served.set(endpoint)
            return result

    def _give_up(
        self,
        action: Action,
        kind: ErrorKind | None,
        endpoint: Endpoint,
        label: str,
        budget: float,
        deadline: float,
        failures: list[str],
        reason: str = "",
    ) -> Exception:
        """The exception that ends a routed operation for *action* (a ``RAISE_*`` of the table)."""
        name = self.name
        if action is Action.RAISE_OUTCOME_UNKNOWN:
            return OutcomeUnknown(
                f"{name}: connection to {endpoint.name} failed during the {label}; "
                f"it may or may not have been applied ({reason})",
                store=name,
                endpoint=endpoint.name,
            )
        if action is Action.RAISE_TIMEOUT and kind is ErrorKind.TIMEOUT:
            return OperationTimeout(
                f"{name}: {label} did not finish within {budget:g}s on {endpoint.name}; "
                f"it may or may not have been applied ({'; '.join(failures)})",
                store=name,
                endpoint=endpoint.name,
            )
        if action is Action.RAISE_NOT_APPLIED and self.clock.monotonic() < deadline:
            return NoEndpointAvailable(
                f"{name}: no endpoint could take the {label}: " + ("; ".join(failures) or self._why_unavailable()),
                store=name,
                endpoint=endpoint.name,
            )
        error_type = OperationTimeout if action is Action.RAISE_TIMEOUT else NoEndpointAvailable
        return error_type(
            f"{name}: {label} did not finish within {budget:g}s ({'; '.join(failures) or 'no attempt could start'})",
            store=name,
            endpoint=endpoint.name,
        )

    def lost_during(
        self,
        endpoint: Endpoint,
        exc: BaseException,
        label: str = "operation",
        *,
        maybe_sent: bool = True,
        not_applied: Callable[[str], BaseException] | None = None,
    ) -> BaseException:
        """Account for *exc* raised after an operation was handed to *endpoint* (a block that
        runs outside :meth:`run`, so nothing can be retried).

        Returns the exception the caller should raise, as the decision table says:
        the driver's own for application errors and known refusals,
        :class:`OperationTimeout` for a deadline, :class:`OutcomeUnknown` for a
        connection failure after the block may have applied something. When the
        caller knows nothing was applied (*maybe_sent* False: PostgreSQL before
        ``COMMIT``), a connection failure returns ``not_applied(reason)`` if given.
        """
        if isinstance(exc, TimeoutError):
            kind = ErrorKind.TIMEOUT
        else:
            kind = self.backend.classify(exc)
        action = decide(kind, idempotent=False, maybe_sent=maybe_sent, elsewhere=False, time_left=False, switched_away=False)
        if action is Action.RAISE_DRIVER_ERROR:
            return exc
        self._counters["errors"] += 1
        if action is Action.RAISE_TIMEOUT:
            self.suspect(endpoint.role, f"{label} timed out")
            return OperationTimeout(
                f"{self.name}: {label} on {endpoint.name} did not finish within its deadline; "
                "it may or may not have been applied",
                store=self.name,
                endpoint=endpoint.name,
            )
        reason = self.describe(endpoint, exc)
        self.record_failure(endpoint.role, reason)
        if action is Action.RAISE_OUTCOME_UNKNOWN:
            return OutcomeUnknown(
                f"{self.name}: connection to {endpoint.name} failed during the {label}; "
                f"it may or may not have been applied ({reason})",
                store=self.name,
                endpoint=endpoint.name,
            )
        # RAISE_NOT_APPLIED: a refusal (e.g. a read-only server) is said best by the driver's error.
        if not_applied is not None and kind is ErrorKind.OUTCOME_UNKNOWN:
            return not_applied(reason)
        return exc

    def record_failure(self, role: Role, reason: str) -> None:
        """A live operation failed at the connection level on *role*: feed the breaker."""
        if self._health[role].record_operation_failure(reason):
            self._switch.evaluate()
        self.monitor.wake()

    def suspect(self, role: Role, reason: str) -> None:
        """Something was slow on *role*: probe it at once and trip its breaker if the probe fails.

        Timeouts alone never trip a breaker: a slow report or a lock wait is not a
        dead server. One confirmation probe per endpoint runs at a time.
        """
        if role in self._confirming or self._closed or self._health[role].healthy is False:
            return
        async def confirm() -> None:
            try:
                result = await self.probe(role)
                if not result.usable:
                    self.record_failure(role, f"slow {reason}, then a probe failed: {result.error}")
            finally:
                self._confirming.pop(role, None)

        task = self._spawn(confirm(), f"confirm {role}")
        if task is not None:
            self._confirming[role] = task

    def pending_confirmation(self, role: Role) -> asyncio.Task[Any] | None:
        """The confirmation probe of *role* under way, if any (see :meth:`suspect`)."""
        return self._confirming.get(role)

    async def _settle(self, role: Role, deadline: float) -> None:
        """Wait (until *deadline*) for a confirmation probe of *role* that is under way."""
        task = self._confirming.get(role)
        if task is None:
            return
        try:
            with AttemptClock(deadline, watchdog=self.watchdog):
                await asyncio.shield(task)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our caller is being cancelled, not the probe

    @property
    def _suspect_after(self) -> float:
        return min(DEFAULT_SUSPECT_AFTER, self.options.probe_timeout / 2)

    def _has_candidate(self, tried: list[Role]) -> bool:
        return any(r not in tried for r in self._switch.candidates())

    def _note_retry(self, role: Role, reason: str) -> None:
        self._counters["retries"] += 1
        self.bus.emit(
            OperationRetried(store=self.name, at=self.clock.wall(), from_role=role, to_role=role.other, reason=reason)
        )

    def _why_unavailable(self) -> str:
        return "; ".join(f"{h.endpoint.name}: {h.reason}" for h in self._health.values())

    def describe(self, endpoint: Endpoint, exc: BaseException) -> str:
        """A one-line, password-free description of *exc* in plain words (no class names)."""
        return describe_exception(exc, endpoint.secrets)

    # --- events ---------------------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        if not isinstance(event, StateChanged) or event.store != self.name:
            return
        if event.to_state is SwitchState.RECONCILING and self.reconciler is not None:
            self.reconciler.kick()
        previous = _active_role(event.from_state)
        current = _active_role(event.to_state)
        if previous is not None and previous is not current and previous in self.endpoints:
            # Drop pooled connections to the endpoint we left, so no request keeps using it.
            self._spawn(self.backend.drain(self.endpoints[previous]), f"drain {previous}")

    def _spawn(self, coro: Awaitable[Any], what: str) -> asyncio.Task[Any] | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        task = loop.create_task(_logged(coro, f"{self.name}: {what}"))  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- status ---------------------------------------------------------------------------

    @property
    def active_endpoint(self) -> Endpoint | None:
        """The endpoint serving traffic now, or None when the store is unavailable."""
        role = self._switch.active_role
        return self.endpoints[role] if role is not None else None

    @property
    def state(self) -> SwitchState:
        """The switch's state now (a value; :meth:`snapshot` freezes everything else)."""
        return self._switch.state

    @property
    def active_role(self) -> Role | None:
        """The role operations go to now; None while no endpoint is usable."""
        return self._switch.active_role

    @property
    def preferred_role(self) -> Role:
        """The role this store runs on when it can (the primary, when it has one)."""
        return self._switch.preferred_role

    def pin(self, role: Role | None) -> None:
        """Force this store onto *role*; ``None`` returns it to automatic mode."""
        self._switch.pin(role)

    def record_success(self, role: Role) -> None:
        """An operation outside :meth:`run` (a driver-level block) succeeded on *role*."""
        self._health[role].record_operation_success()

    def count_error(self) -> None:
        """An error surfaced to the caller by a block that runs outside :meth:`run`."""
        self._counters["errors"] += 1

    def snapshot(self) -> StoreSnapshot:
        """This store now, frozen: what status, readiness, metrics and the dashboard read."""
        switch = self._switch
        return StoreSnapshot(
            store=self.name,
            taken_at=self.clock.monotonic(),
            state=switch.state,
            active_role=switch.active_role,
            preferred_role=switch.preferred_role,
            pinned=switch.pinned,
            endpoints=frozen({role: EndpointSnapshot.of(h) for role, h in self._health.items()}),
            counters=frozen(dict(self._counters, switches=switch.switches)),
            transitions=tuple(reversed(switch.history)),
            reconcile=frozen(self.reconciler.snapshot() if self.reconciler is not None else {"enabled": False}),
            warm=frozen(self.warm.snapshot() if self.warm is not None else {"enabled": False, "state": "off", "lag_s": None}),
        )

    def status(self) -> dict[str, Any]:
        """The seed-shaped status of this store, with details under extra keys (see :meth:`snapshot`)."""
        return self.snapshot().to_status()


def _active_role(state: SwitchState) -> Role | None:
    if state is SwitchState.ON_PRIMARY:
        return Role.PRIMARY
    if state in (SwitchState.ON_FALLBACK, SwitchState.RECONCILING):
        return Role.FALLBACK
    return None


async def _logged(coro: Awaitable[Any], what: str) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("%s failed", what)
