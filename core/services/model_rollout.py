"""Rolling out a model version safely: activation behind the eval gate, and the canary.

**The eval gate.** A finished training run stores its quick eval on its version as
``metrics["eval"] = {"fid": float, "n": int, "adherence": float | None, ...}`` (adherence a
fraction from 0 to 1). Activating a denoiser version compares its eval with the active
version's and refuses it (:class:`GateRefused`, a 409 in the API) when

- its FID is more than ``DQ_MODEL_GATE_MAX_FID_INCREASE`` (a fraction, 0.10: +10 %) above the
  active one's, or
- its adherence is more than ``DQ_MODEL_GATE_MAX_ADHERENCE_DROP`` points (5) below it, where
  both have one;
- or it has no eval while the active version has one: nothing shows that it does not regress.

When the active model has no eval (the shipped model, a version imported with ``dq model
import``) there is nothing to compare with: the activation goes ahead, and the result says the
gate was skipped. ``force`` activates whatever the gate says; callers audit the figures and
that it was forced. Autoencoder versions have no eval and pass.

**The canary.** One denoiser version per kind may take ``canary_percent`` (1-100) of the jobs
that ask for ``default``; the rest run on the active version. A job's share is fixed by its id
(:func:`core.services.model_versions.canary_slot`), and the job records that the canary picked
it (``jobs.model_pick``). Ending the canary (percent 0) sends all default traffic back to the
active version; activating the canary's version ends it too.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db.models import ModelKind, ModelVersion
from core.runtime.settings import Settings
from core.services.model_versions import (
    SHIPPED_MODEL_NAME,
    ModelStateError,
    activate_version,
    find_version,
)


@dataclass(frozen=True)
class GateBounds:
    max_fid_increase: float = 0.10  # a fraction of the active version's FID
    max_adherence_drop: float = 5.0  # points (percent of prompts)

    @classmethod
    def of(cls, settings: Settings) -> GateBounds:
        return cls(settings.model_gate_max_fid_increase, settings.model_gate_max_adherence_drop)


@dataclass(frozen=True)
class GateResult:
    """What the gate found: ``passed``, and one sentence per figure compared or per reason the
    comparison was skipped."""

    passed: bool
    compared: bool
    findings: list[str] = field(default_factory=list)
    candidate: dict[str, Any] | None = None
    active: dict[str, Any] | None = None
    active_name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "compared": self.compared,
            "findings": list(self.findings),
            "candidate_eval": self.candidate,
            "active_eval": self.active,
            "active": self.active_name,
        }


class GateRefused(ModelStateError):
    """The version's eval regresses past the bounds against the active version's."""

    def __init__(self, name: str, result: GateResult):
        super().__init__(
            f"model version {name!r} regresses against the active {result.active_name!r}: "
            + "; ".join(result.findings)
            + "; activate with force to override"
        )
        self.result = result


def eval_of(version: ModelVersion | None) -> dict[str, Any] | None:
    """The version's eval (``metrics["eval"]``) when it has a finite FID; None otherwise."""
    if version is None:
        return None
    found = (version.metrics or {}).get("eval")
    if not isinstance(found, dict):
        return None
    fid = found.get("fid")
    if isinstance(fid, bool) or not isinstance(fid, (int, float)) or not math.isfinite(fid):
        return None
    return found


