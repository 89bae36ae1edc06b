"""Who a request acts for: the owner string its jobs carry, and whether it may see every job.

Every job has an owner string: ``token:<ApiToken.id>`` or ``session:<random hex>``. A caller sees
the jobs it owns; an admin sees every job (``Caller.scope`` is then None). How a request comes to
be one is :mod:`web.auth`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    owner: str
    is_admin: bool = False
    # A browser signed in with a token (not an API call, not an anonymous visitor).
    signed_in: bool = False

    @property
    def scope(self) -> str | None:
        """The owner to filter jobs by: None for an admin, who sees every job."""
        return None if self.is_admin else self.owner
