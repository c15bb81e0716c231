"""PostgreSQL change capture on the fallback and its copy into the primary.

The technique of Bucardo and SymmetricDS, kept small:

* **Capture** — on the fallback, in a schema of its own (``failover``), an
  AFTER ROW trigger on every protected table records each changed key in
  ``failover.changes``: table, primary key, operation, the row's image *before
  its first change since it was last reconciled*, and a sequence number bumped
  at every change. It runs in the writer's transaction, so a crash of the
  application or of the server at any instant loses nothing. TRUNCATE is
  captured too (a BEFORE TRUNCATE statement trigger records every row as
  deleted). Sessions that set ``failover.applying = on`` (transaction-local; no
  superuser needed) are not captured: that is how the library's own apply
  sessions stay out of the log.
* **Protection** — every table with a primary key in schema ``public`` (or the
  tables of ``FAILOVER_POSTGRES_TABLES``). A table created later is protected by
  an event trigger at its ``CREATE TABLE`` when the fallback's user may create
  event triggers (a superuser, as on a local server), and otherwise at the next
  probe round. A table without a primary key cannot be reconciled: it is named
  in a warning and in the status, never silently skipped.
* **Copy** — a batch takes the oldest captured keys, reads each key's *current*
  row on the fallback and on the primary, and writes the fallback's final state
  into the primary (upsert, or delete where the fallback has no row) in one
  transaction. Only then are the change rows deleted, and only where their
  sequence number did not move meanwhile: a key written again during the copy
  stays in the backlog. Re-running a batch is harmless (final state, not a replay).
* **Conflicts** — a key whose primary row differs both from the captured
  before-image and from the fallback's row was changed on the primary after we
  left it. ``FAILOVER_CONFLICT_POLICY`` decides; ``newest_wins`` compares the
  fallback's last change time with the primary row's ``updated_at`` (or
  ``modified_at``) column. Each conflict is written to ``failover.conflicts`` on
  the fallback before the primary is touched.
* **Generated ids** — the fallback's sequences of protected tables are moved a
  large step ahead of the primary's (2^40 for bigint, 2^30 for integer, 2^14 for
  smallint), so ids generated during an outage never meet the ids the primary
  generates meanwhile; a collision that happens anyway is a conflict, never a
  silent overwrite.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from ...core.endpoint import Endpoint
from ...core.reconcile import (
    BatchResult,
    Capture,
    Conflict,
    ConflictPolicy,
    Resolution,
    change_time,
    resolve,
    summarize,
)
from .connections import EndpointConnections

__all__ = ["PostgresCapture", "SEQUENCE_GAPS"]

logger = logging.getLogger("failover.postgres.capture")

SCHEMA = "failover"
# How far ahead of the primary's value a fallback sequence starts, by the sequence's type.
SEQUENCE_GAPS = {"bigint": 1 << 40, "integer": 1 << 30, "smallint": 1 << 14}
_LOCK_KEY = 0x6661696C  # "fail": the pair's reconcile lock (session advisory lock on the fallback)
_INSTALL_LOCK_KEY = 0x696E7374  # "inst": serialises concurrent installs

_INSTALL_SQL = r"""
create schema if not exists failover;
create sequence if not exists failover.change_seq;
create table if not exists failover.changes (
    tbl text not null,
    pk jsonb not null,
    op "char" not null,
    before jsonb,
    first_at timestamptz not null default clock_timestamp(),
    last_at timestamptz not null default clock_timestamp(),
    seq bigint not null default nextval('failover.change_seq'),
    primary key (tbl, pk)
);
create index if not exists changes_seq_idx on failover.changes (seq);
create table if not exists failover.conflicts (
    id bigserial primary key,
    store text not null,
    key text not null,
    resolution text not null,
    at timestamptz not null default clock_timestamp(),
    primary_version jsonb,
    fallback_version jsonb,
    detail text not null default ''
);
create table if not exists failover.protect_config (
    id boolean primary key default true check (id),
    tables text[]
);

create or replace function failover.wanted(rel oid) returns boolean
language sql stable as $fn$
    select c.relkind = 'r'
       and n.nspname not in ('failover', 'pg_catalog', 'information_schema')
       and case when (select tables from failover.protect_config) is null then n.nspname = 'public'
                else (n.nspname || '.' || c.relname) = any (coalesce((select tables from failover.protect_config), '{}'::text[])) end
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.oid = rel
$fn$;

