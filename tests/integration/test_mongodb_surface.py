"""PyMongo's wider surface on the routed database and collections, sessions, and Beanie 2.x
(models and the example app) across a kill and a restart of the MongoDB primary, on nx-27017."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from beanie import Document, Indexed, init_beanie
from bson import DBRef
from pymongo import AsyncMongoClient, WriteConcern
from pymongo.errors import DuplicateKeyError

from failover import Databases, SwitchState
from failover.local import LocalServer
from tests.helpers import FAST, fast_settings, wait_for
from tests.integration.test_service import serving

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "beanie_app.py"


async def start(primary: LocalServer, fallback: LocalServer, **extra: Any) -> Databases:
    dbs = Databases(fast_settings(MONGODB_ATLAS_URL=primary.url, MONGODB_URL=fallback.url, **extra))
    await dbs.start()
    return dbs


def state(dbs: Databases) -> SwitchState:
    return dbs.store("mongodb").state


async def count_on(server: LocalServer, collection: str, database: str = "app") -> int:
    client: AsyncMongoClient[Any] = AsyncMongoClient(server.url, directConnection=True, serverSelectionTimeoutMS=2000)
    try:
        return int(await client[database][collection].count_documents({}))
    finally:
        await client.close()


async def test_database_and_collection_methods_beyond_crud(mongo_pair: tuple[LocalServer, LocalServer]) -> None:
    # Warm off: warm sync watches every collection of the primary, and on nx-27017 watch()
    # creates its collection: a drop landing between the sync's existence check and its watch()
    # can still be undone (see test_mongodb_warm). This test is about the routed DDL methods.
    dbs = await start(*mongo_pair, FAILOVER_WARM="off")
    try:
        db = dbs.mongodb.database
        created = await db.create_collection("things")
        assert created.name == "things"
        assert "things" in await db.list_collection_names()
        names = [c["name"] async for c in await db.list_collections()]
        assert "things" in names
        await created.insert_one({"_id": 1, "n": 1})
        assert [d["_id"] async for d in created.find({})] == [1]
        assert await anext(created.find({}), None) == {"_id": 1, "n": 1}
        await created.create_index("n", unique=True)
        info = await created.index_information()
        assert [("n", 1)] in [spec["key"] for spec in info.values()]
        indexes = await created.list_indexes()
        assert len(await indexes.to_list()) == 2
        assert isinstance(await created.options(), dict)
        batches = [b async for b in created.find_raw_batches({})]
        assert batches and isinstance(batches[0], bytes)
        careful = created.with_options(write_concern=WriteConcern(w=1))
        assert careful.write_concern == WriteConcern(w=1) and careful.name == "things"
        assert await db.dereference(DBRef("things", 1)) == {"_id": 1, "n": 1}
        await created.drop_indexes()
        assert len(await created.index_information()) == 1
        assert (await db["other"].insert_one({"a": 1})).acknowledged
        assert (await db["other"].rename("renamed"))["ok"] == 1  # (what nx-27017 then does with it is its own)
        assert await db.drop_collection("things") is not None
        assert "things" not in await db.list_collection_names()
        with pytest.raises(TypeError):
            next(db)  # type: ignore[call-overload]

        async with dbs.mongodb.start_session() as session:
            await db["s"].insert_one({"_id": "x"}, session=session)
            assert await db["s"].find_one({"_id": "x"}, session=session) == {"_id": "x"}
    finally:
        await dbs.close()


class Item(Document):
    name: Indexed(str, unique=True)  # type: ignore[valid-type]
    qty: int = 0

    class Settings:
        name = "items"


async def test_beanie_models_work_across_a_failover_and_a_failback(mongo_pair: tuple[LocalServer, LocalServer]) -> None:
    primary, fallback = mongo_pair
    dbs = await start(primary, fallback)
    try:
        await init_beanie(database=dbs.mongodb.database, document_models=[Item])
        await Item(name="before", qty=1).insert()
        with pytest.raises(DuplicateKeyError):
            await Item(name="before").insert()  # the unique index Beanie made on the primary

        primary.kill()
        deadline = time.monotonic() + 15
        inserted_during: list[str] = []
        while state(dbs) is not SwitchState.ON_FALLBACK or len(inserted_during) < 3:
            assert time.monotonic() < deadline, state(dbs)
            name = f"during-{len(inserted_during)}"
            try:
                await Item(name=name, qty=2).insert()
                inserted_during.append(name)
            except Exception:
                pass  # the one write that may race the crash: outcome unknown
        found = await Item.find(Item.qty == 2).sort("name").to_list()
        assert [i.name for i in found][-3:] == inserted_during[-3:]
        item = await Item.find_one(Item.name == inserted_during[-1])
        assert item is not None
        item.qty = 7
        await item.save()
        assert (await Item.find_one(Item.name == inserted_during[-1])).qty == 7  # type: ignore[union-attr]
        await Item.find(Item.name == inserted_during[-1]).update({"$inc": {"qty": 1}})

        primary.restart()
        await wait_for(lambda: state(dbs) is SwitchState.ON_PRIMARY, 30, "failback to the primary")
        # Reconcile copied what Beanie wrote on the fallback; Beanie reads it from the primary.
        back = await Item.find_one(Item.name == inserted_during[-1])
        assert back is not None and back.qty == 8
        assert await Item.find(Item.name == "before").count() in (0, 1)  # the kill took the primary's data or not
        await Item(name="after", qty=3).insert()
        assert await count_on(primary, "items") >= len(inserted_during) + 1
        assert {i.name async for i in Item.find_all()} >= {*inserted_during, "after"}
    finally:
        await dbs.close()


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("beanie_app_under_test", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_beanie_example_app_serves_through_a_primary_kill(
    mongo_pair: tuple[LocalServer, LocalServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    primary, fallback = mongo_pair
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name, value in {"MONGODB_ATLAS_URL": primary.url, "MONGODB_URL": fallback.url, **FAST}.items():
        monkeypatch.setenv(name, str(value))
    app = load_example().app
    async with serving(app) as client:
        created = await client.post("/notes", json={"title": "first", "body": "hello"})
        assert created.status_code == 201, created.text
        note_id = created.json()["_id"]
        assert (await client.get(f"/notes/{note_id}")).json()["views"] == 1
        assert (await client.post("/notes", json={"title": "first"})).status_code == 409  # unique index

        primary.kill()
        dbs = app.state.dbs
        deadline = time.monotonic() + 15
        while True:
            response = await client.post("/notes", json={"title": f"during-{time.monotonic()}"})
            if response.status_code == 201 and not dbs.status()["mongodb"]["using_primary"]:
                break
            assert time.monotonic() < deadline, response.text
        titles = [n["title"] for n in (await client.get("/notes")).json()]
        assert any(t.startswith("during-") for t in titles)
        assert (await client.get("/health")).json()["current_db"] == "Local MongoDB"
