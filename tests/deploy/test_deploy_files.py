"""deploy/ checked without Docker: the YAML parses, every command it runs is a real ``dq``
command with real options, and every DQ_* variable it sets is a real setting."""

from __future__ import annotations

import click
import pytest
import yaml

from core.cli import cli
from core.runtime.settings import setting_names
from tests.deploy.manifests import (
    APP_UID,
    DEPLOY,
    ROOT,
    compose,
    containers,
    k8s_docs,
    our_image,
)


def dq_commands() -> list[list[str]]:
    """Every command line of ours: compose services built from our images, k8s containers."""
    out = []
    for service in compose()["services"].values():
        if our_image(service.get("image", "")):
            out.append(service["command"])
    for doc in k8s_docs():
        for c in containers(doc):
            if our_image(c["image"]):
                out.append(c["command"] + c.get("args", []))
    for dockerfile in DEPLOY.glob("Dockerfile.*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("CMD "):
                out.append(yaml.safe_load(line[4:]))
    return out


def check_dq_command(argv: list[str]) -> None:
    assert argv[0] == "dq", argv
    command: click.Command = cli
    args = argv[1:]
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        assert name in command.commands, f"`dq {name}` does not exist ({argv})"
        command = command.commands[name]
    options = {opt for p in command.params for opt in getattr(p, "opts", [])}
    for token in args:
        if token.startswith("-"):
            assert token.split("=")[0] in options, f"{token} is not an option of {argv[:3]}"
    # The whole line parses as the CLI would parse it.
    ctx = command.make_context(argv[1], list(args), resilient_parsing=False)
    ctx.close()


def test_the_yaml_parses_and_has_what_a_deployment_needs() -> None:
    services = compose()["services"]
    assert {"redis", "postgres", "minio", "minio-init", "migrate", "web", "worker-generate",
            "worker-train", "reaper"} <= set(services)  # fmt: skip
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    gpu = services["worker-generate"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert all("healthcheck" in services[s] for s in ("redis", "postgres", "minio", "web"))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs()}
    assert {("Deployment", "dq-web"), ("Service", "dq-web"), ("Ingress", "dq-web"),
            ("Deployment", "dq-worker-generate"), ("ScaledObject", "dq-worker-generate"),
            ("Deployment", "dq-worker-train"), ("Deployment", "dq-reaper"),
            ("Job", "dq-migrate"), ("ConfigMap", "dq-config"), ("Secret", "dq-secrets"),
            ("NetworkPolicy", "dq-default-deny-ingress")} <= kinds  # fmt: skip
    gen = next(d for d in k8s_docs() if d["metadata"]["name"] == "dq-worker-generate")
    assert containers(gen)[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    scaled = next(d for d in k8s_docs() if d["kind"] == "ScaledObject")
    assert scaled["spec"]["triggers"][0]["metadata"]["listName"] == "generate"


@pytest.mark.parametrize("argv", dq_commands(), ids=lambda a: " ".join(a))
def test_every_command_they_run_exists_in_dq(argv: list[str]) -> None:
    check_dq_command(argv)


def test_every_variable_they_set_is_a_real_setting() -> None:
    names: set[str] = set()
    anchors = compose().get("x-dq-env", {})
    names |= set(anchors)
    for service in compose()["services"].values():
        env = service.get("environment", {})
        names |= set(env if isinstance(env, dict) else (e.split("=")[0] for e in env))
    for doc in k8s_docs():
        names |= set(doc.get("data", {})) | set(doc.get("stringData", {}))
        for c in containers(doc):
            names |= {e["name"] for e in c.get("env", [])}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("=")[0])
    for dockerfile in DEPLOY.glob("Dockerfile.*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("ENV "):
                names |= {kv.split("=")[0] for kv in line[4:].split()}
    ours = {n for n in names if n.startswith("DQ_")}
    assert ours, "no DQ_* variables found"
    assert ours <= setting_names(), sorted(ours - setting_names())


def test_images_run_as_a_non_root_user() -> None:
    # Numeric, so that Kubernetes' runAsNonRoot can verify it; the same ids as the manifests.
    for dockerfile in DEPLOY.glob("Dockerfile.*"):
        lines = dockerfile.read_text().splitlines()
        assert f"USER {APP_UID}:{APP_UID}" in lines, dockerfile.name
        assert any(
            f"groupadd --gid {APP_UID} dq" in line and f"--uid {APP_UID} --gid {APP_UID}" in line
            for line in lines
        ), dockerfile.name
    web = (DEPLOY / "Dockerfile.web").read_text()
    assert "pip install -e . " in web and "[model]" not in web
    assert "pip install -e '.[model]'" in (DEPLOY / "Dockerfile.worker").read_text()


def test_the_base_install_is_torch_free() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith(("torch", "numpy"))]
    assert any(d.startswith("torch") for d in project["optional-dependencies"]["model"])
    # Pillow (a few MB) checks and re-encodes the images sent to edit, in the web app too.
    assert any(d.startswith("pillow") for d in project["dependencies"])


def test_no_secret_is_committed() -> None:
    env = (DEPLOY / ".env.example").read_text()
    assert "change-me" in env.lower()
    assert not (DEPLOY / ".env").exists()
    secret = (DEPLOY / "k8s" / "secret.example.yaml").read_text()
    assert secret.count("CHANGE-ME") >= 4


def test_the_deploy_guide_documents_every_setting() -> None:
    guide = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert all(f"`{name}`" in guide for name in setting_names())


def test_web_readiness_is_the_database_only_endpoint() -> None:
    # /readyz asks the database alone; /readyz/dependencies would pull every web pod out of the
    # load balancer when Redis is down, though submits still succeed through the outbox.
    web = next(
        d for d in k8s_docs() if d["kind"] == "Deployment" and d["metadata"]["name"] == "dq-web"
    )
    probes = containers(web)[0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "/readyz'" in " ".join(compose()["services"]["web"]["healthcheck"]["test"])