create or replace function failover.capture() returns trigger
language plpgsql as $fn$
declare
    v_table text := quote_ident(TG_TABLE_SCHEMA) || '.' || quote_ident(TG_TABLE_NAME);
    new_key jsonb;
    old_key jsonb;
    old_row jsonb;
begin
    if coalesce(current_setting('failover.applying', true), '') = 'on' then
        return null;
    end if;
    if TG_OP = 'TRUNCATE' then
        execute format(
            'insert into failover.changes as c (tbl, pk, op, before) '
            'select %L, (select jsonb_object_agg(a, to_jsonb(t) -> a) from unnest(%L::text[]) a), ''T'', to_jsonb(t) '
            'from %s t '
            'on conflict (tbl, pk) do update set op = ''T'', last_at = clock_timestamp(), '
            'seq = nextval(''failover.change_seq'')',
            v_table, TG_ARGV, v_table);
        return null;
    end if;
    if TG_OP <> 'INSERT' then
        old_row := to_jsonb(OLD);
        select jsonb_object_agg(a, old_row -> a) into old_key from unnest(TG_ARGV) a;
    end if;
    if TG_OP <> 'DELETE' then
        select jsonb_object_agg(a, to_jsonb(NEW) -> a) into new_key from unnest(TG_ARGV) a;
    end if;
    if old_key is not null and old_key is distinct from new_key then
        insert into failover.changes as c (tbl, pk, op, before) values (v_table, old_key, 'D', old_row)
            on conflict (tbl, pk) do update
            set op = 'D', last_at = clock_timestamp(), seq = nextval('failover.change_seq');
    end if;
    if new_key is not null then
        insert into failover.changes as c (tbl, pk, op, before)
            values (v_table, new_key, left(TG_OP, 1), case when old_key = new_key then old_row end)
            on conflict (tbl, pk) do update
            set op = excluded.op, last_at = clock_timestamp(), seq = nextval('failover.change_seq');
    end if;
    return null;
end
$fn$;

create or replace function failover.protect(rel oid, force boolean default false) returns boolean
language plpgsql as $fn$
declare
    pk text[];
    args text;
    present boolean;
begin
    select array_agg(a.attname::text order by array_position(i.indkey::int2[], a.attnum))
      into pk
      from pg_index i join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any (i.indkey::int2[])
     where i.indrelid = rel and i.indisprimary;
    if pk is null then
        return false;
    end if;
    select exists (select 1 from pg_trigger where tgrelid = rel and tgname = 'failover_capture') into present;
    if present and not force then
        return true;
    end if;
    select string_agg(quote_literal(c), ', ') into args from unnest(pk) c;
    -- DROP TRIGGER locks the table ACCESS EXCLUSIVE even when there is nothing to drop: only when needed.
    if present then
        execute format('drop trigger if exists failover_capture on %s', rel::regclass);
    end if;
    if exists (select 1 from pg_trigger where tgrelid = rel and tgname = 'failover_capture_truncate') then
        execute format('drop trigger if exists failover_capture_truncate on %s', rel::regclass);
    end if;
    execute format('create trigger failover_capture after insert or update or delete on %s '
                   'for each row execute function failover.capture(%s)', rel::regclass, args);
    execute format('create trigger failover_capture_truncate before truncate on %s '
                   'for each statement execute function failover.capture(%s)', rel::regclass, args);
    return true;
end
$fn$;

create or replace function failover.on_ddl() returns event_trigger
language plpgsql as $fn$
declare
    obj record;
begin
    for obj in select distinct objid from pg_event_trigger_ddl_commands() where object_type = 'table' loop
        if failover.wanted(obj.objid) then
            perform failover.protect(obj.objid, true);
        end if;
    end loop;
exception when others then
    raise warning 'failover: could not protect a new table: %', sqlerrm;
end
$fn$;
"""

_EVENT_TRIGGER_SQL = """
drop event trigger if exists failover_protect_new;
create event trigger failover_protect_new on ddl_command_end
    when tag in ('CREATE TABLE', 'ALTER TABLE', 'CREATE TABLE AS', 'SELECT INTO')
    execute function failover.on_ddl();
"""

_SCAN_SQL = """
select n.nspname, c.relname, c.oid::bigint,
       exists (select 1 from pg_index i where i.indrelid = c.oid and i.indisprimary) as has_pk,
       exists (select 1 from pg_trigger t where t.tgrelid = c.oid and t.tgname = 'failover_capture') as protected
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
 where failover.wanted(c.oid)
 order by 1, 2
