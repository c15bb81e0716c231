"""The ``failover`` command: run the service, show status, drive embedded local servers.

::

    failover serve [--host H] [--port P]         the service (dashboard, health, metrics, items)
    failover status [--url URL]                   status JSON after a first probe round (or from a service)
    failover conflicts [--store S] [--limit N]    reconcile conflicts, newest first [--url URL] [--json]
    failover local up [--serve] [--dir D]         primary+fallback of every store on loopback, env file in D
    failover local down | status [--dir D]
    failover local kill|stop|start STORE ROLE    SIGKILL / SIGSTOP / start-or-SIGCONT one server
    failover drill ...                            a measured fault drill (see ``failover drill --help``)

Only the standard library's ``argparse``: the command must work wherever the
package is installed. Every URL printed goes through :func:`redact_url`; a
token is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ._urls import redact_url
from .errors import ConfigurationError
from .local.servers import ServerError

__all__ = ["main", "build_parser", "DEFAULT_LOCAL_DIR", "LOCAL_TUNING"]

logger = logging.getLogger("failover.cli")

DEFAULT_LOCAL_DIR = ".failover-local"

LOCAL_TUNING: dict[str, str] = {
    "HEALTH_CHECK_INTERVAL": "1",
    "FAILOVER_PROBE_TIMEOUT": "1",
    "FAILOVER_CONNECT_TIMEOUT": "1",
    "FAILOVER_OPERATION_TIMEOUT": "3",
    "FAILOVER_FAILBACK_DELAY": "5",
}
"""Demo tuning written to the local env file (a 30 s probe interval makes a dull demo).
Variables already set in the environment win."""

STORES = ("postgres", "mongodb", "redis")
CONFLICTS_MAX = 1000  # the service's own limit for GET /api/v1/conflicts
ROLES = ("primary", "fallback")


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="failover", description="Primary/fallback failover for PostgreSQL, MongoDB and Redis.")
    parser.add_argument("--log-level", default=os.environ.get("FAILOVER_LOG_LEVEL", "info"), help="debug, info, warning (default: info)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="run the service: dashboard, health endpoint, metrics, example items")
    _add_server_options(serve)
    serve.add_argument("--env-file", default=".env", help="env file to read besides the environment (default: .env)")
    serve.set_defaults(func=cmd_serve)

    status = commands.add_parser("status", help="print the status JSON after a first probe round")
    status.add_argument("--url", help="ask a running service instead (e.g. http://127.0.0.1:8000)")
    status.add_argument("--token", help="bearer token for --url (default: $FAILOVER_HEALTH_TOKEN)")
    status.add_argument("--env-file", default=".env", help="env file to read besides the environment (default: .env)")
    status.set_defaults(func=cmd_status)

    conflicts = commands.add_parser("conflicts", help="list the reconcile conflicts recorded on the fallbacks, newest first")
    conflicts.add_argument("--store", choices=STORES, help="only this store (default: every configured store)")
    conflicts.add_argument("--limit", type=int, default=20, help=f"how many, 1 to {CONFLICTS_MAX} (default: 20)")
    conflicts.add_argument("--url", help="ask a running service instead (e.g. http://127.0.0.1:8000)")
    conflicts.add_argument("--token", help="bearer token for --url (default: $FAILOVER_HEALTH_TOKEN)")
    conflicts.add_argument("--env-file", default=".env", help="env file to read besides the environment (default: .env)")
    conflicts.add_argument("--json", action="store_true", help="print JSON ({\"conflicts\": [...]})")
    conflicts.set_defaults(func=cmd_conflicts)

    local = commands.add_parser("local", help="embedded local primary+fallback servers for demos and drills")
    actions = local.add_subparsers(dest="local_command", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start the servers and write DIR/env; --serve also runs the service")
    _add_dir(up)
    up.add_argument("--serve", action="store_true", help="run the service on these servers until Ctrl-C, then stop everything")
    _add_server_options(up)
    up.set_defaults(func=cmd_local_up)
    down = actions.add_parser("down", help="stop every server of the local stack")
    _add_dir(down)
    down.set_defaults(func=cmd_local_down)
    local_status = actions.add_parser("status", help="show the servers of the local stack")
    _add_dir(local_status)
    local_status.add_argument("--json", action="store_true", help="print JSON")
    local_status.set_defaults(func=cmd_local_status)
    for action, text in (
        ("kill", "SIGKILL one server (a crash)"),
        ("stop", "SIGSTOP one server (a hung server)"),
        ("start", "start one server again, or SIGCONT a stopped one"),
    ):
        sub = actions.add_parser(action, help=text)
        sub.add_argument("store", choices=STORES)
        sub.add_argument("role", choices=ROLES)
        _add_dir(sub)
        sub.set_defaults(func=cmd_local_action, action=action)

    _add_drill(commands)
    return parser


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")


def _add_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir",
        default=os.environ.get("FAILOVER_LOCAL_DIR") or DEFAULT_LOCAL_DIR,
        help=f"data directory of the local stack (default: $FAILOVER_LOCAL_DIR or {DEFAULT_LOCAL_DIR})",
    )


def _add_drill(commands: Any) -> None:
    parser = commands.add_parser("drill", help="run a fault drill and measure RTO/RPO")
    try:
        drill = importlib.import_module("failover.drill")
    except Exception as exc:  # a broken or missing drill module must not break the other commands
        if isinstance(exc, ModuleNotFoundError) and exc.name == "failover.drill":
            why = "the module failover.drill is missing from this installation"
        else:
            why = f"the module failover.drill could not be loaded ({type(exc).__name__}: {exc})"
        parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        parser.set_defaults(func=_no_drill, drill_error=why)
        return
    drill.add_arguments(parser)
    parser.set_defaults(func=drill.main)


def _no_drill(args: argparse.Namespace) -> int:
    print(f"failover drill is not available: {args.drill_error}", file=sys.stderr)
    return 2


# --- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    # SIGTERM (a CI timeout, `timeout 60 failover drill`) must run the same clean-up as Ctrl-C,
    # or servers started by a command would outlive it.
    _terminate_as_interrupt()
    try:
        result = args.func(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except ConfigurationError as exc:
        print(f"failover: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"failover: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --- serve and status ----------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from .settings import Settings

    settings = Settings.from_env(args.env_file if Path(args.env_file).exists() else None)
    previous = _terminate_as_interrupt()
    try:
        return _run_service(settings, args.host, args.port, args.log_level)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_service(settings: Any, host: str, port: int, log_level: str, local: Any = None) -> int:
    """Run the service until SIGINT/SIGTERM; the lifespan closes every pool before this returns."""
    import uvicorn

    from .service import create_app

    @asynccontextmanager
    async def banner(app: Any) -> AsyncIterator[None]:
        shown = "localhost" if host in ("0.0.0.0", "::") else host
        protected = " (open it as /#token=<FAILOVER_HEALTH_TOKEN>)" if settings.health_token is not None else ""
        print(f"\n  Dashboard:  http://{shown}:{port}/{protected}", file=sys.stderr)
        print(f"  Health:     http://{shown}:{port}/api/v1/health/databases", file=sys.stderr)
        print(f"  Metrics:    http://{shown}:{port}/metrics", file=sys.stderr)
        print(f"  Items:      POST http://{shown}:{port}/api/v1/items  {{\"name\": \"demo\"}}", file=sys.stderr)
        print("  Stop with Ctrl-C.\n", file=sys.stderr, flush=True)
        yield

    app = create_app(settings, local=local, lifespan=banner)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:
        # uvicorn shut down gracefully (the lifespan closed every pool), then re-raised the signal.
        pass
    return 0 if server.started else 1


def cmd_status(args: argparse.Namespace) -> int:
    if args.url:
        return _status_from_service(args.url, args.token or os.environ.get("FAILOVER_HEALTH_TOKEN"))
    from .databases import Databases
    from .settings import Settings

    settings = Settings.from_env(args.env_file if Path(args.env_file).exists() else None)
    if not settings.configured_stores():
        print("failover: no store is configured: set SUPABASE_DB_URL/POSTGRES_URL, MONGODB_ATLAS_URL/MONGODB_URL "
              "or UPSTASH_REDIS_URL/REDIS_URL (or pass --url to ask a running service)", file=sys.stderr)
        return 2

    async def probe() -> dict[str, Any]:
        dbs = Databases(settings)
        try:
            await dbs.start()
            return dbs.status()
        finally:
            await dbs.close()

    status = asyncio.run(probe())
    print(json.dumps(status, indent=2, default=str))
    return 1 if status.get("overall_status") == "unhealthy" else 0


def _status_from_service(url: str, token: str | None) -> int:
    import httpx

    target = url.rstrip("/") + "/api/v1/health/databases"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(target, headers=headers, timeout=10.0)
    except httpx.HTTPError as exc:
        print(f"failover: cannot reach {redact_url(target)}: {type(exc).__name__}", file=sys.stderr)
        return 1
    if response.status_code == 401:
        print("failover: the service wants a token: set FAILOVER_HEALTH_TOKEN or pass --token", file=sys.stderr)
        return 1
    try:
        status = response.json()
    except ValueError:
        print(f"failover: {redact_url(target)} answered HTTP {response.status_code} without JSON", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2))
    return 1 if response.status_code >= 500 or status.get("overall_status") == "unhealthy" else 0


# --- conflicts -----------------------------------------------------------------------------


def cmd_conflicts(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= CONFLICTS_MAX:
        print(f"failover: --limit must be from 1 to {CONFLICTS_MAX}", file=sys.stderr)
        return 2
    if args.url:
        found = _conflicts_from_service(args.url, args.token or os.environ.get("FAILOVER_HEALTH_TOKEN"), args.store, args.limit)
        if found is None:
            return 1
    else:
        from .settings import Settings

        settings = Settings.from_env(args.env_file if Path(args.env_file).exists() else None)
        if not settings.configured_stores():
            print("failover: no store is configured: set SUPABASE_DB_URL/POSTGRES_URL, MONGODB_ATLAS_URL/MONGODB_URL "
                  "or UPSTASH_REDIS_URL/REDIS_URL (or pass --url to ask a running service)", file=sys.stderr)
            return 2
        if args.store is not None and args.store not in settings.configured_stores():
            print(f"failover: the {args.store} store is not configured", file=sys.stderr)
            return 2
        found = asyncio.run(_conflicts_direct(settings, args.store, args.limit))
    if args.json:
        print(json.dumps({"conflicts": found}, indent=2, default=str))
    else:
        print(format_conflicts(found))
    return 0


async def _conflicts_direct(settings: Any, store: str | None, limit: int) -> list[dict[str, Any]]:
    """Read the conflict logs from each store's fallback; no probe round, no pool is opened."""
    from .databases import Databases

    dbs = Databases(settings)
    try:
        return await dbs.conflicts(store, limit)
    finally:
        await dbs.close()


