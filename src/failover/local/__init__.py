"""Embedded local servers (PostgreSQL, Redis, a MongoDB-wire server) for demos, drills and tests."""

from .servers import LocalMongo, LocalPostgres, LocalRedis, LocalServer, free_port
from .stack import LocalStack

__all__ = ["LocalMongo", "LocalPostgres", "LocalRedis", "LocalServer", "LocalStack", "free_port"]
