"""``dbs.redis.lock()``: redis-py's ``Lock``, routed, and honest about failovers.

A Redis lock is a key on one server. The fallback does not have the primary's
keys (Upstash has no replication to it), so a lock taken on the primary does not
exist on the fallback: after a failover another client can take "the same" lock
there at once, and after a failback the primary may still hold a lock that
expired or was taken again meanwhile. No lock survives a change of server with
its guarantee intact, so failover does not pretend it does:

* a lock is tied to the *role epoch* in which it was acquired: the number of
  times the store's active endpoint changed (to the other endpoint, or to none);
* ``owned()``, ``extend()``, ``reacquire()`` and ``release()`` of a lock acquired
  in an earlier epoch raise :class:`LockLostInFailover` (a redis-py
  ``LockNotOwnedError``, so code that already handles a lock that expired under
  it handles this too), and the lock forgets its token;
* ``acquire()`` always runs on the endpoint active at that moment, so new
  acquisitions (and ``async with lock:`` blocks entered after the switch) work.

A lock whose ``SET NX`` raced with a switch (sent to one endpoint, the store
moved before the reply) counts as lost at once, on its first check.

The lock's own commands (``SET NX PX``, the release and extend scripts) are
ordinary routed commands: an ``OutcomeUnknown`` can reach ``acquire()`` when the
primary dies under it, exactly as for any other non-idempotent write.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio.lock import Lock
from redis.exceptions import LockNotOwnedError

from ...core.endpoint import Role
from ...core.events import StateChanged, SwitchState
from ...core.store import FailoverStore, last_served

__all__ = ["FailoverLock", "LockLostInFailover", "RoleEpoch", "failover_lock_class"]

logger = logging.getLogger("failover.redis.lock")


class LockLostInFailover(LockNotOwnedError):
    """The lock was acquired on an endpoint the store has since left: it guards nothing now."""


def active_role(state: SwitchState) -> Role | None:
    """The endpoint role that serves traffic in *state* (None: unavailable)."""
    if state is SwitchState.ON_PRIMARY:
        return Role.PRIMARY
    if state in (SwitchState.ON_FALLBACK, SwitchState.RECONCILING):
        return Role.FALLBACK
    return None


class RoleEpoch:
    """Counts the changes of a store's active endpoint (to the other one, or to none).

    ``ON_FALLBACK → RECONCILING`` keeps the same endpoint and is not a change;
    ``ON_PRIMARY → UNAVAILABLE → ON_PRIMARY`` is two: the server may have
    restarted and lost every key in between.
    """

    def __init__(self, store: FailoverStore[Any]) -> None:
        self.store = store
        self.value = 0
        self.last_change: StateChanged | None = None
        self._unsubscribe = store.bus.subscribe(self._on_event)

    def _on_event(self, event: Any) -> None:
        if isinstance(event, StateChanged) and event.store == self.store.name:
            if active_role(event.from_state) is not active_role(event.to_state):
                self.value += 1
                self.last_change = event

    def close(self) -> None:
        self._unsubscribe()


class FailoverLock(Lock):
    """redis-py's ``redis.asyncio.lock.Lock`` tied to the endpoint it was acquired on.

    Build it with ``dbs.redis.lock(name, ...)`` (the arguments are redis-py's).
    See the module docstring for what happens across a switch.
    """

    redis: Any

    def _epochs(self) -> RoleEpoch:
        return self.redis._role_epoch()  # type: ignore[no-any-return]

    async def do_acquire(self, token: str | bytes) -> bool:
        epochs = self._epochs()
        before = epochs.value
        acquired = await super().do_acquire(token)
        if acquired:
            served = last_served()
            current = self.redis.failover.active_role
            if epochs.value != before and (served is None or served.role is not current):
                # The SET went to an endpoint the store left while it was in flight.
                self.local.epoch = -1
                self.local.acquired_on = served.name if served is not None else None
            else:
                self.local.epoch = epochs.value
                self.local.acquired_on = served.name if served is not None else None
        return acquired

    def _check(self, action: str) -> None:
        """Raise :class:`LockLostInFailover` when the lock was acquired before a switch."""
        if self.local.token is None:
            return
        epochs = self._epochs()
        epoch = getattr(self.local, "epoch", None)
        if epoch is None or epoch == epochs.value:
            return
        self.local.token = None
        where = getattr(self.local, "acquired_on", None) or "an endpoint"
        change = epochs.last_change
        now = self.redis.failover.active_endpoint
        message = (
            f"cannot {action} the lock {self.name!r}: it was acquired on {where}, and the redis store "
            f"has switched since ({change.from_state} -> {change.to_state}: {change.reason}) "
            if change is not None
            else f"cannot {action} the lock {self.name!r}: it was acquired on {where} while the redis store was switching "
        )
        message += (
            f"to {now.name if now is not None else 'no endpoint'}; a lock does not survive a failover "
            "(another client may hold it now): treat the work it guarded as unprotected and acquire it again"
        )
        logger.warning("%s", message)
        # redis-py types lock_name as str; it passes its own Lock.name (str or bytes) there too.
        raise LockLostInFailover(message, lock_name=self.name)  # type: ignore[arg-type]

    async def owned(self) -> bool:
        self._check("check")
        return await super().owned()

    async def do_release(self, expected_token: bytes) -> None:
        if getattr(self.local, "epoch", None) not in (None, self._epochs().value):
            # redis-py 5.x clears local.token before do_release: check with the token put back.
            self.local.token = self.local.token or expected_token
            self._check("release")
        await super().do_release(expected_token)

    async def do_extend(self, additional_time: Any, replace_ttl: Any) -> Any:
        self._check("extend")
        return await super().do_extend(additional_time, replace_ttl)

    async def do_reacquire(self) -> Any:
        self._check("reacquire")
        return await super().do_reacquire()


_CLASSES: dict[type[Lock], type[Lock]] = {}


def failover_lock_class(lock_class: type[Lock] | None) -> type[Lock]:
    """The lock class to build: *lock_class* (a redis-py ``Lock`` subclass) with failover's checks."""
    if lock_class is None or lock_class is Lock or lock_class is FailoverLock:
        return FailoverLock
    if issubclass(lock_class, FailoverLock):
        return lock_class
    found = _CLASSES.get(lock_class)
    if found is None:
        found = _CLASSES[lock_class] = type(f"Failover{lock_class.__name__}", (FailoverLock, lock_class), {})
    return found