def _conflicts_from_service(url: str, token: str | None, store: str | None, limit: int) -> list[dict[str, Any]] | None:
    import httpx

    target = url.rstrip("/") + "/api/v1/conflicts"
    params: dict[str, Any] = {"limit": limit}
    if store:
        params["store"] = store
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(target, params=params, headers=headers, timeout=30.0)
    except httpx.HTTPError as exc:
        print(f"failover: cannot reach {redact_url(target)}: {type(exc).__name__}", file=sys.stderr)
        return None
    if response.status_code == 401:
        print("failover: the service wants a token: set FAILOVER_HEALTH_TOKEN or pass --token", file=sys.stderr)
        return None
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("conflicts"), list):
        detail = body.get("detail") if isinstance(body, dict) else None
        print(f"failover: {redact_url(target)} answered HTTP {response.status_code}" + (f": {detail}" if detail else ""), file=sys.stderr)
        return None
    return body["conflicts"]  # type: ignore[no-any-return]


def format_conflicts(conflicts: Sequence[dict[str, Any]]) -> str:
    """A readable table of conflicts: one line each, then both versions and the policy's reason."""
    import datetime as dt

    if not conflicts:
        return "no conflicts recorded"
    lines = [f"{'TIME':19}  {'STORE':8}  {'RESOLUTION':13}  KEY"]
    for c in conflicts:
        at = c.get("at")
        when = dt.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S") if isinstance(at, (int, float)) else "?"
        lines.append(f"{when:19}  {str(c.get('store')):8}  {str(c.get('resolution')):13}  {c.get('key')}")
        for side in ("primary", "fallback"):
            value = c.get(side)
            shown = "(absent)" if value is None else json.dumps(value, default=str, ensure_ascii=False)
            lines.append(f"    {side + ':':9} {shown[:200]}")
        if c.get("detail"):
            lines.append(f"    {'why:':9} {c['detail']}")
    return "\n".join(lines)


