"""The serving store: one row per request, response, guardrail event, A/B assignment and feedback record.

`ligero serve` writes it and `ligero monitor` reads it (with SQLAlchemy Core, by the table and column names
below, so they are an interface: change them only with `SCHEMA_VERSION`). Two backends:

- SQLite (`sqlite:///path/to/file.db`, the default): WAL journal so readers never block the writer, a busy
  timeout so several server processes can share one file (writers queue instead of failing), `synchronous=FULL`
  so a committed row survives a power cut, and foreign keys enforced.
- PostgreSQL (`postgresql+psycopg://user:password@host/database`) for several machines.

Every write is its own transaction and returns only after the commit: the server acknowledges a response only
after its record is committed, so a crash loses nothing that was acknowledged.

Times are timezone-aware UTC datetimes in Python. PostgreSQL stores them as `timestamptz`; SQLite has no time
zones, so it stores naive UTC text ("2026-11-26 12:00:00.000000", which sorts by time) and Core readers of a
SQLite file get naive datetimes that mean UTC.

No prompt or output text is stored unless the store is opened with `keep_output_text=True` (privacy): only
sizes, timings, scores and decisions.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path
from typing import Any, ClassVar, Self

from sqlalchemy import DateTime, ForeignKey, String, Text, UniqueConstraint, create_engine, event, func, select
from sqlalchemy.engine import URL, Dialect, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from ligero.errors import LigeroError

log = logging.getLogger("ligero.serve")
SCHEMA_VERSION = 2  # bump when a table or column changes (the monitor reads them by name)
# Migrations from an older version: the statements that bring a store of that version to the next one.
MIGRATIONS = {1: ["ALTER TABLE responses ADD COLUMN watermark_key_id VARCHAR"]}  # 2: watermarked responses
DEFAULT_URL = "sqlite:///ligero-serve.db"
BUSY_TIMEOUT_MS = 30_000  # how long a SQLite writer waits for another process's write to finish
CHECKPOINT_WAIT_MS = 2_000  # at close, how long the checkpoint waits for other processes (shutdown stays quick)
URL_HELP = "use sqlite:///path/to/file.db or postgresql+psycopg://user:password@host/database"
OPEN_FIXES = {"sqlite": "check that the file is a SQLite database you can write",
              "postgresql": "check that the server is running and the URL's user, password, host and database"}

# Allowed values of the string columns that hold a choice.
ENDPOINTS = ("completions", "chat")
STATUSES = ("ok", "blocked", "error")
GUARDRAIL_ACTIONS = ("none", "block", "redact", "flag")  # what happened to a response
RULES = ("max_body_bytes", "max_prompt_tokens", "max_new_tokens", "toxicity", "banned_pattern", "rate_limit",
         "max_images", "image",  # image: a refused image (unreadable, too many bytes or pixels, a network URL)
         "queue_full")  # the variant's waiting queue was full (back-pressure: 429)
EVENT_ACTIONS = ("block", "redact", "flag", "clip")  # what one guardrail event did
FEEDBACK_SOURCES = ("human", "model", "code")
FEEDBACK_TYPES = ("boolean", "numeric", "categorical")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def new_response_id(endpoint: str) -> str:
    """An OpenAI-style id: cmpl-... for completions, chatcmpl-... for chat."""
    _check_choice("endpoint", endpoint, ENDPOINTS)
    return f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def default_server_id() -> str:
    """Which server process wrote a row: host and process id."""
    return f"{socket.gethostname()}-{os.getpid()}"


def key_fingerprint(api_key: str) -> str:
    """What the store keeps of an API key: 16 hex digits of its sha256, enough to tell keys apart, never the key."""
    return sha256(api_key.encode("utf-8")).hexdigest()[:16]


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python on both backends (see the module docstring for how each stores them)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # a naive time is ambiguous: refuse it rather than guess the zone
            raise ValueError(f"store times must be timezone-aware, got naive {value.isoformat()}")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}

    def as_dict(self) -> dict[str, Any]:
        """The row's columns by name (for JSON answers and tests)."""
        return {column.key: getattr(self, column.key) for column in self.__table__.columns}


