"""The decision table of core/routing.py, row by row (a pure function: no store, no clock)."""

from __future__ import annotations

import pytest

from failover.core.routing import Action, ErrorKind, decide

A, B, N, O, T = ErrorKind.APPLICATION, ErrorKind.BUSY, ErrorKind.NOT_SENT, ErrorKind.OUTCOME_UNKNOWN, ErrorKind.TIMEOUT


@pytest.mark.parametrize(
    ("kind", "idempotent", "maybe_sent", "elsewhere", "time_left", "switched_away", "action"),
    [
        # the server answered: never ours to retry
        (A, True, True, True, True, None, Action.RAISE_DRIVER_ERROR),
        # busy: wait for the confirmation, then follow the switch or hand the load back
        (B, False, False, True, True, None, Action.SETTLE),
        (B, False, False, True, True, False, Action.RAISE_DRIVER_ERROR),
        (B, False, False, True, True, True, Action.RETRY_ELSEWHERE),
        (B, False, False, False, True, True, Action.RAISE_NOT_APPLIED),
        # never sent: elsewhere while there is time
        (N, False, False, True, True, None, Action.RETRY_ELSEWHERE),
        (N, False, False, False, True, None, Action.RAISE_NOT_APPLIED),
        (N, False, False, True, False, None, Action.RAISE_NOT_APPLIED),
        (N, True, True, True, False, None, Action.RAISE_TIMEOUT),  # an earlier attempt may have applied it
        # sent, then lost
        (O, False, True, True, True, None, Action.RAISE_OUTCOME_UNKNOWN),
        (O, True, True, True, True, None, Action.RETRY_ELSEWHERE),
        (O, True, True, False, True, None, Action.RAISE_NOT_APPLIED),
        (O, False, False, False, True, None, Action.RAISE_NOT_APPLIED),  # PostgreSQL: COMMIT never sent
        # the attempt's deadline
        (T, False, True, True, True, None, Action.RAISE_TIMEOUT),
        (T, True, True, True, True, None, Action.RETRY_ELSEWHERE),
        (T, True, True, False, True, None, Action.RAISE_TIMEOUT),
        (T, True, True, True, False, None, Action.RAISE_TIMEOUT),
    ],
)
def test_decision_table(
    kind: ErrorKind, idempotent: bool, maybe_sent: bool, elsewhere: bool, time_left: bool, switched_away: bool | None, action: Action
) -> None:
    got = decide(
        kind, idempotent=idempotent, maybe_sent=maybe_sent, elsewhere=elsewhere, time_left=time_left, switched_away=switched_away
    )
    assert got is action


def test_every_input_has_exactly_one_action() -> None:
    for kind in ErrorKind:
        for flags in range(16):
            idempotent, maybe_sent, elsewhere, time_left = (bool(flags & bit) for bit in (1, 2, 4, 8))
            for switched_away in (None, False, True):
                assert isinstance(decide(kind, idempotent=idempotent, maybe_sent=maybe_sent, elsewhere=elsewhere,
                                         time_left=time_left, switched_away=switched_away), Action)
