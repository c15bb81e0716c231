"""Moved to :mod:`failover.stores.redis.lock`; this name stays so existing imports keep working.

Import :class:`LockLostInFailover` from :mod:`failover.stores.redis`.
"""

from .redis.lock import LockLostInFailover

__all__ = ["LockLostInFailover"]
