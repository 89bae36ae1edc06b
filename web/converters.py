"""URL converters for the integer ids in paths, with the range of the column that holds them.

Each states its range for the API document (:func:`web.openapi.finish_spec`). A number beyond
the column's range must never reach the database, where PostgreSQL refuses it
(NumericValueOutOfRange, a 500): either the converter refuses it, so that it matches no route
and gets the 404 that any other malformed id (a job id that is not a UUID) gets, or the view
answers it as an id that does not exist.
"""

from __future__ import annotations

from werkzeug.routing import IntegerConverter, Map

from core.services.tokens import MAX_TOKEN_ID

MAX_BIGINT = 2**63 - 1  # BIGINT: core.db.models.BigId on PostgreSQL


class IdConverter(IntegerConverter):
    """Digits, so never negative; ``minimum`` to ``maximum`` is the range of the column."""

    minimum = 1
    maximum: int


class BigIdConverter(IdConverter):
    """``<big_id:…>``: a BigId row's id (a webhook delivery). A number past 2**63 - 1 matches
    no route."""

    maximum = MAX_BIGINT

    def __init__(self, map: Map) -> None:
        super().__init__(map, max=self.maximum)


class TokenIdConverter(IdConverter):
    """``<token_id:…>``: an API token's id. Every number reaches the view, which answers one that
    no token can have as a token that does not exist (core.services.tokens checks the range
    before it queries): "There is no token N.", 404."""

    maximum = MAX_TOKEN_ID


CONVERTERS = {"big_id": BigIdConverter, "token_id": TokenIdConverter}
