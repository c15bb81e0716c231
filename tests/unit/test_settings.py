"""Settings: the seed's variable names, validation messages, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from failover import ConfigurationError, Databases, Settings, StoreNotConfigured, redact_url
from failover._urls import redact_text, url_hosts
from failover.core.endpoint import Role, display_name_for
from failover.databases import endpoints_for


def make(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_defaults() -> None:
    s = make()
    assert s.health_check_interval == 30
    assert s.failback_delay == 30
    assert s.configured_stores() == []


def test_seed_names_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_DB_URL", "postgresql://postgres:pw@db.abc.supabase.co:5432/postgres")
    monkeypatch.setenv("POSTGRES_URL", "postgresql://postgres@localhost:5432/app")
    monkeypatch.setenv("MONGODB_URL", "mongodb://localhost:27017")
    monkeypatch.setenv("MONGODB_DATABASE", "instaintelli")
    monkeypatch.setenv("REDIS_URL", "redis://localhost:6379/0")
    monkeypatch.setenv("HEALTH_CHECK_INTERVAL", "5")
    monkeypatch.setenv("FAILOVER_FAILBACK_DELAY", "12.5")
    s = make()
    assert s.urls("postgres")[0].startswith("postgresql://")
    assert s.configured_stores() == ["postgres", "mongodb", "redis"]
    assert s.health_check_interval == 5
    assert s.failback_delay == 12.5
    assert s.mongodb_database == "instaintelli"


def test_dotenv_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("POSTGRES_URL=postgresql://u@localhost/db\nFAILOVER_PROBE_TIMEOUT=0.7\n")
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env()
    assert s.postgres_url == "postgresql://u@localhost/db"
    assert s.probe_timeout == 0.7


def test_blank_values_are_unset() -> None:
    assert make(REDIS_URL="  ").redis_url is None


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("HEALTH_CHECK_INTERVAL", -1, "HEALTH_CHECK_INTERVAL"),
        ("FAILOVER_PROBE_TIMEOUT", 0, "FAILOVER_PROBE_TIMEOUT"),
        ("FAILOVER_UNHEALTHY_THRESHOLD", 0, "FAILOVER_UNHEALTHY_THRESHOLD"),
        ("FAILOVER_FAILBACK_DELAY", -3, "FAILOVER_FAILBACK_DELAY"),
        ("SUPABASE_DB_URL", "mysql://root:hunter2@db/x", "SUPABASE_DB_URL must start with"),
        ("MONGODB_ATLAS_URL", "http://x", "MONGODB_ATLAS_URL must start with"),
        ("UPSTASH_REDIS_URL", "postgresql://x", "UPSTASH_REDIS_URL must start with"),
        ("FAILOVER_OPERATION_TIMEOUT", "soon", "FAILOVER_OPERATION_TIMEOUT"),
    ],
)
def test_invalid_values_name_the_variable(variable: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        make(**{variable: value})
    assert expected in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_pool_sizes_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="FAILOVER_POOL_MAX_SIZE must be greater or equal"):
        make(FAILOVER_POOL_MIN_SIZE=5, FAILOVER_POOL_MAX_SIZE=2)


def test_repr_never_shows_urls() -> None:
    s = make(SUPABASE_DB_URL="postgresql://postgres:topsecret@db.x.supabase.co/postgres")
    assert "topsecret" not in repr(s)
    assert "topsecret" not in str(s)


def test_unconfigured_store_says_what_to_set() -> None:
    dbs = Databases(make(POSTGRES_URL="postgresql://u@localhost/db"))
    with pytest.raises(StoreNotConfigured, match="MONGODB_ATLAS_URL"):
        dbs.mongodb  # noqa: B018
    assert "mongodb" not in dbs.status()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres:s3cret@db.x.supabase.co:5432/postgres", "postgresql://postgres:***@db.x.supabase.co:5432/postgres"),
        ("redis://:tok3n@eu1.upstash.io:6379", "redis://:***@eu1.upstash.io:6379"),
        ("rediss://default:tok3n@eu1.upstash.io:6379/0", "rediss://default:***@eu1.upstash.io:6379/0"),
        ("mongodb+srv://u:p%40ss@c0.abc.mongodb.net/?retryWrites=true", "mongodb+srv://u:***@c0.abc.mongodb.net/?retryWrites=true"),
        ("postgresql://u@h/db?password=s3cret&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
        ("redis://localhost:6379", "redis://localhost:6379"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_masks_embedded_urls_and_pairs() -> None:
    text = "could not connect to postgresql://me:pa55@host/db (password=pa55 user=me)"
    out = redact_text(text, ("pa55",))
    assert "pa55" not in out
    assert "postgresql://me:***@host/db" in out


def test_display_names() -> None:
    assert display_name_for("postgres", Role.PRIMARY, "postgresql://u:p@db.abc.supabase.co/postgres") == "Supabase"
    assert display_name_for("postgres", Role.PRIMARY, "postgresql://u:p@aws-0.pooler.supabase.com/postgres") == "Supabase"
    assert display_name_for("postgres", Role.FALLBACK, "postgresql://localhost/app") == "Local PostgreSQL"
    assert display_name_for("postgres", Role.PRIMARY, "postgresql://10.0.0.5/app") == "Primary PostgreSQL"
    assert display_name_for("mongodb", Role.PRIMARY, "mongodb+srv://u:p@c0.x.mongodb.net/") == "MongoDB Atlas"
    assert display_name_for("mongodb", Role.FALLBACK, "mongodb://localhost") == "Local MongoDB"
    assert display_name_for("redis", Role.PRIMARY, "rediss://default:t@eu1-x.upstash.io:6379") == "Upstash"
    assert display_name_for("redis", Role.FALLBACK, "redis://localhost") == "Local Redis"
    assert display_name_for("redis", Role.PRIMARY, "redis://evilupstash.io") == "Primary Redis"


def test_display_name_override() -> None:
    s = make(POSTGRES_URL="postgresql://localhost/app", FAILOVER_POSTGRES_FALLBACK_NAME="Laptop DB")
    assert endpoints_for(s, "postgres")[0].name == "Laptop DB"


def test_url_hosts_handles_mongo_seed_lists() -> None:
    assert url_hosts("mongodb://u:p@a.x:1,b.x:2,[::1]:3/db") == ["a.x", "b.x", "::1"]


@pytest.mark.parametrize("password", ["Sup3r/Secret", "a#b", "q?x", "p@ss"])
def test_passwords_with_url_delimiters_are_redacted(password: str) -> None:
    url = f"postgresql://postgres:{password}@db.x.supabase.co:5432/postgres"
    assert password not in redact_url(url)
    assert redact_url(url).startswith("postgresql://postgres:***@")


@pytest.mark.parametrize("password", ["Sup3r/Secret", "a#b", "q?x"])
def test_unencoded_delimiters_in_a_password_are_refused_without_showing_it(password: str) -> None:
    with pytest.raises(ConfigurationError, match="percent-encoded") as caught:
        make(UPSTASH_REDIS_URL=f"redis://default:{password}@eu1.upstash.io:6379")
    assert password not in str(caught.value)


def test_percent_encoded_password_is_scrubbed_in_both_forms() -> None:
    from failover.core.endpoint import Endpoint

    endpoint = Endpoint("postgres", Role.PRIMARY, "Supabase", "postgresql://u:a%2Fb%23c@h/db")
    assert set(endpoint.secrets) == {"a%2Fb%23c", "a/b#c"}
    assert "a/b#c" not in redact_text("auth failed for a/b#c", endpoint.secrets)


def test_metric_causes_come_from_the_switch_not_from_the_reason_text() -> None:
    from failover.core.events import FailbackCompleted, FailoverStarted, SwitchState, TransitionCause
    from failover.service.metrics import FailoverMetrics

    metrics = FailoverMetrics()
    # A reason that mentions a pin is not counted as one: the cause the switch set is.
    metrics.on_event(FailoverStarted(
        store="postgres", at=0.0, from_state=SwitchState.ON_PRIMARY, to_state=SwitchState.ON_FALLBACK,
        reason="Shopping DB is down: breaker tripped: pinned connection refused", cause=TransitionCause.BREAKER_TRIPPED,
    ))
    metrics.on_event(FailbackCompleted(
        store="postgres", at=1.0, from_state=SwitchState.RECONCILING, to_state=SwitchState.ON_PRIMARY,
        reason="reconciled", cause=TransitionCause.RECONCILED,
    ))
    text = metrics.render().decode()
    assert 'failover_failovers_total{cause="breaker_tripped",store="postgres"} 1.0' in text
    assert 'failover_failbacks_total{cause="reconciled",store="postgres"} 1.0' in text
    assert "pinned" not in text