class Meta(Base):
    """Key/value facts about the store itself; today only its schema version."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[str]


class RequestRecord(Base):
    """One HTTP request to a generation endpoint, whatever its outcome (served, blocked or failed)."""

    __tablename__ = "requests"
    id: Mapped[str] = mapped_column(primary_key=True)  # "req-<uuid4 hex>"
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    endpoint: Mapped[str]  # ENDPOINTS
    model: Mapped[str]
    variant: Mapped[str]
    experiment: Mapped[str | None] = mapped_column(index=True)
    user_id: Mapped[str | None]
    segment: Mapped[str | None]
    api_key_id: Mapped[str | None]  # key_fingerprint(key), never the key
    prompt_tokens: Mapped[int]
    prompt_chars: Mapped[int]
    max_tokens: Mapped[int]
    stream: Mapped[bool]
    status: Mapped[str]  # STATUSES
    http_status: Mapped[int]
    server_id: Mapped[str]  # which server process handled it


class ResponseRecord(Base):
    """The generated answer to one request: sizes, timing and scores (its text only when explicitly kept)."""

    __tablename__ = "responses"
    id: Mapped[str] = mapped_column(primary_key=True)  # the OpenAI-style id: "cmpl-..." / "chatcmpl-..."
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    variant: Mapped[str]
    output_tokens: Mapped[int]
    latency_ms: Mapped[float]
    mean_logprob: Mapped[float | None]
    toxicity_score: Mapped[float | None]
    finish_reason: Mapped[str]
    guardrail_action: Mapped[str]  # GUARDRAIL_ACTIONS
    output_text: Mapped[str | None] = mapped_column(Text)  # only with keep_output_text
    watermark_key_id: Mapped[str | None]  # the id (never the secret) of the watermark key that marked the text


class GuardrailEvent(Base):
    """One guardrail decision: a rule fired on a request (before generation) or on its response (after)."""

    __tablename__ = "guardrail_events"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), index=True)
    response_id: Mapped[str | None] = mapped_column(ForeignKey("responses.id"))
    rule: Mapped[str]  # RULES
    action: Mapped[str]  # EVENT_ACTIONS
    detail: Mapped[str] = mapped_column(Text)


class Assignment(Base):
    """The first time a user met an experiment, and the variant they got (unique per experiment and user)."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("experiment", "user_id", name="uq_assignments_experiment_user"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    experiment: Mapped[str]
    user_id: Mapped[str]
    segment: Mapped[str | None]
    variant: Mapped[str]
    server_id: Mapped[str]


class Feedback(Base):
    """A score attached to exactly one response: a user's thumbs up / down, a judge model's grade, a check."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    response_id: Mapped[str] = mapped_column(ForeignKey("responses.id"), index=True)
    name: Mapped[str] = mapped_column(String, default="user_feedback")
    value: Mapped[float]  # thumbs up = 1, down = 0, or a score (a category's index for categorical)
    data_type: Mapped[str]  # FEEDBACK_TYPES
    source: Mapped[str]  # FEEDBACK_SOURCES
    comment: Mapped[str | None] = mapped_column(Text)


TABLES = tuple(Base.metadata.tables)  # "meta", "requests", "responses", ...


def _check_choice(field: str, value: str, allowed: tuple[str, ...], error: type[Exception] = ValueError) -> None:
    if value not in allowed:
        raise error(f"{field} must be one of {', '.join(allowed)}, not {value!r}")


def _parse_url(url: str) -> URL:
    """The SQLAlchemy URL for a supported backend; a plain postgresql:// gets the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:  # the text is not echoed: a malformed URL may still hold a password
        raise LigeroError(f"the store URL is malformed (expected backend://...); {URL_HELP}") from exc
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return parsed
    if parsed.drivername in ("postgresql", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    raise LigeroError(f"store backend {parsed.drivername!r} is not supported; {URL_HELP}")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite settings for several processes sharing one file (see the module docstring)."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")  # first: switching to WAL may have to wait
    cursor.execute("PRAGMA journal_mode = WAL")  # persistent in the file; readers and one writer run together
    cursor.execute("PRAGMA synchronous = FULL")  # WAL's default NORMAL may lose the last commits on power loss
    cursor.execute("PRAGMA foreign_keys = ON")  # off by default in SQLite
    cursor.close()


