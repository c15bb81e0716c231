"""Every public method of the drivers' client objects is on ours, or refused with a reason.

These enumerate the installed redis-py and PyMongo (CI runs them on the newest and on the
oldest supported releases), so a driver release that adds a method fails here until it
is routed or refused on purpose.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from redis.asyncio import Redis

from failover import NotRoutable
from failover.stores.mongodb import RoutedCollection, RoutedDatabase
from failover.stores.redis import RedisStore
from failover.stores.redis.surface import NOT_ROUTED

# Attributes PyMongo sets per instance; ours are set in __init__ too.
MONGO_INSTANCE_ATTRIBUTES = {"name", "database", "full_name"}


def public(cls: type) -> list[str]:
    return sorted(name for name in dir(cls) if not name.startswith("_"))


def parameters(function: Any) -> list[str]:
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind is not p.VAR_KEYWORD]


@pytest.mark.parametrize("name", public(Redis))
def test_every_redis_method_is_on_dbs_redis_with_redis_pys_parameters(name: str) -> None:
    ours = inspect.getattr_static(RedisStore, name, None)
    assert ours is not None, f"redis.asyncio.Redis.{name} is missing on RedisStore: route it or add it to NOT_ROUTED"
    theirs = inspect.getattr_static(Redis, name)
    if isinstance(theirs, property) or not callable(getattr(Redis, name)):
        return
    if name == "execute_command" or name == "pipeline" or name == "scan_iter":
        return  # ours take redis-py's arguments through *args/**kwargs or name them the same
    missing = [p for p in parameters(getattr(Redis, name)) if p not in parameters(getattr(RedisStore, name))]
    ours_accepts_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(getattr(RedisStore, name)).parameters.values())
    assert not missing or ours_accepts_any, f"RedisStore.{name} lacks redis-py's parameters {missing}"


@pytest.mark.parametrize("name", sorted(NOT_ROUTED))
def test_refused_redis_methods_name_themselves_and_say_why(name: str) -> None:
    store = object.__new__(RedisStore)
    with pytest.raises(NotRoutable) as refused:
        attribute = getattr(store, name)
        attribute()
    assert f"{name}()" in str(refused.value) and refused.value.method == name
    assert len(NOT_ROUTED[name]) > 30


@pytest.mark.parametrize(("driver", "ours"), [(AsyncDatabase, RoutedDatabase), (AsyncCollection, RoutedCollection)])
def test_every_pymongo_method_is_on_the_routed_objects(driver: type, ours: type) -> None:
    missing = [
        name
        for name in public(driver)
        if name not in MONGO_INSTANCE_ATTRIBUTES and inspect.getattr_static(ours, name, None) is None
    ]
    assert not missing, f"{driver.__name__} methods missing on {ours.__name__}: {missing}"


@pytest.mark.parametrize(("driver", "ours"), [(AsyncDatabase, RoutedDatabase), (AsyncCollection, RoutedCollection)])
def test_async_pymongo_methods_stay_async(driver: type, ours: type) -> None:
    """A coroutine in PyMongo is awaitable on ours (find() and aggregate() return awaitable queries)."""
    for name in public(driver):
        theirs = inspect.getattr_static(driver, name)
        mine = inspect.getattr_static(ours, name, None)
        if mine is None or not inspect.iscoroutinefunction(theirs) or name == "aggregate" and ours is RoutedCollection:
            continue
        assert inspect.iscoroutinefunction(mine), f"{ours.__name__}.{name} must be awaitable like PyMongo's"
