"""Reasons shown to users (status ``last_error``, transitions, dashboard) are plain words."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from failover.core.reasons import describe_exception
from failover.stores.redis import CommandNotSent


class _NotSent(Exception):
    """Like the stores' internal routing signals."""


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_NotSent("cannot connect: connection refused"), "cannot connect: connection refused"),
        (
            CommandNotSent("ConnectionError: Error 111 connecting to 127.0.0.1:6379. Connection refused. (nothing was sent to Upstash)"),
            "cannot connect to 127.0.0.1:6379: connection refused (nothing was sent to Upstash)",
        ),
        (RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."), "cannot connect to 127.0.0.1:6379: connection refused"),
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection reset by the server"),
        (TimeoutError(), "timed out"),
        (asyncio.TimeoutError(), "timed out"),
        (_NotSent(), "not sent"),
        (
            Exception("127.0.0.1:1: [Errno 111] Connection refused (configured timeouts: connectTimeoutMS: 500.0ms), "
                      "Timeout: 0.5s, Topology Description: <TopologyDescription id: 1, servers: [<ServerDescription>]>"),
            "127.0.0.1:1: Connection refused (configured timeouts: connectTimeoutMS: 500.0ms), Timeout: 0.5s",
        ),
        (RuntimeError("DNS lookup failed\nsecond line"), "DNS lookup failed"),
    ],
)
def test_reasons_speak_plain_words(exc: BaseException, expected: str) -> None:
    assert describe_exception(exc) == expected


def test_no_class_name_reaches_the_user_and_no_secret_either() -> None:
    exc = CommandNotSent("ConnectionError: Error -2 connecting to redis://:hunter2@cache.example:6379. Name or service not known.")
    text = describe_exception(exc, ("hunter2",))
    assert "hunter2" not in text
    for name in ("CommandNotSent", "ConnectionError", "_NotSent"):
        assert name not in text
    assert len(describe_exception(Exception("x" * 1000))) == 300


def test_the_store_describes_errors_without_class_names() -> None:
    from failover.core.endpoint import Endpoint, Role
    from failover.core.store import FailoverStore

    endpoint = Endpoint(store="redis", role=Role.PRIMARY, name="Upstash", url="rediss://default:tok-9@x.upstash.io:6379")
    text = FailoverStore.describe(None, endpoint, CommandNotSent("ConnectionError: Error 111 connecting to x.upstash.io:6379. Connection refused."))  # type: ignore[arg-type]
    assert text == "cannot connect to x.upstash.io:6379: connection refused"
