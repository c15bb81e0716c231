"""A FastAPI + Beanie app on failover: Beanie is handed ``dbs.mongodb.database`` and nothing else changes.

Run it with the MongoDB URLs in the environment (or a ``.env`` file), for example on
the embedded servers of ``failover local up``::

    set -a; . .failover-local/env; set +a
    uvicorn examples.beanie_app:app --port 8002

The test suite imports this very file (tests/integration/test_mongodb_surface.py).
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from beanie import Document, Indexed, PydanticObjectId, init_beanie
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from pymongo.errors import DuplicateKeyError

from failover import Databases


class Note(Document):
    title: Indexed(str, unique=True)  # type: ignore[valid-type]
    body: str = ""
    views: int = 0

    class Settings:
        name = "notes"


class NoteIn(BaseModel):
    title: str
    body: str = ""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with Databases.from_env() as dbs:  # MONGODB_ATLAS_URL (primary), MONGODB_URL (fallback)
        await init_beanie(database=dbs.mongodb.database, document_models=[Note])
        app.state.dbs = dbs
        yield


app = FastAPI(lifespan=lifespan)


@app.post("/notes", status_code=201)
async def create_note(note: NoteIn) -> Note:
    try:
        return await Note(title=note.title, body=note.body).insert()
    except DuplicateKeyError:
        raise HTTPException(409, f"a note titled {note.title!r} exists") from None


@app.get("/notes")
async def list_notes() -> list[Note]:
    return await Note.find_all().sort("title").to_list()


@app.get("/notes/{note_id}")
async def read_note(note_id: PydanticObjectId) -> Note:
    note = await Note.get(note_id)
    if note is None:
        raise HTTPException(404, "no such note")
    await note.inc({Note.views: 1})
    return note


@app.get("/health")
async def health() -> dict[str, object]:
    return app.state.dbs.status()["mongodb"]  # type: ignore[no-any-return]
