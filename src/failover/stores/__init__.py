"""One store each: connect, probe, classify errors, route operations, capture for reconcile.

``postgres``, ``redis`` and ``mongodb`` are packages with a module per concept (see their docstrings);
each store exposes ``create()``, which :class:`~failover.Databases` calls.
"""
