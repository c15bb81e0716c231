"""Pure-logic tests of the MongoDB store: URL handling, error classification, the sentinel."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    DuplicateKeyError,
    InvalidOperation,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WaitQueueTimeoutError,
)

from failover.core.store import ErrorKind
from failover.stores.mongodb import MongoBackend, RoutedQuery, client_options
from failover.stores.mongodb.backend import _NotSent
from failover.stores.mongodb.sentinel import _Sentinel
from failover.stores.mongodb.urls import _single_host


@pytest.mark.parametrize(
    ("url", "direct"),
    [
        ("mongodb://127.0.0.1:27017", True),
        ("mongodb://user:p%40ss@db.example.com/app?authSource=admin", True),
        ("mongodb://a:1,b:2/?replicaSet=rs0", False),
        ("mongodb://a:1/?replicaSet=rs0", False),
        ("mongodb+srv://user:pw@cluster0.abcde.mongodb.net/app", False),
        ("mongodb://a:1/?directConnection=false", False),
        ("mongodb://a:1/?loadBalanced=true", False),
    ],
)
def test_direct_connection_only_for_one_plain_server(url: str, direct: bool) -> None:
    options = client_options(url, connect_timeout=0.5, pool_min_size=0, pool_max_size=5)
    assert options.get("directConnection", False) is direct
    assert options["serverSelectionTimeoutMS"] == 500
    assert options["connectTimeoutMS"] == 500
    assert options["maxPoolSize"] == 5


def test_explicit_direct_connection_in_the_url_wins() -> None:
    options = client_options("mongodb://a:1/?directConnection=true", connect_timeout=1, pool_min_size=0, pool_max_size=1)
    assert "directConnection" not in options  # left to the URL


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("mongodb://127.0.0.1:4000/?directConnection=true", ("127.0.0.1", 4000)),
        ("mongodb://u:pw@host.example", ("host.example", 27017)),
        ("mongodb://[::1]:4001/app", ("::1", 4001)),
        ("mongodb://%2Ftmp%2Fmongodb-27017.sock", None),
        ("mongodb://a:1,b:2", None),
        ("mongodb+srv://cluster0.mongodb.net", None),
    ],
)
def test_sentinel_address(url: str, address: tuple[str, int] | None) -> None:
    assert _single_host(url) == address


def _not_primary(code: int) -> NotPrimaryError:
    return NotPrimaryError("not primary", {"code": code, "errmsg": "not primary", "ok": 0})


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_NotSent("cannot connect"), ErrorKind.NOT_SENT),
        (ServerSelectionTimeoutError("no servers"), ErrorKind.NOT_SENT),
        (_not_primary(10107), ErrorKind.NOT_SENT),  # NotWritablePrimary: refused before executing
        (_not_primary(13435), ErrorKind.NOT_SENT),
        (_not_primary(11600), ErrorKind.OUTCOME_UNKNOWN),  # InterruptedAtShutdown: may have started
        (_not_primary(189), ErrorKind.OUTCOME_UNKNOWN),  # PrimarySteppedDown
        (InvalidOperation("Cannot use AsyncMongoClient after close"), ErrorKind.NOT_SENT),
        (AutoReconnect("connection closed"), ErrorKind.OUTCOME_UNKNOWN),
        (NetworkTimeout("timed out"), ErrorKind.OUTCOME_UNKNOWN),
        (ConnectionResetError(), ErrorKind.OUTCOME_UNKNOWN),
        (WaitQueueTimeoutError("pool saturated"), ErrorKind.BUSY),
        (DuplicateKeyError("E11000", 11000), ErrorKind.APPLICATION),
        (OperationFailure("bad query", 2), ErrorKind.APPLICATION),
        (BulkWriteError({"writeErrors": [], "nInserted": 0}), ErrorKind.APPLICATION),
        (ValueError("bad argument"), ErrorKind.APPLICATION),
    ],
)
def test_classify(exc: BaseException, kind: ErrorKind) -> None:
    assert MongoBackend().classify(exc) is kind


def test_sentinel_sees_the_peer_hang_up() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    sentinel = _Sentinel(ours)
    try:
        assert sentinel.alive()
        assert sentinel.alive()  # peeking consumes nothing
        theirs.close()
        assert not sentinel.alive()
    finally:
        sentinel.close()


def test_backend_validates_its_configuration() -> None:
    with pytest.raises(ValueError, match="pool_max_size must be greater or equal than pool_min_size"):
        MongoBackend(pool_min_size=5, pool_max_size=2)
    with pytest.raises(ValueError, match="connect_timeout"):
        MongoBackend(connect_timeout=0)


def test_query_modifiers_and_output_stages() -> None:
    from failover.stores.mongodb import RoutedCollection

    collection: Any = RoutedCollection.__new__(RoutedCollection)
    query = RoutedQuery(collection, "find", ({},), {})
    assert query.sort("k").limit(2).skip(1) is query
    assert [m[0] for m in query._modifiers] == ["sort", "limit", "skip"]
    with pytest.raises(AttributeError):
        query.not_a_cursor_method  # noqa: B018
    assert RoutedCollection.aggregate(collection, [{"$match": {}}])._idempotent is True
    assert RoutedCollection.aggregate(collection, [{"$match": {}}, {"$out": "x"}])._idempotent is False
    assert RoutedCollection.aggregate(collection, [{"$merge": {"into": "x"}}])._idempotent is False


def test_a_refused_multi_batch_write_is_of_unknown_outcome() -> None:
    from failover.stores.mongodb.backend import _MaybePartlyApplied

    assert MongoBackend().classify(_MaybePartlyApplied("refused part-way")) is ErrorKind.OUTCOME_UNKNOWN
