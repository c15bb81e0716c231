"""A FastAPI + SQLAlchemy ORM app on failover: the README's SQLAlchemy example.

Nothing in the data layer knows about failover except where the engine comes
from (``dbs.postgres.sqlalchemy_engine()``, behind the ``SQLAlchemySessions`` and
``SQLAlchemySession`` dependencies). Writes run through
``run_session_transaction``, so a transaction cut by a failover runs again on the
fallback instead of becoming an error.

The ``notes`` table must exist on both PostgreSQL servers (apply your migrations
to each; ``Base.metadata.create_all`` on each works too). Run it with the URLs in
the environment, for example on the embedded servers of ``failover local up``::

    set -a; . .failover-local/env; set +a
    uvicorn examples.sqlalchemy_app:app --port 8002

The test suite runs this very file under load with the primary killed
(tests/integration/test_sqlalchemy.py).
"""

from __future__ import annotations

import uuid

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import String, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from failover.service import (
    FailoverDatabases,
    SQLAlchemySession,
    SQLAlchemySessions,
    failover_lifespan,
    health_router,
)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(500))


class NoteIn(BaseModel):
    body: str


class NoteOut(BaseModel):
    id: uuid.UUID
    body: str


app = FastAPI(lifespan=failover_lifespan())
app.include_router(health_router)


@app.post("/notes", status_code=201)
async def create_note(note: NoteIn, dbs: FailoverDatabases, sessions: SQLAlchemySessions) -> NoteOut:
    # The key is chosen before the first run, so every run writes the same row and
    # merge() makes a second run harmless: the write is idempotent, and even a
    # failover while committing (outcome unknown) can safely run it again.
    note_id = uuid.uuid4()

    async def write(session: AsyncSession) -> None:
        await session.merge(Note(id=note_id, body=note.body))

    await dbs.postgres.run_session_transaction(sessions, write, idempotent=True)
    return NoteOut(id=note_id, body=note.body)


@app.get("/notes/{note_id}")
async def read_note(note_id: uuid.UUID, dbs: FailoverDatabases, sessions: SQLAlchemySessions) -> NoteOut:
    async def read(session: AsyncSession) -> Note | None:
        return await session.get(Note, note_id)

    found = await dbs.postgres.run_session_transaction(sessions, read, idempotent=True)  # a read: always safe
    if found is None:
        raise HTTPException(status_code=404, detail="no such note")
    return NoteOut(id=found.id, body=found.body)


@app.get("/notes")
async def count_notes(session: SQLAlchemySession) -> dict[str, int]:
    # A plain session from the dependency: the same ORM code as without failover.
    total = await session.scalar(select(func.count()).select_from(Note))
    return {"count": int(total or 0)}