def _adherence(found: dict[str, Any]) -> float | None:
    value = found.get("adherence")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def gate(candidate: ModelVersion, active: ModelVersion | None, bounds: GateBounds) -> GateResult:
    """Compare ``candidate``'s eval with ``active``'s (None: the shipped model, which has
    none)."""
    mine, theirs = eval_of(candidate), eval_of(active)
    active_name = active.name if active is not None else SHIPPED_MODEL_NAME
    if candidate.kind is not ModelKind.DENOISER:
        return GateResult(True, False, ["not compared: only denoisers are evaluated"])
    if theirs is None:
        why = f"not compared: the active model {active_name!r} has no eval"
        return GateResult(True, False, [why], mine, None, active_name)
    if mine is None:
        why = f"it has no eval, while the active one has FID {float(theirs['fid']):.2f}"
        return GateResult(False, False, [why], None, theirs, active_name)
    findings, passed, compared = [], True, False
    fid, ref = float(mine["fid"]), float(theirs["fid"])
    # FIDs are comparable only against the same reference images at the same N: a fine-tune's
    # quick eval is measured against its own data, and FID's floor moves with N.
    if (mine.get("reference"), mine.get("n")) != (theirs.get("reference"), theirs.get("n")):
        findings.append(
            f"FID not compared: {fid:.2f} against {_against(mine)}, the active one's "
            f"{ref:.2f} against {_against(theirs)}"
        )
    else:
        compared = True
        change = (fid - ref) / ref if ref > 0 else (0.0 if fid <= ref else math.inf)
        over = change > bounds.max_fid_increase
        passed &= not over
        findings.append(
            f"FID {fid:.2f} against {ref:.2f} ({change:+.1%}; the bound is "
            f"+{bounds.max_fid_increase:.0%}){' REGRESSES' if over else ''}"
        )
    a, b = _adherence(mine), _adherence(theirs)
    if a is not None and b is not None:
        compared = True
        drop = (b - a) * 100
        over = drop > bounds.max_adherence_drop
        passed &= not over
        findings.append(
            f"adherence {a:.1%} against {b:.1%} ({-drop:+.1f} points; the bound is "
            f"-{bounds.max_adherence_drop:g}){' REGRESSES' if over else ''}"
        )
    if not passed:
        findings = [f for f in findings if f.endswith("REGRESSES")]
        findings = [f.removesuffix(" REGRESSES") for f in findings]
    return GateResult(passed, compared, findings, mine, theirs, active_name)


def _against(found: dict[str, Any]) -> str:
    return f"{found.get('reference') or 'its reference'} at N={found.get('n')}"


def active_version(session: Session, kind: ModelKind = ModelKind.DENOISER) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.is_active.is_(True))
    )


def activate_checked(
    session: Session, ref: str | uuid.UUID, bounds: GateBounds, *, force: bool = False
) -> tuple[ModelVersion, GateResult]:
    """Activate the version ``ref`` (id or name) behind the eval gate. LookupError when there
    is none, ModelStateError when it is retired, GateRefused when its eval regresses and not
    ``force``. Activating the canary's version ends the canary. The caller audits and commits."""
    version = find_version(session, ref)
    if version.retired_at is not None:
        raise ModelStateError(f"model version {version.name!r} is retired; it cannot serve")
    current = active_version(session, version.kind)
    if current is not None and current.id == version.id:
        return version, GateResult(True, False, ["it is the active version already"])
    result = gate(version, current, bounds)
    if not result.passed and not force:
        raise GateRefused(version.name, result)
    activate_version(session, version.id)
    version.canary_percent = 0
    session.flush()
    return version, result


# --- the canary --------------------------------------------------------------------------


def canary_version(session: Session, kind: ModelKind = ModelKind.DENOISER) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.canary_percent > 0)
    )


def end_canary(session: Session, kind: ModelKind = ModelKind.DENOISER) -> ModelVersion | None:
    """All default traffic back to the active version; returns the version that was the
    canary (None when there was none)."""
    was = canary_version(session, kind)
    if was is not None:
        was.canary_percent = 0
        session.flush()
    return was


def set_canary(session: Session, ref: str | uuid.UUID, percent: int) -> ModelVersion | None:
    """Send ``percent`` (1-100) of the default traffic to the version ``ref``; 0 ends the
    canary. One canary at a time: another one ends. LookupError, or ModelStateError for a
    retired, active or non-denoiser version."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise ValueError("percent must be an integer from 0 to 100")
    if percent == 0:
        return end_canary(session)
    version = find_version(session, ref)
    if version.kind is not ModelKind.DENOISER:
        raise ModelStateError(f"model version {version.name!r} is an autoencoder, not a denoiser")
    if version.retired_at is not None:
        raise ModelStateError(f"model version {version.name!r} is retired; it cannot serve")
    if version.is_active:
        raise ModelStateError(
            f"model version {version.name!r} is the active one already; a canary is a candidate"
        )
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.kind == version.kind, ModelVersion.id != version.id)
        .values(canary_percent=0)
        .execution_options(synchronize_session="fetch")
    )
    session.flush()
    version.canary_percent = percent
    session.flush()
    return version
