"""SQLAlchemy is optional: failover imports and works without it, and says what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_without_sqlalchemy(code: str) -> subprocess.CompletedProcess[str]:
    # sys.modules[name] = None makes every "import name" fail, as if it were not installed.
    prelude = "import sys\nfor name in ('sqlalchemy', 'greenlet'):\n    sys.modules[name] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_failover_and_its_service_import_without_sqlalchemy() -> None:
    result = run_without_sqlalchemy(
        """
        import failover, failover.service, failover.stores.postgres
        assert "sqlalchemy" not in [m for m in sys.modules if sys.modules[m] is not None]
        print(failover.TransactionRolledBack.retryable)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_sqlalchemy_engine_without_sqlalchemy_names_the_extra() -> None:
    result = run_without_sqlalchemy(
        """
        from failover import Databases, Settings
        dbs = Databases(Settings(_env_file=None, POSTGRES_URL="postgresql://u:secret@127.0.0.1:1/db"))
        try:
            dbs.postgres.sqlalchemy_engine()
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'failover[sqlalchemy]'" in result.stdout
    assert "secret" not in result.stdout + result.stderr
