"""Run every benchmark, print a table, write ``benchmarks/results/latest.json``.

    python3 benchmarks/run_all.py            # full run (about 10 minutes on 2 cores)
    python3 benchmarks/run_all.py --quick    # fewer repetitions (under 2 minutes)
    python3 benchmarks/run_all.py --only overhead crash --stores postgres

Every server is started on 127.0.0.1 by the benchmark itself (PostgreSQL 15,
redis-server, nx-27017); no other host is contacted. Figures are printed, never
asserted: they depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import blackhole_rto, crash_rto, failback_storm, overhead  # noqa: E402
from benchmarks._common import BENCH_TUNING, STORES  # noqa: E402

BENCHMARKS = {
    "overhead": overhead,
    "crash": crash_rto,
    "blackhole": blackhole_rto,
    "storm": failback_storm,
}
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (one section per benchmark)."""
    lines: list[str] = []
    if "overhead" in results:
        lines += [
            "### Overhead (ops/s, failover / raw driver, same run)",
            "",
            "| store | concurrency | raw ops/s | failover ops/s | ratio | overhead | added per op |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for store, rows in results["overhead"].items():
            for row in rows.values():
                lines.append(
                    f"| {store} | {row['concurrency']} | {row['raw_ops_s']:.0f} | {row['failover_ops_s']:.0f} | "
                    f"{row['ratio']:.3f} | {row['overhead_pct']:+.1f} % | {row['added_us_per_op']:+.0f} µs |"
                )
        lines.append("")
    if "crash" in results:
        lines += [
            "### Crash RTO (primary SIGKILLed under load; kill -> first success)",
            "",
            "| store | n | p50 | p99 | max | failover p50 | errors surfaced / ops |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for store, r in results["crash"].items():
            rto = r["rto"]
            errors = f"{r['errors']} / {r['operations']}" + (f" ({_types(r['errors_by_type'])})" if r["errors"] else "")
            lines.append(
                f"| {store} | {rto['n']} | {_ms(rto['p50_s'])} | {_ms(rto['p99_s'])} | {_ms(rto['max_s'])} | "
                f"{_ms(r['failover']['p50_s'])} | {errors} |"
            )
        lines.append("")
    if "blackhole" in results:
        lines += [
            "### Blackhole RTO (primary's packets dropped by the proxy)",
            "",
            "| store | n | detect+switch p50 | p99 | first success p50 | p99 | errors surfaced / ops |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for store, r in results["blackhole"].items():
            d, f = r["detection_and_switch"], r["first_success"]
            errors = f"{r['errors']} / {r['operations']}" + (f" ({_types(r['errors_by_type'])})" if r["errors"] else "")
            lines.append(
                f"| {store} | {d['n']} | {_ms(d['p50_s'])} | {_ms(d['p99_s'])} | {_ms(f['p50_s'])} | {_ms(f['p99_s'])} | {errors} |"
            )
        lines.append("")
    if "storm" in results:
        lines += [
            "### Failback storm (200 concurrent clients during failback)",
            "",
            "| store | errors at failback / ops | peak conns primary | peak conns fallback | pool max | errors at failover |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for store, r in results["storm"].items():
            errors = f"{r['errors_at_failback']} / {r['operations_in_window']}"
            if r["errors_at_failback"]:
                errors += f" ({_types(r['errors_at_failback_by_type'])})"
            lines.append(
                f"| {store} | {errors} | {r['peak_connections']['primary']} | {r['peak_connections']['fallback']} | "
                f"{r['pool_max_size']} | {r['errors_at_failover']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _types(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


async def run(selected: list[str], stores: tuple[str, ...], quick: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in selected:
        started = time.monotonic()
        print(f"running {name} ({', '.join(stores)})...", file=sys.stderr, flush=True)
        results[name] = await BENCHMARKS[name].run(stores, quick)
        print(f"  {name} took {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run failover's benchmarks against local servers.")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and shorter rounds")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    parser.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON file (default {RESULTS})")
    args = parser.parse_args(argv)
    # Switches and breaker trips are expected here by the hundred; keep the table readable.
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("psycopg", "psycopg.pool", "pymongo", "redis", "failover"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.monotonic()
    results = asyncio.run(run(args.only, tuple(args.stores), args.quick))
    doc = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "seconds": round(time.monotonic() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "psycopg": _version("psycopg"),
            "pymongo": _version("pymongo"),
            "redis": _version("redis"),
            "nx-27017": _version("nx-27017"),
        },
        "tuning": BENCH_TUNING,
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2))
    print(table(results))
    print(f"({doc['seconds']:.0f} s on {os.cpu_count()} CPUs; JSON in {args.output})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
