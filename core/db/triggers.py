"""Installing and removing a set of triggers, for :mod:`core.db.counts` and :mod:`core.db.events`.

Each module writes its own SQL, per dialect; this one runs it. The same :meth:`Triggers.create`
runs in the migration that adds the triggers and after ``metadata.create_all`` (tests, tools,
through :func:`on_create_all`), so a database made either way has the same triggers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, event, text

from core.db.models import Base


@dataclass(frozen=True)
class Triggers:
    """Triggers, and on PostgreSQL the functions they execute, kept together."""

    # What the triggers keep ("status counts"), for the error on a database with no SQL here.
    purpose: str
    # Dialect name -> the CREATE statements, in the order they run.
    statements: Mapping[str, Sequence[str]]
    # (trigger, table) pairs, in the order they are dropped.
    names: Sequence[tuple[str, str]]
    # PostgreSQL functions the triggers execute, dropped after the triggers.
    functions: Sequence[str] = ()

    def create(self, connection: Connection) -> None:
        dialect = connection.dialect.name
        if dialect not in self.statements:
            raise NotImplementedError(f"{self.purpose} need triggers for {dialect}")
        for statement in self.statements[dialect]:
            connection.execute(text(statement))

    def drop(self, connection: Connection) -> None:
        postgresql = connection.dialect.name == "postgresql"
        for name, table in self.names:
            on = f" ON {table}" if postgresql else ""  # SQLite's trigger names are global
            connection.execute(text(f"DROP TRIGGER IF EXISTS {name}{on}"))
        if postgresql:
            for function in self.functions:
                connection.execute(text(f"DROP FUNCTION IF EXISTS {function}()"))


def on_create_all(table: str, create: Callable[[Connection], None]) -> None:
    """Run ``create`` when ``Base.metadata.create_all`` makes ``table``."""

    @event.listens_for(Base.metadata, "after_create")
    def _after_create(target: object, connection: Connection, **kw: object) -> None:
        tables = kw.get("tables")
        if isinstance(tables, list) and table in {t.name for t in tables}:
            create(connection)
