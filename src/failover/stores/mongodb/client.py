"""``dbs.mongodb``: the routed database, the raw client of the active endpoint, sessions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pymongo import AsyncMongoClient

from ...core.store import FailoverStore
from .backend import MongoBackend
from .routed import RoutedDatabase
from .surface import start_session

if TYPE_CHECKING:
    from .capture import MongoJournal

__all__ = ["MongoStore"]


class MongoStore:
    """The MongoDB side of :class:`~failover.Databases` (``dbs.mongodb``).

    >>> await dbs.mongodb.database["items"].insert_one({"name": "x"})

    Attributes:
        failover: the :class:`~failover.core.store.FailoverStore` (state, health, status).
        backend: the :class:`MongoBackend` holding a client per endpoint.
    """

    def __init__(self, store: FailoverStore[Any], backend: MongoBackend, journal: MongoJournal | None = None) -> None:
        self.failover = store
        self.backend = backend
        self.journal = journal
        """Records writes sent to the fallback for reconcile (None when ``FAILOVER_RECONCILE=false``)."""
        self._database = RoutedDatabase(self)

    @property
    def database(self) -> RoutedDatabase:
        """The application database, routed to the active endpoint at each call."""
        return self._database

    def get_database(self, name: str | None = None) -> RoutedDatabase:
        """A routed database named *name* on both endpoints (default: the configured names)."""
        return self._database if name is None else RoutedDatabase(self, name)

    @property
    def client(self) -> AsyncMongoClient[Any]:
        """The raw ``AsyncMongoClient`` of the endpoint active *now*, for advanced use.

        It does not fail over: it keeps talking to that endpoint, and it is
        closed when traffic leaves it. Take it again after a switch.
        """
        role = self.failover.active_role or self.failover.preferred_role
        return self.backend.current_client(self.failover.endpoints[role])

    def start_session(self, **kwargs: Any) -> Any:
        """PyMongo's ``AsyncClientSession`` on the endpoint active now; it does not survive a switch
        (see :mod:`.surface`)."""
        return start_session(self, **kwargs)

    async def aclose(self) -> None:
        """Close every client (``Databases.close()`` calls it)."""
        for endpoint in self.failover.endpoints.values():
            await self.backend.close(endpoint)