class Store:
    """The serving store at `url` (tables created if missing). Thread-safe: each call uses its own session."""

    def __init__(self, url: str = DEFAULT_URL, *, keep_output_text: bool = False):
        parsed = _parse_url(url)
        self.url = parsed.render_as_string(hide_password=True)  # safe to print or log
        self.keep_output_text = keep_output_text
        self.engine = self._make_engine(parsed)
        # expire_on_commit=False: rows stay readable after their session commits and closes.
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            try:
                self._create_schema()
            except DBAPIError as exc:
                reason = " ".join(str(exc.orig).split())  # one line: drivers' messages span several
                raise LigeroError(f"cannot open the store {self.url} ({reason}); "
                                  f"{OPEN_FIXES[parsed.get_backend_name()]}") from exc
            self._check_schema_version()
        except BaseException:
            self.engine.dispose()  # no pooled connections left behind by a store that failed to open
            raise

    @staticmethod
    def _make_engine(url: URL) -> Engine:
        if url.get_backend_name() != "sqlite":
            # pre_ping replaces connections a database restart closed; connect_timeout fails fast on a bad host.
            return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        if url.database in (None, "", ":memory:"):
            # One shared connection, or each pooled connection would see its own empty database: tests only.
            engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            folder = Path(url.database).resolve().parent
            if not folder.is_dir():
                raise LigeroError(f"the store's folder {folder} does not exist; create it or give another "
                                  f"sqlite:///path/to/file.db")
            engine = create_engine(url)  # file: a pool of connections usable from any thread
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine

    def _create_schema(self) -> None:
        # Servers starting at once race to create the tables: another one may create a table between our check and
        # our CREATE. Retry (each attempt creates only what is still missing) while the other one finishes.
        for attempt in range(1, 11):
            try:
                Base.metadata.create_all(self.engine)
                return
            except DBAPIError:
                if attempt == 10:
                    raise
                time.sleep(0.1 * attempt)

    def _check_schema_version(self) -> None:
        """Write the schema version into a new store; refuse a store written by another schema."""
        row = self._get(Meta, "schema_version")
        if row is None:
            try:
                self._commit(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            except IntegrityError:  # another process wrote it first: check theirs
                row = self._get(Meta, "schema_version")
        if row.value.isdigit() and int(row.value) < SCHEMA_VERSION:
            row = self._migrate(int(row.value))
        if row.value != str(SCHEMA_VERSION):
            raise LigeroError(f"the store {self.url} has schema version {row.value}, this Ligero uses "
                              f"{SCHEMA_VERSION}; give `ligero serve` a new store URL")

    def _migrate(self, version: int) -> Meta:
        """Bring a store written by an older Ligero to this schema, one version per transaction (the version row
        changes with the statements, so a crash leaves the store at one version or the next, never between)."""
        from sqlalchemy import text, update

        while version < SCHEMA_VERSION and version in MIGRATIONS:
            with self._sessions() as session, session.begin():
                current = session.get(Meta, "schema_version", with_for_update=True)
                if current.value != str(version):  # another process migrated it meanwhile
                    version = int(current.value)
                    continue
                for statement in MIGRATIONS[version]:
                    session.execute(text(statement))
                session.execute(update(Meta).where(Meta.key == "schema_version").values(value=str(version + 1)))
            log.warning("store %s migrated from schema version %d to %d", self.url, version, version + 1)
            version += 1
        return self._get(Meta, "schema_version")

    def close(self) -> None:
        """Release the connections. A SQLite file first gets its write-ahead log copied in (a checkpoint), so the .db
        file alone is a complete backup even while other processes keep the store open (SQLite checkpoints by itself
        only when the last connection closes)."""
        try:
            if self.engine.dialect.name == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
                self._checkpoint()
        finally:
            self.engine.dispose()

    def _checkpoint(self) -> None:
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql(f"PRAGMA busy_timeout = {CHECKPOINT_WAIT_MS}")
                busy, _, _ = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        except DBAPIError as exc:
            busy, reason = 1, " ".join(str(exc.orig).split())
        else:
            reason = "another process was reading or writing"
        if busy:
            log.warning("store %s: the write-ahead log was not checkpointed at close (%s); copy the -wal file "
                        "with the database, or use `sqlite3 .backup`", self.url, reason)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _commit(self, row: Base) -> None:
        """Insert one row in its own transaction; returns only once it is committed (durable)."""
        with self._sessions.begin() as session:
            session.add(row)

    # --- writes -------------------------------------------------------------------------------------------------

    def record_request(self, *, endpoint: str, model: str, variant: str, prompt_tokens: int, prompt_chars: int,
                       max_tokens: int, stream: bool, status: str, http_status: int, server_id: str,
                       experiment: str | None = None, user_id: str | None = None, segment: str | None = None,
                       api_key_id: str | None = None, request_id: str | None = None,
                       created_at: datetime | None = None) -> str:
        """Record a request (api_key_id: key_fingerprint(key), never the key); returns its id."""
        _check_choice("endpoint", endpoint, ENDPOINTS)
        _check_choice("status", status, STATUSES)
        row = RequestRecord(id=request_id or new_request_id(), created_at=created_at or utcnow(), endpoint=endpoint,
                            model=model, variant=variant, experiment=experiment, user_id=user_id, segment=segment,
                            api_key_id=api_key_id, prompt_tokens=prompt_tokens, prompt_chars=prompt_chars,
                            max_tokens=max_tokens, stream=stream, status=status, http_status=http_status,
                            server_id=server_id)
        self._commit(row)
        return row.id

    def record_response(self, *, response_id: str, request_id: str, variant: str, output_tokens: int,
                        latency_ms: float, finish_reason: str, guardrail_action: str = "none",
                        mean_logprob: float | None = None, toxicity_score: float | None = None,
                        output_text: str | None = None, created_at: datetime | None = None,
                        watermark_key_id: str | None = None) -> str:
        """Record the response to a recorded request; output_text is dropped unless the store keeps text."""
        _check_choice("guardrail_action", guardrail_action, GUARDRAIL_ACTIONS)
        row = ResponseRecord(id=response_id, request_id=request_id, created_at=created_at or utcnow(),
                             variant=variant, output_tokens=output_tokens, latency_ms=latency_ms,
                             mean_logprob=mean_logprob, toxicity_score=toxicity_score, finish_reason=finish_reason,
                             guardrail_action=guardrail_action,
                             output_text=output_text if self.keep_output_text else None,
                             watermark_key_id=watermark_key_id)
        self._commit(row)
        return row.id

    def record_guardrail(self, *, request_id: str, rule: str, action: str, detail: str = "",
                         response_id: str | None = None, created_at: datetime | None = None) -> int:
        """Record a guardrail event; returns its id. Give response_id only for a rule that acted on a response,
        and record that response first (the foreign key needs it)."""
        _check_choice("rule", rule, RULES)
        _check_choice("action", action, EVENT_ACTIONS)
        row = GuardrailEvent(created_at=created_at or utcnow(), request_id=request_id, response_id=response_id,
                             rule=rule, action=action, detail=detail)
        self._commit(row)
        return row.id

    def stored_variant(self, experiment: str, user_id: str) -> str | None:
        """The variant recorded for this user in this experiment, or None before their first assignment."""
        with self._sessions() as session:
            return session.scalars(select(Assignment.variant).where(
                Assignment.experiment == experiment, Assignment.user_id == user_id)).first()

    def record_assignment(self, *, experiment: str, user_id: str, variant: str, server_id: str,
                          segment: str | None = None, created_at: datetime | None = None) -> str:
        """Record a user's first assignment in an experiment; returns the variant actually stored.

        Later calls insert nothing and return the stored variant, so a user keeps their variant even if the split
        changed since. Two servers may both see no row and insert at once: the unique (experiment, user_id)
        constraint lets one win, and the loser reads the winner's row.
        """
        stored = self.stored_variant(experiment, user_id)
        if stored is not None:
            return stored
        try:
            self._commit(Assignment(created_at=created_at or utcnow(), experiment=experiment, user_id=user_id,
                                    segment=segment, variant=variant, server_id=server_id))
        except IntegrityError:
            stored = self.stored_variant(experiment, user_id)
            if stored is None:  # not the race: some other constraint failed
                raise
            return stored
        return variant

    def record_feedback(self, response_id: str, value: float | bool, source: str = "human",
                        comment: str | None = None, name: str = "user_feedback", data_type: str = "boolean",
                        created_at: datetime | None = None) -> int:
        """Attach a feedback record to a response; returns its id. Bad input (it comes from clients) is a
        LigeroError: an unknown response id, a source or type not allowed, a value that is not a finite number,
        or a boolean value other than 0 / 1."""
        _check_choice("feedback source", source, FEEDBACK_SOURCES, LigeroError)
        _check_choice("feedback data_type", data_type, FEEDBACK_TYPES, LigeroError)
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LigeroError(f"feedback value must be a finite number (thumbs up = 1, down = 0), not {value!r}")
        if data_type == "boolean" and value not in (0, 1):
            raise LigeroError(f"boolean feedback must be 1 (thumbs up) or 0 (thumbs down), not {value!r}; "
                              f"send data_type 'numeric' for a score")
        if not name:
            raise LigeroError("feedback name must not be empty")
        row = Feedback(created_at=created_at or utcnow(), response_id=response_id, name=name, value=float(value),
                       data_type=data_type, source=source, comment=comment)
        with self._sessions.begin() as session:
            # Checked here for a clear message; the foreign key also guards it.
            if session.get(ResponseRecord, response_id) is None:
                raise LigeroError(f"unknown response id {response_id!r}; send the id of a response this "
                                  f"server returned (the 'id' field of its answer)")
            session.add(row)
        return row.id

    # --- reads --------------------------------------------------------------------------------------------------

    def count(self, table: str) -> int:
        if table not in Base.metadata.tables:
            raise ValueError(f"unknown table {table!r}; one of {', '.join(TABLES)}")
        with self.engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(Base.metadata.tables[table])).scalar_one()

    def _get(self, model: type[Base], key: Any) -> Any:
        with self._sessions() as session:
            return session.get(model, key)

    def get_request(self, request_id: str) -> RequestRecord | None:
        return self._get(RequestRecord, request_id)

    def get_response(self, response_id: str) -> ResponseRecord | None:
        return self._get(ResponseRecord, response_id)

    def _all(self, statement: Any) -> list[Any]:
        with self._sessions() as session:
            return list(session.scalars(statement))

    def assignments_for(self, experiment: str) -> list[Assignment]:
        """Every user's assignment in an experiment, oldest first."""
        return self._all(select(Assignment).where(Assignment.experiment == experiment).order_by(Assignment.id))

    def guardrail_events_for(self, request_id: str) -> list[GuardrailEvent]:
        return self._all(select(GuardrailEvent).where(GuardrailEvent.request_id == request_id)
                         .order_by(GuardrailEvent.id))

    def feedback_for(self, response_id: str) -> list[Feedback]:
        return self._all(select(Feedback).where(Feedback.response_id == response_id).order_by(Feedback.id))
