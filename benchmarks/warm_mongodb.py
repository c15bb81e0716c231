"""MongoDB warm sync: what it costs the primary path, its lag, and the RPO of a crash.

See benchmarks/_warm.py for what is measured and how.

Run: ``python3 -m benchmarks.warm_mongodb [--seconds 5] [--rounds 2]``.
"""

from __future__ import annotations

import asyncio

from ._warm import main

if __name__ == "__main__":
    asyncio.run(main("mongodb", __doc__ or ""))