# --- local ---------------------------------------------------------------------------------


def _control(directory: str) -> Any:
    from .service.local_control import LocalControl

    return LocalControl(directory)


def _env_lines(stack: Any) -> dict[str, str]:
    values = {name: value for name, value in LOCAL_TUNING.items()}
    values.update(stack.env())
    values["FAILOVER_LOCAL_MODE"] = "true"
    return values


def write_local_env(stack: Any) -> Path:
    """Write ``DIR/env``: the stack's URLs, demo tuning and local mode (mode 0600)."""
    path = stack.base_dir / "env"
    path.write_text("".join(f"{key}={value}\n" for key, value in _env_lines(stack).items()))
    os.chmod(path, 0o600)
    return path


def cmd_local_up(args: argparse.Namespace) -> int:
    from .local.stack import LocalStack
    from .service.local_control import LocalControl

    stack = LocalStack(args.dir)
    control = LocalControl(stack.base_dir, stack)
    started: set[tuple[str, str]] = set()
    previous = _terminate_as_interrupt()
    try:
        for entry in control.describe():
            key = (entry["store"], entry["role"])
            if entry["state"] != "stopped":
                print(f"  {key[0]:8} {key[1]:8} already running on 127.0.0.1:{entry['port']}", file=sys.stderr)
                continue
            server = stack.server(*key)
            server.start()
            started.add(key)
            control.record(key[0], key[1], server.pid)
            print(f"  {key[0]:8} {key[1]:8} started on 127.0.0.1:{server.port}", file=sys.stderr, flush=True)
        env_file = write_local_env(stack)
        print(f"\n  env file:   {env_file}", file=sys.stderr)
        for variable, value in stack.env().items():
            print(f"  {variable}={redact_url(value) if '://' in value else value}", file=sys.stderr)
        if not args.serve:
            print(f"\n  Serve with: failover serve --env-file {env_file}", file=sys.stderr)
            print("  Stop with:  failover local down" + (f" --dir {args.dir}" if args.dir != DEFAULT_LOCAL_DIR else ""), file=sys.stderr)
            started.clear()  # they outlive this command on purpose
            return 0
        from .settings import Settings

        values: dict[str, Any] = {k: v for k, v in LOCAL_TUNING.items() if k not in os.environ}
        values.update(stack.env())
        values["FAILOVER_LOCAL_MODE"] = True
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        # `failover local kill|stop|start` (and drills) ask this process, so every server it
        # starts is its child and is reaped here when it dies.
        control.listen()
        return _run_service(settings, args.host, args.port, args.log_level, local=control)
    except KeyboardInterrupt:
        return 0
    finally:
        control.close()
        if started:
            # A second Ctrl-C must not interrupt the clean-up and leave servers behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("\n  stopping the local servers…", file=sys.stderr, flush=True)
            control.shutdown(only=started)
            print("  stopped.", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, previous)


