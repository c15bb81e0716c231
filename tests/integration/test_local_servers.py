"""Local servers and the commands that start them leave nothing behind and never hijack a port."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from failover.local import LocalRedis
from failover.local.servers import ServerError

pytestmark = pytest.mark.integration


def test_a_server_refuses_to_start_on_a_port_someone_else_holds(make_server: Any) -> None:
    taken = make_server("redis")
    intruder = LocalRedis(taken.data_dir.parent / "intruder", port=taken.port)
    with pytest.raises(ServerError, match="already listens"):
        intruder.start()
    assert not intruder.running


def _drill_processes(temp_root: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if temp_root in cmdline or cwd.startswith(temp_root):
            found.append(int(entry.name))
    return found


async def test_sigterm_to_a_drill_stops_its_servers_and_removes_its_files() -> None:
    temp_root = tempfile.mkdtemp(prefix="failover-sigterm-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVER_")}
    env["TMPDIR"] = temp_root  # the drill's temporary servers live under here
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "failover", "drill", "--store", "redis", "--fault", "kill", "--duration", "30",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while not _drill_processes(temp_root):  # its servers are up
            assert asyncio.get_running_loop().time() < deadline, "the drill never started its servers"
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), timeout=30)
        left = _drill_processes(temp_root)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert left == []
        assert [p.name for p in Path(temp_root).iterdir() if p.name.startswith("failover-drill-")] == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_owns_matches_whole_arguments_not_substrings(make_server: Any) -> None:
    import subprocess

    redis = make_server("redis")
    postgres = make_server("postgres")
    assert redis.owns(redis.pid) and postgres.owns(postgres.pid)
    assert not redis.owns(postgres.pid) and not postgres.owns(redis.pid)
    # A process that merely mentions the data directory or the address is not the server.
    lookalike = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", f"{postgres.data_dir}.log", f"127.0.0.1:{redis.port}0"]
    )
    try:
        assert not postgres.owns(lookalike.pid)
        assert not redis.owns(lookalike.pid)
    finally:
        lookalike.kill()
        lookalike.wait()


def test_a_stale_postmaster_pid_never_blocks_a_start(make_server: Any) -> None:
    """A killed postmaster nobody reaped (a zombie), or its pid now given to another program."""
    import subprocess

    postgres = make_server("postgres")
    lock = postgres.data_dir / "postmaster.pid"
    # As the postgres user, like a dead postmaster (PostgreSQL ignores pids it may not signal).
    zombie = subprocess.Popen(["true"], user="postgres")  # exits at once; not waited for: a zombie
    bystander = subprocess.Popen(["sleep", "30"], user="postgres")
    try:
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z":
            pass
        for stale_pid in (zombie.pid, bystander.pid):
            postgres.kill()
            lines = lock.read_text().split("\n") if lock.exists() else ["0", str(postgres.data_dir)]
            lines[0] = str(stale_pid)  # what PostgreSQL checks: "is process <pid> alive?"
            lock.write_text("\n".join(lines))
            postgres.start()
            assert postgres.running
            assert int(lock.read_text().split("\n")[0]) == postgres.pid
        assert bystander.poll() is None  # never signalled
    finally:
        zombie.wait()
        bystander.kill()
        bystander.wait()
