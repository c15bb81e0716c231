"""What to do after a failed attempt: one pure decision table.

Every path that runs an operation on an endpoint ends a failure here: the router
(:meth:`FailoverStore.run`) for each attempt, and the blocks that run outside it
(a PostgreSQL ``connection()`` block, a Redis pipeline bound by ``WATCH``) through
:meth:`FailoverStore.lost_during`. The table only maps facts to an action; the
caller does the accounting and builds the exception its context calls for.

The facts:

* ``kind`` — what the failure means (:class:`~failover.core.store.ErrorKind`,
  or ``TIMEOUT`` when the attempt's own deadline ran out);
* ``idempotent`` — running the operation twice is harmless;
* ``maybe_sent`` — this attempt or an earlier one may have applied the operation
  (a failure after sending; for a PostgreSQL block: ``COMMIT`` was sent);
* ``elsewhere`` — another endpoint, not tried yet, may take the operation;
* ``time_left`` — the operation's deadline has not passed;
* ``switched_away`` — for ``BUSY`` only: None while a confirmation probe may still
  decide, then whether the store moved off the endpoint (a hung server held the pool).

The table (first matching row wins)::

    kind          condition                                        action
    ------------  -----------------------------------------------  -----------------------
    APPLICATION   -                                                RAISE_DRIVER_ERROR
    BUSY          switched_away is None                            SETTLE
    BUSY          switched_away is False                           RAISE_DRIVER_ERROR
    TIMEOUT       not idempotent                                   RAISE_TIMEOUT
    OUTCOME_UNK.  not idempotent and maybe_sent                    RAISE_OUTCOME_UNKNOWN
    any           elsewhere and time_left                          RETRY_ELSEWHERE
    TIMEOUT       -                                                RAISE_TIMEOUT
    any           elsewhere (so: no time left) and maybe_sent      RAISE_TIMEOUT
    any           -                                                RAISE_NOT_APPLIED
"""

from __future__ import annotations

import enum

__all__ = ["Action", "ErrorKind", "NotSent", "decide"]


class NotSent(Exception):
    """A backend stopped an operation before anything of it reached the server.

    Every backend's ``classify`` says ``NOT_SENT`` for it. A store whose exception may
    reach a caller adds its driver's error class, so that code catching the driver's
    errors still catches it (``class CommandNotSent(NotSent, RedisError)``).
    """


class ErrorKind(enum.Enum):
    """What a failure means for routing (a backend's ``classify`` says which, except ``TIMEOUT``)."""

    NOT_SENT = "not_sent"
    """The operation never reached the server (refused, pool empty, dead pooled socket): retry elsewhere."""
    OUTCOME_UNKNOWN = "outcome_unknown"
    """The connection broke after the operation was sent: it may have been applied."""
    APPLICATION = "application"
    """The server answered with an error about the operation itself: not our business."""
    BUSY = "busy"
    """Every pooled connection stayed busy; nothing was sent. Load is not a failure, so no
    breaker trips and nothing moves, unless the endpoint turns out to be hung: then the
    operation follows the switch to the other endpoint."""
    TIMEOUT = "timeout"
    """The attempt's own deadline ran out (set by the router, never by a backend): it may
    have been applied, and a slow server is not a dead one (a probe decides)."""


class Action(enum.Enum):
    """What the caller does with a failed attempt."""

    RETRY_ELSEWHERE = "retry_elsewhere"
    """Run the operation on the next endpoint (it was not applied, or applying it twice is harmless)."""
    SETTLE = "settle"
    """Wait (within the deadline) for the endpoint's confirmation probe, then decide again."""
    RAISE_DRIVER_ERROR = "raise_driver_error"
    """Re-raise the driver's exception: the server answered (or the pool is merely busy)."""
    RAISE_OUTCOME_UNKNOWN = "raise_outcome_unknown"
    """The operation may or may not have been applied: :class:`~failover.errors.OutcomeUnknown`."""
    RAISE_TIMEOUT = "raise_timeout"
    """The deadline passed after the operation may have been sent: :class:`~failover.errors.OperationTimeout`."""
    RAISE_NOT_APPLIED = "raise_not_applied"
    """Nothing was applied and nowhere is left to try: the router raises
    :class:`~failover.errors.NoEndpointAvailable`; a block re-raises the driver's error
    (PostgreSQL: :class:`~failover.errors.TransactionRolledBack`)."""


def decide(
    kind: ErrorKind,
    *,
    idempotent: bool,
    maybe_sent: bool,
    elsewhere: bool,
    time_left: bool,
    switched_away: bool | None = None,
) -> Action:
    """The action for one failed attempt (see the module's table). Pure: no side effects."""
    if kind is ErrorKind.APPLICATION:
        return Action.RAISE_DRIVER_ERROR
    if kind is ErrorKind.BUSY:
        if switched_away is None:
            return Action.SETTLE
        if not switched_away:
            return Action.RAISE_DRIVER_ERROR
    elif kind is ErrorKind.TIMEOUT:
        if not idempotent:
            return Action.RAISE_TIMEOUT
    elif kind is ErrorKind.OUTCOME_UNKNOWN:
        if not idempotent and maybe_sent:
            return Action.RAISE_OUTCOME_UNKNOWN
    if elsewhere and time_left:
        return Action.RETRY_ELSEWHERE
    if kind is ErrorKind.TIMEOUT:
        return Action.RAISE_TIMEOUT
    if elsewhere and maybe_sent:
        return Action.RAISE_TIMEOUT
    return Action.RAISE_NOT_APPLIED