def _terminate_as_interrupt() -> Any:
    """Make SIGTERM behave like Ctrl-C, so ``finally`` blocks stop what was started."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)


def cmd_local_down(args: argparse.Namespace) -> int:
    control = _control(args.dir)
    if not control.state_file.exists():
        print(f"failover: no local stack in {control.base_dir}", file=sys.stderr)
        return 0
    control.shutdown()
    left = [e for e in control.describe() if e["state"] != "stopped"]
    if left:
        print(f"failover: still running: {left}", file=sys.stderr)
        return 1
    print(f"  local stack in {control.base_dir} stopped", file=sys.stderr)
    return 0


def cmd_local_status(args: argparse.Namespace) -> int:
    control = _control(args.dir)
    entries = control.describe()
    if args.json:
        print(json.dumps({"dir": str(control.base_dir), "servers": entries}, indent=2))
    else:
        for e in entries:
            print(f"{e['store']:8} {e['role']:8} 127.0.0.1:{e['port']:<5} {e['state']:7} pid={e['pid'] or '-'}")
    return 0


def cmd_local_action(args: argparse.Namespace) -> int:
    from .service.local_control import ask_owner

    control = _control(args.dir)
    if not control.state_file.exists():
        print(f"failover: no local stack in {control.base_dir}: run `failover local up` first", file=sys.stderr)
        return 2
    try:
        # The process that owns the servers (`local up --serve`) acts when there is one: a
        # server it starts is its child, which it reaps. Otherwise act here.
        entry = ask_owner(control.base_dir, args.action, args.store, args.role)
        if entry is None:
            entry = control.act(args.action, args.store, args.role)
    except ValueError as exc:
        print(f"failover: {exc}", file=sys.stderr)
        return 2
    print(f"{entry['store']} {entry['role']}: {entry['state']} (pid {entry['pid'] or '-'})")
    return 0

