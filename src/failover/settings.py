"""Settings read from the environment and from a ``.env`` file.

Variable names follow the original design (``SUPABASE_DB_URL``, ``POSTGRES_URL``,
``MONGODB_ATLAS_URL``, ...); tuning knobs are ``HEALTH_CHECK_INTERVAL`` and
``FAILOVER_*``. Invalid values fail at start-up with a :class:`ConfigurationError`
that names the variable and never echoes a URL.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._urls import redact_url, userinfo_is_ambiguous
from .errors import ConfigurationError

__all__ = ["Settings", "StoreName", "STORES"]

StoreName = Literal["postgres", "mongodb", "redis"]
STORES: tuple[StoreName, ...] = ("postgres", "mongodb", "redis")

_SCHEMES: dict[str, tuple[str, ...]] = {
    "postgres": ("postgresql://", "postgres://"),
    "mongodb": ("mongodb://", "mongodb+srv://"),
    "redis": ("redis://", "rediss://", "unix://"),
}

# field name -> (store, environment variable)
_URL_FIELDS: dict[str, tuple[str, str]] = {
    "supabase_db_url": ("postgres", "SUPABASE_DB_URL"),
    "postgres_url": ("postgres", "POSTGRES_URL"),
    "mongodb_atlas_url": ("mongodb", "MONGODB_ATLAS_URL"),
    "mongodb_url": ("mongodb", "MONGODB_URL"),
    "upstash_redis_url": ("redis", "UPSTASH_REDIS_URL"),
    "redis_url": ("redis", "REDIS_URL"),
}


def _env(name: str, default: Any, description: str, **constraints: Any) -> Any:
    return Field(
        default,
        validation_alias=AliasChoices(name, name.lower()),
        description=description,
        **constraints,
    )


class Settings(BaseSettings):
    """Everything failover can be told. Build it with ``Settings()`` (environment
    and ``.env``) or with keyword arguments named like the fields."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
        hide_input_in_errors=True,
    )

    # --- endpoints (the seed's names) -------------------------------------------------
    supabase_db_url: str | None = _env("SUPABASE_DB_URL", None, "PostgreSQL primary (Supabase)", repr=False)
    postgres_url: str | None = _env("POSTGRES_URL", None, "PostgreSQL fallback (local)", repr=False)
    mongodb_atlas_url: str | None = _env("MONGODB_ATLAS_URL", None, "MongoDB primary (Atlas)", repr=False)
    mongodb_atlas_database: str | None = _env("MONGODB_ATLAS_DATABASE", "app", "database name on the MongoDB primary")
    mongodb_url: str | None = _env("MONGODB_URL", None, "MongoDB fallback (local)", repr=False)
    mongodb_database: str | None = _env("MONGODB_DATABASE", "app", "database name on the MongoDB fallback")
    upstash_redis_url: str | None = _env("UPSTASH_REDIS_URL", None, "Redis primary (Upstash)", repr=False)
    redis_url: str | None = _env("REDIS_URL", None, "Redis fallback (local)", repr=False)

    # --- detection and switching ------------------------------------------------------
    health_check_interval: float = _env("HEALTH_CHECK_INTERVAL", 30.0, "seconds between probes", gt=0)
    probe_timeout: float = _env("FAILOVER_PROBE_TIMEOUT", 2.0, "seconds one probe may take", gt=0)
    connect_timeout: float = _env("FAILOVER_CONNECT_TIMEOUT", 2.0, "seconds to open a connection", gt=0)
    operation_timeout: float = _env(
        "FAILOVER_OPERATION_TIMEOUT", 5.0, "seconds one routed operation may take, retries included", gt=0
    )
    unhealthy_threshold: int = _env(
        "FAILOVER_UNHEALTHY_THRESHOLD", 2, "consecutive failed probes that mark an endpoint unhealthy", ge=1
    )
    healthy_threshold: int = _env(
        "FAILOVER_HEALTHY_THRESHOLD", 2, "consecutive good probes that mark an endpoint healthy again", ge=1
    )
    breaker_threshold: int = _env(
        "FAILOVER_BREAKER_THRESHOLD",
        1,
        "consecutive connection failures of live operations that trip an endpoint's breaker",
        ge=1,
    )
    failback_delay: float = _env(
        "FAILOVER_FAILBACK_DELAY", 30.0, "seconds the primary must stay healthy before failback", ge=0
    )
    pool_min_size: int = _env("FAILOVER_POOL_MIN_SIZE", 1, "connections kept open per endpoint", ge=0)
    pool_max_size: int = _env("FAILOVER_POOL_MAX_SIZE", 10, "most connections per endpoint", ge=1)
    history_size: int = _env("FAILOVER_HISTORY_SIZE", 50, "transitions kept per store for status", ge=1)

    # --- data continuity ----------------------------------------------------------------
    reconcile: bool = _env(
        "FAILOVER_RECONCILE",
        True,
        "capture writes made on the fallback and copy them to the primary before failback",
    )
    conflict_policy: Literal["fallback_wins", "primary_wins", "newest_wins"] = _env(
        "FAILOVER_CONFLICT_POLICY", "fallback_wins", "which version stays when a key changed on both sides"
    )
    postgres_tables: str | None = _env(
        "FAILOVER_POSTGRES_TABLES",
        None,
        "schema.table,... to protect (default: every table with a primary key in schema public)",
    )
    reconcile_hold: float = _env(
        "FAILOVER_RECONCILE_HOLD", 2.0, "seconds new operations may wait for the final catch-up of a reconcile", gt=0
    )
    reconcile_batch: int = _env("FAILOVER_RECONCILE_BATCH", 500, "captured keys copied per reconcile batch", ge=1)
    warm: bool = _env(
        "FAILOVER_WARM",
        True,
        "keep the fallback a copy of the primary while the store is on it (on|off; on needs servers that allow it)",
    )

    # --- display names (default: derived from the URL host) ---------------------------
    postgres_primary_name: str | None = _env("FAILOVER_POSTGRES_PRIMARY_NAME", None, "display name")
    postgres_fallback_name: str | None = _env("FAILOVER_POSTGRES_FALLBACK_NAME", None, "display name")
    mongodb_primary_name: str | None = _env("FAILOVER_MONGODB_PRIMARY_NAME", None, "display name")
    mongodb_fallback_name: str | None = _env("FAILOVER_MONGODB_FALLBACK_NAME", None, "display name")
    redis_primary_name: str | None = _env("FAILOVER_REDIS_PRIMARY_NAME", None, "display name")
    redis_fallback_name: str | None = _env("FAILOVER_REDIS_FALLBACK_NAME", None, "display name")

    # --- service ------------------------------------------------------------------------
    health_token: SecretStr | None = _env(
        "FAILOVER_HEALTH_TOKEN", None, "bearer token required by health details, dashboard and metrics"
    )
    local_mode: bool = _env("FAILOVER_LOCAL_MODE", False, "enable the dashboard's kill/restart buttons")
    local_dir: str | None = _env("FAILOVER_LOCAL_DIR", None, "data directory of `failover local up`")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_explain(exc)) from None

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator(*_URL_FIELDS, mode="after")
    @classmethod
    def _check_scheme(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return None
        store, variable = _URL_FIELDS[info.field_name]
        value = value.strip()
        if not value.lower().startswith(_SCHEMES[store]):
            allowed = ", ".join(_SCHEMES[store])
            raise ValueError(f"{variable} must start with one of {allowed} (got {redact_url(value)!r})")
        if userinfo_is_ambiguous(value):
            raise ValueError(
                f"{variable} has a password with a character that must be percent-encoded "
                f"(/ as %2F, # as %23, ? as %3F, @ as %40): {redact_url(value)!r}"
            )
        return value

    @model_validator(mode="after")
    def _check_pool(self) -> Settings:
        if self.pool_max_size < self.pool_min_size:
            raise ValueError("FAILOVER_POOL_MAX_SIZE must be greater or equal than FAILOVER_POOL_MIN_SIZE")
        for field in ("mongodb_atlas_database", "mongodb_database"):
            if getattr(self, field) is None:
                setattr(self, field, "app")
        return self

    @classmethod
    def from_env(cls, env_file: str | None = ".env") -> Settings:
        """Read the environment (and *env_file* when it exists)."""
        return cls(_env_file=env_file)  # type: ignore[call-arg]

    def urls(self, store: str) -> tuple[str | None, str | None]:
        """``(primary_url, fallback_url)`` of *store*."""
        if store == "postgres":
            return self.supabase_db_url, self.postgres_url
        if store == "mongodb":
            return self.mongodb_atlas_url, self.mongodb_url
        if store == "redis":
            return self.upstash_redis_url, self.redis_url
        raise ValueError(f"unknown store {store!r}: expected one of {', '.join(STORES)}")

    @field_validator("postgres_tables", mode="after")
    @classmethod
    def _check_tables(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for name in value.split(","):
            name = name.strip()
            if name and (name.count(".") != 1 or not all(name.split("."))):
                raise ValueError(f"expected schema.table names separated by commas, got {name!r}")
        return value

    def protected_tables(self) -> list[tuple[str, str]] | None:
        """``FAILOVER_POSTGRES_TABLES`` as ``(schema, table)`` pairs; None means every table of ``public``."""
        if not self.postgres_tables:
            return None
        pairs = []
        for name in self.postgres_tables.split(","):
            if name.strip():
                schema, table = name.strip().split(".")
                pairs.append((schema.strip(), table.strip()))
        return pairs

    def configured_stores(self) -> list[StoreName]:
        """Stores with at least one URL, in the order of the status document."""
        return [s for s in STORES if any(self.urls(s))]

    def display_name(self, store: str, role: str) -> str | None:
        """The display name set for *store*/*role*, or None to derive it from the URL."""
        return getattr(self, f"{store}_{role}_name")


def _variable_for(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "settings"
    name = str(loc[0])
    field = Settings.model_fields.get(name) or Settings.model_fields.get(name.lower())
    if field is not None and isinstance(field.validation_alias, AliasChoices):
        return str(field.validation_alias.choices[0])
    return name.upper()


def _explain(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{_variable_for(error['loc'])}: {message}")
    return "invalid failover settings:\n  " + "\n  ".join(lines)
