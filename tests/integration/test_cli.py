"""The ``failover`` command in subprocesses: status, local up/down/kill/stop/start, serve, drill."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from failover.cli import main
from failover.local import LocalServer, free_port
from failover.local.servers import pid_alive, process_tree
from failover.service import create_app
from tests.integration.test_service import http_server, stack_settings

pytestmark = pytest.mark.integration

Pair = tuple[LocalServer, LocalServer]


def clean_env(**values: str) -> dict[str, str]:
    """The test's environment without any failover setting, plus *values*."""
    names = ("SUPABASE_DB_URL", "POSTGRES_URL", "MONGODB_ATLAS_URL", "MONGODB_URL", "MONGODB_ATLAS_DATABASE",
             "MONGODB_DATABASE", "UPSTASH_REDIS_URL", "REDIS_URL", "HEALTH_CHECK_INTERVAL")
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("FAILOVER_")}
    env.update(values)
    return env


async def run_cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "failover", *args,
        env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def server_logs(directory: Path) -> str:
    """The tail of every server log of the stack, for assertion messages."""
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-800:]}" for log in sorted(directory.glob("*.log")))


def stack_pids(directory: Path) -> list[int]:
    """Every live process of the local stack in *directory* (servers and their children)."""
    state = json.loads((directory / "stack.json").read_text())
    pids: list[int] = []
    for entry in state.values():
        if entry.get("pid") and pid_alive(entry["pid"]):
            pids.extend(process_tree(entry["pid"]))
    return pids


