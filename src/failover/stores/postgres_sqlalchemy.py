"""Moved to :mod:`failover.stores.postgres.sqlalchemy`; this name stays so existing imports keep working."""

from .postgres.sqlalchemy import (
    SQLAlchemyOutcomeUnknown,
    SQLAlchemyTransactionRolledBack,
    create_engine,
    run_session_transaction,
)

__all__ = [
    "SQLAlchemyOutcomeUnknown",
    "SQLAlchemyTransactionRolledBack",
    "create_engine",
    "run_session_transaction",
]
