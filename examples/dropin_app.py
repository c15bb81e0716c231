"""An existing FastAPI app that adds failover with a few lines: the README's drop-in snippet.

Run it with the URLs in the environment (or a ``.env`` file), for example on the
embedded servers of ``failover local up``::

    set -a; . .failover-local/env; set +a
    uvicorn examples.dropin_app:app --port 8001

The test suite imports this very file (tests/integration/test_service_dropin.py).
"""

from fastapi import FastAPI

from failover.service import MongoDatabase, PostgresConnection, RedisClient, failover_lifespan, health_router

app = FastAPI(lifespan=failover_lifespan())  # Databases.from_env(): started with the app, closed after it
app.include_router(health_router)  # GET /api/v1/health/databases, /livez, /readyz


@app.get("/hello")
async def hello(pg: PostgresConnection, mongo: MongoDatabase, redis: RedisClient) -> dict[str, object]:
    cur = await pg.execute("select now()")  # on whichever PostgreSQL endpoint is active
    (now,) = await cur.fetchone()
    await mongo["visits"].insert_one({"at": now})
    visits = await redis.incr("hello:visits")
    return {"time": now.isoformat(), "visits": visits}