@pytest.fixture
def stack_dir(server_root: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A data directory for a CLI-made stack; anything left running is killed at the end (and fails the test)."""
    # Short: PostgreSQL's socket path (in this directory) must stay under 108 bytes.
    directory = server_root / f"cli{abs(hash(request.node.nodeid)) % 10**6}"
    yield directory
    leftovers = stack_pids(directory) if (directory / "stack.json").exists() else []
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left behind: {leftovers}"


async def test_status_prints_the_status_after_a_probe_round(pg_pair: Pair, redis_pair: Pair, tmp_path: Path) -> None:
    env = clean_env(SUPABASE_DB_URL=pg_pair[0].url, POSTGRES_URL=pg_pair[1].url, REDIS_URL=redis_pair[1].url)
    code, out, err = await run_cli("status", env=env, cwd=tmp_path)
    assert code == 0, err
    status = json.loads(out)
    assert status["overall_status"] == "healthy"
    assert status["postgres"]["current_db"] == "Primary PostgreSQL" and status["postgres"]["primary_available"] is True
    assert status["redis"]["current_db"] == "Local Redis"  # its only endpoint
    assert "mongodb" not in status

    pg_pair[0].kill()
    pg_pair[1].kill()
    code, out, _ = await run_cli("status", env=env, cwd=tmp_path)
    assert code == 1
    assert json.loads(out)["postgres"]["current_db"] is None

    code, _, err = await run_cli("status", env=clean_env(), cwd=tmp_path)
    assert code == 2 and "no store is configured" in err


async def test_status_asks_a_running_service(pg_pair: Pair, tmp_path: Path) -> None:
    token = "tok-cli-7"
    app = create_app(stack_settings(pg_pair, FAILOVER_HEALTH_TOKEN=token))
    async with http_server(app) as url:
        code, out, err = await run_cli("status", "--url", url, env=clean_env(FAILOVER_HEALTH_TOKEN=token), cwd=tmp_path)
        assert code == 0, err
        assert json.loads(out)["postgres"]["using_primary"] is True
        code, out, err = await run_cli("status", "--url", url, env=clean_env(), cwd=tmp_path)
        assert code == 1 and "wants a token" in err and token not in out + err


async def test_local_up_kill_stop_start_down_leaves_no_process(stack_dir: Path, tmp_path: Path) -> None:
    env = clean_env()
    code, _, err = await run_cli("local", "up", "--dir", str(stack_dir), env=env, cwd=tmp_path)
    assert code == 0, err + server_logs(stack_dir)
    env_file = stack_dir / "env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    for name in ("SUPABASE_DB_URL", "POSTGRES_URL", "MONGODB_ATLAS_URL", "MONGODB_URL", "UPSTASH_REDIS_URL", "REDIS_URL"):
        assert values[name].split("://")[1].startswith(("postgres@127.0.0.1:", "127.0.0.1:")), name
    assert values["FAILOVER_LOCAL_MODE"] == "true"
    first_pids = stack_pids(stack_dir)
    assert len(first_pids) >= 6

    code, out, _ = await run_cli("local", "status", "--json", "--dir", str(stack_dir), env=env, cwd=tmp_path)
    servers = {(s["store"], s["role"]): s for s in json.loads(out)["servers"]}
    assert len(servers) == 6 and all(s["state"] == "running" for s in servers.values())

    # The env file drives the library: status through it is healthy.
    code, out, err = await run_cli("status", "--env-file", str(env_file), env=env, cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["overall_status"] == "healthy"

    killed_pid = servers[("postgres", "primary")]["pid"]
    code, out, err = await run_cli("local", "kill", "postgres", "primary", "--dir", str(stack_dir), env=env, cwd=tmp_path)
    assert code == 0, err
    assert "stopped" in out and not pid_alive(killed_pid)
    code, out, _ = await run_cli("local", "stop", "redis", "primary", "--dir", str(stack_dir), env=env, cwd=tmp_path)
    assert "paused" in out
    code, out, _ = await run_cli("status", "--env-file", str(env_file), env=env, cwd=tmp_path)
    status = json.loads(out)
    assert status["postgres"]["current_db"] == "Local PostgreSQL" and status["redis"]["current_db"] == "Local Redis"

    code, out, _ = await run_cli("local", "start", "redis", "primary", "--dir", str(stack_dir), env=env, cwd=tmp_path)
    assert "running" in out
    code, out, err = await run_cli("local", "start", "postgres", "primary", "--dir", str(stack_dir), env=env, cwd=tmp_path)
    assert code == 0 and "running" in out, err
    code, out, _ = await run_cli("status", "--env-file", str(env_file), env=env, cwd=tmp_path)
    assert json.loads(out)["overall_status"] == "healthy"

    every_pid = set(first_pids) | set(stack_pids(stack_dir))
    code, _, err = await run_cli("local", "down", "--dir", str(stack_dir), env=env, cwd=tmp_path)
    assert code == 0, err
    assert [pid for pid in every_pid if pid_alive(pid)] == []
    code, out, _ = await run_cli("local", "status", "--json", "--dir", str(stack_dir), env=env, cwd=tmp_path)
    assert all(s["state"] == "stopped" for s in json.loads(out)["servers"])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_local_up_serve_runs_the_service_and_stops_everything(stack_dir: Path, tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "failover", "local", "up", "--serve", "--dir", str(stack_dir), "--port", str(port),
        env=clean_env(), cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            ready: dict[str, Any] = {}

            async def probe() -> None:
                try:
                    ready["r"] = await client.get("/readyz")
                except httpx.TransportError:
                    pass

            for _ in range(600):
                if process.returncode is not None:
                    break
                await probe()
                if ready.get("r") is not None and ready["r"].status_code == 200:
                    break
                await asyncio.sleep(0.05)
            assert ready.get("r") is not None and ready["r"].status_code == 200, "the service did not come up"
            state = (await client.get("/api/v1/dashboard/state")).json()
            assert state["local_mode"] is True
            assert set(state["status"]) == {"postgres", "mongodb", "redis", "overall_status"}
            assert (await client.get("/")).status_code == 200
            killed = await client.post("/api/v1/local/redis/primary/kill", headers={"X-Failover-Action": "1"})
            assert killed.status_code == 200 and killed.json()["server"]["state"] == "stopped"
            for _ in range(200):
                health = (await client.get("/api/v1/health/databases")).json()
                if health["redis"]["current_db"] == "Local Redis":
                    break
                await asyncio.sleep(0.05)
            assert health["redis"]["current_db"] == "Local Redis"
            started = await client.post("/api/v1/local/redis/primary/start", headers={"X-Failover-Action": "1"})
            assert started.status_code == 200 and started.json()["server"]["state"] == "running"
        pids = stack_pids(stack_dir)
        assert len(pids) >= 6
    finally:
        if process.returncode is None:
            process.send_signal(sig)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()[-2000:]
    assert "Dashboard:  http://127.0.0.1:" in err.decode()
    assert [pid for pid in pids if pid_alive(pid)] == []
    assert stack_pids(stack_dir) == []


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


async def _wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


async def test_cli_kill_then_start_while_local_up_serve_runs_leaves_no_zombie(stack_dir: Path, tmp_path: Path) -> None:
    """The README's `./dev run` in one terminal, `failover local kill|start` in another, for every store."""
    port = free_port()
    env = clean_env()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "failover", "local", "up", "--serve", "--dir", str(stack_dir), "--port", str(port),
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    every_pid: set[int] = set()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def ready() -> bool:
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get("/readyz")).status_code == 200
                return False

            for _ in range(600):
                if process.returncode is not None or await ready():
                    break
                await asyncio.sleep(0.05)
            assert await ready(), "the service did not come up"
            assert (stack_dir / "control.sock").exists()
            for store in ("postgres", "mongodb", "redis"):
                code, out, _ = await run_cli("local", "status", "--json", "--dir", str(stack_dir), env=env, cwd=tmp_path)
                old = next(s for s in json.loads(out)["servers"] if (s["store"], s["role"]) == (store, "primary"))["pid"]
                old_tree = process_tree(old)
                every_pid.update(old_tree)
                code, out, err = await run_cli("local", "kill", store, "primary", "--dir", str(stack_dir), env=env, cwd=tmp_path)
                assert code == 0 and "stopped" in out, err
                # The killed server was the serve process's child: it is reaped, not left a zombie.
                await _wait_until(lambda: not any(_zombie(p) for p in old_tree), 2, f"{store}: zombie left by kill")
                code, out, err = await run_cli("local", "start", store, "primary", "--dir", str(stack_dir), env=env, cwd=tmp_path)
                assert code == 0 and "running" in out, err + server_logs(stack_dir)
                new = int(out.rsplit("pid ", 1)[1].rstrip(")\n"))
                assert new != old
                assert _parent(new) == process.pid, f"{store}: the restarted server is not the owner's child"
                every_pid.update(process_tree(new))
                assert [p for p in _children(process.pid) if _zombie(p)] == []
            for _ in range(200):  # back on every primary
                health = (await client.get("/api/v1/health/databases")).json()
                if health["overall_status"] == "healthy":
                    break
                await asyncio.sleep(0.1)
            assert health["overall_status"] == "healthy", health
            # A kill through the CLI then a start through the dashboard, and the other way round.
            code, _, err = await run_cli("local", "kill", "redis", "fallback", "--dir", str(stack_dir), env=env, cwd=tmp_path)
            assert code == 0, err
            started = await client.post("/api/v1/local/redis/fallback/start", headers={"X-Failover-Action": "1"})
            assert started.status_code == 200 and started.json()["server"]["state"] == "running"
            killed = await client.post("/api/v1/local/postgres/fallback/kill", headers={"X-Failover-Action": "1"})
            assert killed.status_code == 200
            code, out, err = await run_cli("local", "start", "postgres", "fallback", "--dir", str(stack_dir), env=env, cwd=tmp_path)
            assert code == 0 and "running" in out, err + server_logs(stack_dir)
            every_pid.update(stack_pids(stack_dir))
            await _wait_until(lambda: not [p for p in _children(process.pid) if _zombie(p)], 2, "zombies of the owner")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()[-2000:]
    assert not (stack_dir / "control.sock").exists()
    # Every server of the run is gone for good: not running, and not a zombie either. A server's own
    # children (PostgreSQL backends) outlive its main process by a moment, and the init process that
    # inherits them reaps them on its own schedule (in CI's container, seconds under load).
    def left() -> list[int]:
        return [p for p in every_pid if Path(f"/proc/{p}").exists()]

    with contextlib.suppress(AssertionError):  # the assertion below names what is left
        await _wait_until(lambda: not left(), 10, "every server process gone")
    assert left() == []