"""

_SEQUENCES_SQL = """
select distinct quote_ident(sn.nspname) || '.' || quote_ident(s.relname), format_type(q.seqtypid, null)
  from pg_depend d
  join pg_class s on s.oid = d.objid and s.relkind = 'S'
  join pg_namespace sn on sn.oid = s.relnamespace
  join pg_sequence q on q.seqrelid = s.oid
 where d.classid = 'pg_class'::regclass and d.refclassid = 'pg_class'::regclass
   and d.deptype in ('a', 'i') and failover.wanted(d.refobjid)
"""


def _key_text(table: str, pk: dict[str, Any]) -> str:
    return f"{table} {json.dumps(pk, sort_keys=True, default=str)}"


def _pk_of(row: dict[str, Any], columns: list[str]) -> str:
    return json.dumps({c: row.get(c) for c in columns}, sort_keys=True, default=str)


class PostgresCapture(Capture):
    """Capture on a PostgreSQL fallback and the copy into the primary (see the module docstring).

    Args:
        tables: ``(schema, table)`` pairs to protect; None protects every table of ``public``.
        connect_timeout: seconds to open a connection.
    """

    store = "postgres"

    def __init__(self, *, tables: list[tuple[str, str]] | None = None, connect_timeout: float = 2.0) -> None:
        self.tables = tables
        self.connect_timeout = connect_timeout
        self._schema_ready = False
        self._sequences_aligned = False
        self.event_trigger: bool | None = None
        self.protected: list[str] = []
        self.unprotected: list[str] = []
        self.missing: list[str] = []
        self._warned: set[str] = set()
        self._connections = EndpointConnections("failover-reconcile", connect_timeout=connect_timeout, utc=True)
        self._columns: dict[str, list[str]] = {}

    # --- connections --------------------------------------------------------------------------

    def _using(self, endpoint: Endpoint) -> contextlib.AbstractAsyncContextManager[AsyncConnection[Any]]:
        """A cached connection to *endpoint* (UTC session), one task at a time; dropped on any failure."""
        return self._connections.using(endpoint)

    async def close(self) -> None:
        await self._connections.close()

    # --- install ------------------------------------------------------------------------------

    async def install(self, fallback: Endpoint, primary: Endpoint | None) -> None:
        async with self._using(fallback) as conn:
            if not self._schema_ready:
                tables = [f"{s}.{t}" for s, t in self.tables] if self.tables is not None else None
                async with conn.transaction():
                    await conn.execute("select pg_advisory_xact_lock(%s)", (_INSTALL_LOCK_KEY,))
                    await conn.execute(_INSTALL_SQL)
                    await conn.execute(
                        "insert into failover.protect_config (id, tables) values (true, %s) "
                        "on conflict (id) do update set tables = excluded.tables",
                        (tables,),
                    )
                await self._install_event_trigger(conn, fallback)
                self._schema_ready = True
            await self._protect_tables(conn, fallback)
        if not self._sequences_aligned:
            await self.align_sequences(fallback, primary)

    async def _install_event_trigger(self, conn: AsyncConnection[Any], fallback: Endpoint) -> None:
        try:
            async with conn.transaction():
                await conn.execute(_EVENT_TRIGGER_SQL)
            self.event_trigger = True
        except psycopg.errors.InsufficientPrivilege:
            self.event_trigger = False
            logger.warning(
                "postgres: %s does not let this user create event triggers; tables created after start are "
                "protected at the next probe round, not at their CREATE TABLE",
                fallback.name,
            )

    async def _protect_tables(self, conn: AsyncConnection[Any], fallback: Endpoint) -> None:
        async with conn.transaction():
            cur = await conn.execute(_SCAN_SQL)
            rows = await cur.fetchall()
            protected, unprotected = [], []
            for schema, name, oid, has_pk, present in rows:
                qualified = f"{schema}.{name}"
                if not has_pk:
                    unprotected.append(qualified)
                    continue
                if not present:
                    await conn.execute("select failover.protect(%s::oid)", (oid,))
                    logger.info("postgres: change capture installed on %s.%s at %s", schema, name, fallback.name)
                protected.append(qualified)
        self.protected, self.unprotected = protected, unprotected
        for qualified in unprotected:
            if qualified not in self._warned:
                self._warned.add(qualified)
                logger.warning(
                    "postgres: table %s has no primary key: writes to it on the fallback cannot be reconciled "
                    "(add a primary key to protect it)",
                    qualified,
                )
        if self.tables is not None:
            present = {q for q in protected + unprotected}
            self.missing = [f"{s}.{t}" for s, t in self.tables if f"{s}.{t}" not in present]

    async def align_sequences(self, fallback: Endpoint, primary: Endpoint | None) -> None:
        """Move the fallback's sequences of protected tables a large step ahead of the primary's."""
        async with self._using(fallback) as conn:
            cur = await conn.execute(_SEQUENCES_SQL)
            sequences = await cur.fetchall()
            await conn.commit()
        if not sequences:
            self._sequences_aligned = primary is not None
            return
        primary_values: dict[str, int] = {}
        if primary is not None:
            async with self._using(primary) as pconn:
                for name, _type in sequences:
                    try:
                        cur = await pconn.execute(
                            sql.SQL("select last_value from {}").format(sql.SQL(name))  # name is quote_ident'ed
                        )
                        row = await cur.fetchone()
                        primary_values[name] = int(row[0]) if row else 0
                    except psycopg.errors.UndefinedTable:
                        primary_values[name] = 0
                    await pconn.rollback()
        async with self._using(fallback) as conn:
            async with conn.transaction():
                for name, type_name in sequences:
                    gap = SEQUENCE_GAPS.get(type_name, SEQUENCE_GAPS["integer"])
                    target = primary_values.get(name, 0) + gap
                    cur = await conn.execute(sql.SQL("select last_value from {}").format(sql.SQL(name)))
                    row = await cur.fetchone()
                    if row is not None and int(row[0]) < target:
                        await conn.execute("select setval(%s::regclass, %s, true)", (name, target))
                        logger.info("postgres: fallback sequence %s moved to %d, ahead of the primary", name, target)
        self._sequences_aligned = primary is not None

    # --- backlog and copy ---------------------------------------------------------------------

    async def backlog(self, fallback: Endpoint) -> int:
        async with self._using(fallback) as conn:
            cur = await conn.execute("select count(*) from failover.changes")
            row = await cur.fetchone()
            await conn.commit()
        return int(row[0]) if row else 0

    async def watermark(self, fallback: Endpoint) -> int | None:
        async with self._using(fallback) as conn:
            cur = await conn.execute("select coalesce(max(seq), 0) from failover.changes")
            row = await cur.fetchone()
            await conn.commit()
        return int(row[0]) if row else 0

    async def backlog_upto(self, fallback: Endpoint, watermark: Any) -> int:
        async with self._using(fallback) as conn:
            cur = await conn.execute("select count(*) from failover.changes where seq <= %s", (watermark,))
            row = await cur.fetchone()
            await conn.commit()
        return int(row[0]) if row else 0

    async def apply_upto(
        self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int, watermark: Any
    ) -> BatchResult:
        return await self._apply(primary, fallback, policy, limit, watermark)

    async def _primary_columns(self, conn: AsyncConnection[Any], table: str) -> list[str]:
        columns = self._columns.get(table)
        if columns is None:
            cur = await conn.execute(
                "select attname::text from pg_attribute where attrelid = %s::regclass and attnum > 0 "
                "and not attisdropped and attgenerated = '' order by attnum",
                (table,),
            )
            columns = [r[0] for r in await cur.fetchall()]
            self._columns[table] = columns
        return columns

    async def _current_rows(
        self, conn: AsyncConnection[Any], table: str, pk_columns: list[str], keys: list[dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        query = sql.SQL(
            "select to_jsonb(t) from {table} t join jsonb_populate_recordset(null::{table}, %s) k using ({pk})"
        ).format(table=sql.SQL(table), pk=sql.SQL(", ").join(map(sql.Identifier, pk_columns)))
        cur = await conn.execute(query, (Jsonb(keys),))
        return {_pk_of(row, pk_columns): row for (row,) in await cur.fetchall()}

    async def _table_order(self, conn: AsyncConnection[Any], tables: list[str]) -> list[str]:
        """*tables* with every table after the tables its foreign keys point to (parents first)."""
        if len(tables) < 2:
            return tables
        cur = await conn.execute(
            "select t, t::regclass::oid::bigint from unnest(%s::text[]) t", (tables,)
        )
        oid_of = {name: oid for name, oid in await cur.fetchall()}
        cur = await conn.execute(
            "select conrelid::bigint, confrelid::bigint from pg_constraint where contype = 'f' "
            "and conrelid = any(%s::oid[]) and confrelid = any(%s::oid[]) and conrelid <> confrelid",
            (list(oid_of.values()), list(oid_of.values())),
        )
        parents: dict[int, set[int]] = {oid: set() for oid in oid_of.values()}
        for child, parent in await cur.fetchall():
            parents[child].add(parent)
        name_of = {oid: name for name, oid in oid_of.items()}
        ordered: list[str] = []
        placed: set[int] = set()
        pending = [oid_of[t] for t in tables]
        while pending:
            ready = [oid for oid in pending if parents[oid] <= placed]
            if not ready:  # a cycle: keep the capture order for the rest
                ready = pending[:1]
            for oid in ready:
                ordered.append(name_of[oid])
                placed.add(oid)
                pending.remove(oid)
        return ordered

    async def apply_batch(
        self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int
    ) -> BatchResult:
        try:
            return await self._apply(primary, fallback, policy, limit)
        except psycopg.errors.ForeignKeyViolation:
            # A parent row captured later than its child (its key was written again) is not
            # in this batch: copy the whole backlog in one transaction instead.
            logger.info("postgres: a foreign key needs rows outside the batch; copying the whole backlog at once")
            return await self._apply(primary, fallback, policy, None)

    async def _apply(
        self, primary: Endpoint, fallback: Endpoint, policy: ConflictPolicy, limit: int | None, upto: int | None = None
    ) -> BatchResult:
        result = BatchResult()
        async with self._using(fallback) as fconn:
            cur = await fconn.execute(
                "select tbl, pk, before, extract(epoch from last_at)::float8, seq from failover.changes "
                "where seq <= %s order by seq" + (" limit %s" % int(limit) if limit is not None else ""),
                (upto if upto is not None else 2**63 - 1,),
            )
            entries = await cur.fetchall()
            if not entries:
                await fconn.commit()
                result.remaining = 0
                return result
            by_table: dict[str, list[tuple[dict[str, Any], Any, float, int]]] = {}
            for table, pk, before, last_at, seq in entries:
                by_table.setdefault(table, []).append((pk, before, last_at, seq))
            fallback_rows: dict[str, dict[str, dict[str, Any]]] = {}
            for table, items in by_table.items():
                pk_columns = sorted(items[0][0])
                fallback_rows[table] = await self._current_rows(fconn, table, pk_columns, [i[0] for i in items])
            await fconn.commit()

        plan: list[tuple[str, list[str], list[dict[str, Any]], list[dict[str, Any]]]] = []  # table, pk, upserts, deletes
        conflicts: list[Conflict] = []
        done: list[dict[str, Any]] = []
        now = dt.datetime.now(dt.timezone.utc).timestamp()
        async with self._using(primary) as pconn:
            tables = await self._table_order(pconn, list(by_table))
            for table in tables:
                items = by_table[table]
                pk_columns = sorted(items[0][0])
                primary_rows = await self._current_rows(pconn, table, pk_columns, [i[0] for i in items])
                upserts: list[dict[str, Any]] = []
                deletes: list[dict[str, Any]] = []
                for pk, before, last_at, seq in items:
                    key = _pk_of(pk, pk_columns)
                    mine = fallback_rows[table].get(key)
                    theirs = primary_rows.get(key)
                    done.append({"tbl": table, "pk": pk, "seq": seq})
                    if theirs == mine:
                        continue  # already there (a batch re-run after a crash, or the same write on both)
                    copy = True
                    if theirs != before:
                        resolution, why = resolve(policy, last_at, change_time(theirs))
                        copy = resolution is Resolution.FALLBACK_KEPT
                        conflicts.append(
                            Conflict(
                                store=self.store,
                                key=_key_text(table, pk),
                                resolution=resolution,
                                at=now,
                                primary=summarize(theirs),
                                fallback=summarize(mine),
                                detail=why,
                            )
                        )
                    if not copy:
                        continue
                    if mine is None:
                        deletes.append(pk)
                    else:
                        upserts.append(mine)
                plan.append((table, pk_columns, upserts, deletes))
            await pconn.rollback()

        if conflicts:
            await self._record_conflicts(fallback, conflicts)

        async with self._using(primary) as pconn:
            async with pconn.transaction():
                await pconn.execute("select set_config('failover.applying', 'on', true)")
                for table, pk_columns, upserts, _deletes in plan:
                    if upserts:
                        await self._upsert(pconn, table, pk_columns, upserts)
                for table, pk_columns, _upserts, deletes in reversed(plan):
                    if deletes:
                        query = sql.SQL(
                            "delete from {table} t using jsonb_populate_recordset(null::{table}, %s) k where {match}"
                        ).format(
                            table=sql.SQL(table),
                            match=sql.SQL(" and ").join(
                                sql.SQL("t.{c} = k.{c}").format(c=sql.Identifier(c)) for c in pk_columns
                            ),
                        )
                        await pconn.execute(query, (Jsonb(deletes),))

        async with self._using(fallback) as fconn:
            async with fconn.transaction():
                cur = await fconn.execute(
                    "delete from failover.changes c using jsonb_to_recordset(%s) as k(tbl text, pk jsonb, seq bigint) "
                    "where c.tbl = k.tbl and c.pk = k.pk and c.seq = k.seq",
                    (Jsonb(done),),
                )
                result.applied = cur.rowcount
        result.conflicts = conflicts
        return result

    async def _upsert(
        self, conn: AsyncConnection[Any], table: str, pk_columns: list[str], rows: list[dict[str, Any]]
    ) -> None:
        present = set().union(*(row.keys() for row in rows))
        columns = [c for c in await self._primary_columns(conn, table) if c in present]
        others = [c for c in columns if c not in pk_columns]
        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        if others:
            action: sql.Composable = sql.SQL("do update set ") + sql.SQL(", ").join(
                sql.SQL("{c} = excluded.{c}").format(c=sql.Identifier(c)) for c in others
            )
        else:
            action = sql.SQL("do nothing")
        query = sql.SQL(
            "insert into {table} ({names}) overriding system value "
            "select {names} from jsonb_populate_recordset(null::{table}, %s) "
            "on conflict ({pk}) {action}"
        ).format(
            table=sql.SQL(table),
            names=names,
            pk=sql.SQL(", ").join(map(sql.Identifier, pk_columns)),
            action=action,
        )
        await conn.execute(query, (Jsonb(rows),))

    async def _record_conflicts(self, fallback: Endpoint, conflicts: list[Conflict]) -> None:
        async with self._using(fallback) as conn:
            async with conn.transaction():
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "insert into failover.conflicts (store, key, resolution, at, primary_version, fallback_version, detail) "
                        "values (%s, %s, %s, to_timestamp(%s), %s, %s, %s)",
                        [
                            (c.store, c.key, str(c.resolution), c.at, Jsonb(c.primary), Jsonb(c.fallback), c.detail)
                            for c in conflicts
                        ],
                    )

    async def after_reconcile(self, primary: Endpoint, fallback: Endpoint) -> None:
        self._columns.clear()  # the primary's schema may change between runs
        await self.align_sequences(fallback, primary)

    # --- lock and conflict log ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lock(self, fallback: Endpoint) -> AsyncIterator[bool]:
        conn = await self._connections.connect(fallback, autocommit=True)
        try:
            cur = await conn.execute("select pg_try_advisory_lock(%s)", (_LOCK_KEY,))
            row = await cur.fetchone()
            taken = bool(row and row[0])
            yield taken
        finally:
            # Closing the session releases the lock; a SIGKILLed holder's session ends the same way.
            with contextlib.suppress(Exception):
                await conn.close()

    async def conflicts(self, fallback: Endpoint, limit: int) -> list[dict[str, Any]]:
        conn = await self._connections.connect(fallback, autocommit=True)
        try:
            cur = await conn.execute(
                "select store, key, resolution, extract(epoch from at)::float8, primary_version, fallback_version, detail "
                "from failover.conflicts order by id desc limit %s",
                (limit,),
            )
            rows = await cur.fetchall()
        except psycopg.errors.UndefinedTable:
            return []
        finally:
            await conn.close()
        return [
            {"store": s, "key": k, "resolution": r, "at": at, "primary": p, "fallback": f, "detail": d}
            for s, k, r, at, p, f, d in rows
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "protected_tables": len(self.protected),
            "unprotected_tables": list(self.unprotected),
            "missing_tables": list(self.missing),
            "new_tables_protected": (
                "at CREATE TABLE (event trigger)" if self.event_trigger else "at the next probe round"
            ) if self.event_trigger is not None else None,
        }
