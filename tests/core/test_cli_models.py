"""``dq model``: import a checkpoint (checked without torch, pickles refused, uploaded to
storage), list, activate behind the eval gate, retire, canary; each change audited; each user
error one line with nothing written. Run in-process against SQLite and PostgreSQL."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from core.cli import main
from core.db import ModelVersion, dispose_engines, session_scope
from core.db.models import AuditEvent
from core.services.model_versions import activate_version
from tests.conftest import tmp_env


@pytest.fixture
def dq(
    engine: Engine,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Any]:
    """Run ``dq`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setenv("DQ_DATABASE_URL", db_url)
    monkeypatch.setenv("DQ_SECRET_KEY", tmp_env(tmp_path)["DQ_SECRET_KEY"])
    monkeypatch.setenv("DQ_STORAGE_URL", f"file://{tmp_path / 'objects'}")

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    yield run
    dispose_engines()


def objects(tmp_path: Path) -> list[str]:
    root = tmp_path / "objects"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def versions(engine: Engine) -> dict[str, ModelVersion]:
    with session_scope(engine) as session:
        return {v.name: v for v in session.scalars(select(ModelVersion))}


def audit(engine: Engine) -> list[tuple[str, str, dict[str, Any]]]:
    with session_scope(engine) as session:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.id))
        return [(e.actor, e.action, e.detail) for e in rows]


def copy_checkpoint(source: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("model.json", "model.safetensors"):
        shutil.copy(source / name, dest / name)
    return dest


def safetensors(tensors: dict[str, list[int]]) -> bytes:
    """A well-formed safetensors file of zeros (F32), written by hand."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def test_import_uploads_the_checkpoint_registers_it_inactive_and_audits(
    dq: Any, engine: Engine, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    code, out, err = dq("model", "import", str(tiny_checkpoint), "--name", "tiny-v1")
    assert code == 0, err
    assert "imported tiny-v1" in out and "inactive" in out
    version = versions(engine)["tiny-v1"]
    assert not version.is_active and version.checkpoint_key == "models/tiny-v1/imported"
    assert version.config == json.loads((tiny_checkpoint / "model.json").read_text())
    stored = tmp_path / "objects" / "models" / "tiny-v1" / "imported"
    for name in ("model.json", "model.safetensors"):
        assert (stored / name).read_bytes() == (tiny_checkpoint / name).read_bytes()
    weights = (tiny_checkpoint / "model.safetensors").stat().st_size
    assert version.metrics["checkpoint"]["bytes"] == weights
    # The parameters counted from the header alone are those safetensors loads.
    from safetensors.torch import load_file

    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert version.metrics["checkpoint"]["parameters"] == sum(t.numel() for t in tensors.values())
    ((actor, action, detail),) = audit(engine)
    assert (actor, action, detail["name"]) == ("cli", "model.import", "tiny-v1")

    code, out, _ = dq("model", "list")
    assert code == 0
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert [line[:3] for line in lines] == [
        ["tiny-v1", "denoiser", "-"],
        ["shipped", "denoiser", "active"],
    ]


def test_bad_checkpoints_and_names_are_one_line_errors_and_write_nothing(
    dq: Any, engine: Engine, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    good = copy_checkpoint(tiny_checkpoint, tmp_path / "good")
    cases: list[tuple[Path, str, str]] = []

    pickled = copy_checkpoint(tiny_checkpoint, tmp_path / "pickled")
    (pickled / "model.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 64)  # torch.save's zip
    cases.append((pickled, "p1", "is a pickle"))
    proto = copy_checkpoint(tiny_checkpoint, tmp_path / "proto")
    (proto / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)  # a plain pickle
    cases.append((proto, "p2", "is a pickle"))
    only_pt = tmp_path / "only_pt"
    only_pt.mkdir()
    (only_pt / "model.pt").write_bytes(b"PK\x03\x04")
    cases.append((only_pt, "p3", "found model.pt: pickle checkpoints are refused"))
    bad_json = copy_checkpoint(tiny_checkpoint, tmp_path / "bad_json")
    (bad_json / "model.json").write_text("{not json")
    cases.append((bad_json, "p4", "is not valid JSON"))
    other_kind = copy_checkpoint(tiny_checkpoint, tmp_path / "other_kind")
    config = json.loads((other_kind / "model.json").read_text())
    (other_kind / "model.json").write_text(json.dumps({**config, "kind": "autoencoder"}))
    cases.append((other_kind, "p5", "serving needs a 'latent-diffusion' one"))
    unet_only = copy_checkpoint(tiny_checkpoint, tmp_path / "unet_only")
    (unet_only / "model.safetensors").write_bytes(safetensors({"unet.w": [2, 2]}))
    cases.append((unet_only, "p6", "holds no weights for autoencoder, text_encoder"))
    truncated = copy_checkpoint(tiny_checkpoint, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((truncated, "p7", "lies outside the file"))
    bad_sampler = copy_checkpoint(tiny_checkpoint, tmp_path / "bad_sampler")
    sampled = {**config, "sampling_defaults": {"sampler": "euler", "steps": 10}}
    (bad_sampler / "model.json").write_text(json.dumps(sampled))
    cases.append((bad_sampler, "p8", "unknown sampler 'euler'"))
    cases.append((tmp_path / "missing", "p9", "is not a directory"))
    cases.append((good, "default", "'default' is reserved"))
    cases.append((good, "shipped", "'shipped' is reserved"))
    cases.append((good, "../up", "is not valid"))
    cases.append((good, "x" * 129, "is not valid"))

    for directory, name, words in cases:
        code, out, err = dq("model", "import", str(directory), "--name", name)
        assert code == 2, (name, out, err)
        assert err.startswith("dq: error: ") and words in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and out == ""
    assert versions(engine) == {} and audit(engine) == []
    assert not (tmp_path / "objects").exists() or objects(tmp_path) == []

    assert dq("model", "import", str(good), "--name", "v1")[0] == 0
    code, _, err = dq("model", "import", str(good), "--name", "v1")
    assert code == 2 and "'v1' exists already" in err
    assert list(versions(engine)) == ["v1"]


def test_activation_passes_the_gate_or_is_forced_and_retire_and_canary_are_audited(
    dq: Any, engine: Engine, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # An active version with an eval: an imported one (no eval) cannot show it does not regress.
    assert dq("model", "import", str(tiny_checkpoint), "--name", "trained")[0] == 0
    with session_scope(engine) as session:
        trained = session.scalar(select(ModelVersion).where(ModelVersion.name == "trained"))
        assert trained is not None
        trained.metrics = {"eval": {"fid": 20.0, "n": 256, "adherence": 0.95}}
        activate_version(session, trained.id)
    stored = objects(tmp_path)

    code, out, err = dq("model", "import", str(tiny_checkpoint), "--name", "ext", "--activate")
    assert code == 2 and "it has no eval, while the active one has FID 20.00" in err
    assert "ext" not in versions(engine) and objects(tmp_path) == stored  # nothing uploaded

    code, out, err = dq("model", "import", str(tiny_checkpoint), "--name", "ext")
    assert code == 0, err
    code, out, err = dq("model", "activate", "ext")
    assert code == 2 and "regresses against the active 'trained'" in err and "--force" in err
    assert versions(engine)["trained"].is_active

    code, out, err = dq("model", "activate", "ext", "--force")
    assert code == 0 and out.strip() == "ext is active", err
    forced = [d for _, a, d in audit(engine) if a == "model.activate"]
    assert forced[-1]["forced"] is True and forced[-1]["gate"]["active_eval"]["fid"] == 20.0

    code, _, err = dq("model", "canary", "trained", "--percent", "10")
    assert code == 0, err
    assert versions(engine)["trained"].canary_percent == 10
    code, _, err = dq("model", "retire", "trained")
    assert code == 2 and "is the canary" in err
    assert dq("model", "canary", "--end")[1].strip() == "the canary trained has ended"
    assert dq("model", "retire", "trained")[1].strip() == "trained is retired"
    assert dq("model", "retire", "trained")[1].strip() == "trained was retired already"
    code, _, err = dq("model", "activate", "trained", "--force")
    assert code == 2 and "is retired" in err
    code, _, err = dq("model", "retire", "ext")
    assert code == 2 and "is the active one" in err
    code, _, err = dq("model", "activate", "nope")
    assert code == 2 and "there is no model version 'nope'" in err
    code, _, err = dq("model", "canary", "ext")
    assert code == 2 and "--percent" in err
    assert dq("model", "activate", "shipped")[1].strip() == "the shipped model is active"

    actions = [a for _, a, _ in audit(engine)]
    assert actions == [
        "model.import",
        "model.import",
        "model.activate",
        "model.canary",
        "model.canary",
        "model.retire",
        "model.activate",
    ]
    assert {actor for actor, _, _ in audit(engine)} == {"cli"}