async def test_drill_is_delegated(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = await run_cli("drill", "--help", env=clean_env(), cwd=tmp_path)
    assert code == 0 and "--store" in out
    monkeypatch.setitem(sys.modules, "failover.drill", None)  # an installation without drills
    assert main(["drill"]) == 2
    assert "failover drill is not available: the module failover.drill is missing" in capsys.readouterr().err


async def test_local_commands_never_signal_a_recycled_pid(stack_dir: Path, tmp_path: Path) -> None:
    """stack.json may name a pid that now belongs to another program: it must be left alone."""
    bystander = await asyncio.create_subprocess_exec("sleep", "60")
    try:
        stack_dir.mkdir(parents=True)
        state = {f"{store}.{role}": {"port": free_port(), "pid": None} for store in ("postgres", "mongodb", "redis") for role in ("primary", "fallback")}
        state["postgres.primary"]["pid"] = bystander.pid
        (stack_dir / "stack.json").write_text(json.dumps(state))
        env = clean_env()
        code, out, _ = await run_cli("local", "status", "--json", "--dir", str(stack_dir), env=env, cwd=tmp_path)
        assert all(s["state"] == "stopped" for s in json.loads(out)["servers"])
        code, out, err = await run_cli("local", "kill", "postgres", "primary", "--dir", str(stack_dir), env=env, cwd=tmp_path)
        assert code == 0, err
        code, _, err = await run_cli("local", "down", "--dir", str(stack_dir), env=env, cwd=tmp_path)
        assert code == 0, err
        assert bystander.returncode is None and pid_alive(bystander.pid)
    finally:
        bystander.kill()
        await bystander.wait()


async def test_serve_runs_the_service_and_never_logs_a_password(
    make_server: Any, tmp_path: Path
) -> None:
    pg = (make_server("postgres", password="pw-secret-5"), make_server("postgres", password="pw-secret-5"))
    redis = make_server("redis", password="pw-secret-6")
    env_file = tmp_path / "service.env"
    env_file.write_text(
        f"SUPABASE_DB_URL={pg[0].url}\nPOSTGRES_URL={pg[1].url}\nREDIS_URL={redis.url}\n"
        "HEALTH_CHECK_INTERVAL=0.2\nFAILOVER_PROBE_TIMEOUT=0.5\nFAILOVER_CONNECT_TIMEOUT=0.5\n"
    )
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "failover", "--log-level", "debug", "serve", "--env-file", str(env_file), "--port", str(port),
        env=clean_env(), cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            health: dict[str, Any] = {}
            for _ in range(600):
                if process.returncode is not None:
                    break
                with contextlib.suppress(httpx.TransportError):
                    health = (await client.get("/api/v1/health/databases")).json()
                    if health.get("postgres", {}).get("using_primary"):
                        break
                await asyncio.sleep(0.05)
            assert health["postgres"]["current_db"] == "Primary PostgreSQL", health
            assert health["redis"]["current_db"] == "Local Redis"
            created = await client.post("/api/v1/items", json={"name": "via serve"})
            assert created.status_code == 201, created.text
            pg[0].kill()  # errors about a password-protected endpoint go to the log now
            for _ in range(200):
                health = (await client.get("/api/v1/health/databases")).json()
                if health["postgres"]["current_db"] == "Local PostgreSQL":
                    break
                await asyncio.sleep(0.05)
            assert health["postgres"]["current_db"] == "Local PostgreSQL"
            assert "pw-secret" not in json.dumps(health)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(process.communicate(), 60)
    log = out.decode() + err.decode()
    assert process.returncode == 0, log[-2000:]
    assert "Primary PostgreSQL" in log and "Application shutdown complete" in log
    assert "pw-secret" not in log
