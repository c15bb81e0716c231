"""``python -m failover``: the same as the ``failover`` command."""

from .cli import main

raise SystemExit(main())
