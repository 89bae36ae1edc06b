"""The eval gate compares FIDs only when both were measured against the same reference at the
same N (a fine-tune's quick eval is against its own data); adherence it always compares."""

from __future__ import annotations

from typing import Any

from core.db import ModelKind, ModelVersion
from core.services.model_rollout import GateBounds, gate


def version(name: str, **evaluation: Any) -> ModelVersion:
    return ModelVersion(name=name, kind=ModelKind.DENOISER, metrics={"eval": evaluation})


ACTIVE = version("a", fid=10.0, n=256, adherence=0.9, reference="shapes")


def test_fids_against_different_references_or_n_are_not_compared() -> None:
    for other in ({"reference": "folder:pink", "n": 256}, {"reference": "shapes", "n": 64}):
        result = gate(version("b", fid=40.0, adherence=0.9, **other), ACTIVE, GateBounds())
        assert result.passed and result.compared  # adherence was compared, and holds
        assert result.findings[0].startswith("FID not compared: 40.00 against")
        assert "the active one's 10.00 against shapes at N=256" in result.findings[0]


def test_adherence_is_still_compared_across_references() -> None:
    candidate = version("b", fid=9.0, n=256, adherence=0.5, reference="folder:pink")
    result = gate(candidate, ACTIVE, GateBounds())
    assert not result.passed
    assert result.findings == ["adherence 50.0% against 90.0% (-40.0 points; the bound is -5)"]


def test_fids_against_the_same_reference_are_compared() -> None:
    candidate = version("b", fid=12.0, n=256, adherence=0.9, reference="shapes")
    result = gate(candidate, ACTIVE, GateBounds())
    assert not result.passed and result.findings[0].startswith("FID 12.00 against 10.00 (+20.0%")
    without_adherence = version("c", fid=40.0, n=64, reference="elsewhere")
    result = gate(without_adherence, ACTIVE, GateBounds())
    assert result.passed and not result.compared  # nothing comparable: said, not refused
