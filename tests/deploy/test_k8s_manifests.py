"""deploy/k8s hardened, checked statically: each manifest against Kubernetes' own schemas
(kubernetes-validate, offline), then the rules a public deployment needs: non-root pods without
privileges or a service-account token, pinned images, limits and probes, bounded scratch, a
NetworkPolicy that opens only the web, migrations in the Job alone, /metrics behind a token."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.manifests import (
    APP_UID,
    DEPLOY,
    ROOT,
    all_containers,
    k8s_docs,
    name_of,
    pinned,
    pod_labels,
    pod_spec,
    selects,
    workloads,
)

# The oldest Kubernetes the manifests promise to apply on, and the newest the validator knows.
K8S_VERSIONS = ("1.30", "latest")
# Custom resources: no OpenAPI schema ships for them; test_deploy_files checks their fields.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject")}
OUR_COMPONENTS = {"web", "worker-generate", "worker-train", "worker-webhooks", "reaper", "migrate"}


def schema_validated() -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if (d["apiVersion"], d["kind"]) not in CUSTOM_KINDS]


def k8s_version(name: str) -> str:
    from kubernetes_validate.utils import latest_version

    return str(latest_version()) if name == "latest" else name


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", schema_validated(), ids=name_of)
def test_every_manifest_is_valid_for_the_kubernetes_schema(
    doc: dict[str, Any], version: str
) -> None:
    # Strict: an unknown or misspelt field (securityContex, sizelimit) fails, as kubectl's
    # server-side validation would. The schemas ship inside the package: no network.
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, k8s_version(version), strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{name_of(doc)}: {e.message} at {'/'.join(map(str, e.path))}")


def test_only_the_keda_custom_resource_goes_without_a_schema() -> None:
    unchecked = {(d["apiVersion"], d["kind"]) for d in k8s_docs()} - {
        (d["apiVersion"], d["kind"]) for d in schema_validated()
    }
    assert unchecked == CUSTOM_KINDS


def test_the_schema_validation_catches_a_misspelt_field() -> None:
    import kubernetes_validate

    web = next(d for d in workloads() if d["metadata"]["name"] == "dq-web")
    broken = yaml.safe_load(yaml.safe_dump(web))
    pod_spec(broken)["securityContex"] = pod_spec(broken).pop("securityContext")
    with pytest.raises(kubernetes_validate.ValidationError, match="securityContex"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("doc", workloads(), ids=name_of)
def test_every_pod_runs_as_the_image_user_without_privileges(doc: dict[str, Any]) -> None:
    spec = pod_spec(doc)
    assert spec.get("automountServiceAccountToken") is False
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == APP_UID
    for c in all_containers(doc):
        ctx = c["securityContext"]
        seccomp = ctx.get("seccompProfile", pod.get("seccompProfile"))
        assert seccomp == {"type": "RuntimeDefault"}, c["name"]
        assert ctx["allowPrivilegeEscalation"] is False, c["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert ctx["readOnlyRootFilesystem"] is True, c["name"]
        assert not ctx.get("privileged"), c["name"]
        assert ctx.get("runAsUser", APP_UID) != 0, c["name"]


@pytest.mark.parametrize("doc", workloads(), ids=name_of)
def test_every_container_has_a_pinned_image_resources_and_probes(doc: dict[str, Any]) -> None:
    for c in all_containers(doc):
        assert pinned(c["image"]), f"{c['name']}: {c['image']} is not pinned"
        resources = c["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), c["name"]
        assert {"cpu", "memory"} <= set(resources["limits"]), c["name"]
        if doc["kind"] == "Deployment":  # a Job's container ends on its own; no probe needed
            assert "livenessProbe" in c and "readinessProbe" in c, c["name"]


@pytest.mark.parametrize("doc", workloads(), ids=name_of)
def test_the_read_only_root_has_bounded_writable_scratch(doc: dict[str, Any]) -> None:
    spec = pod_spec(doc)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for volume in volumes.values():
        if "emptyDir" in volume:
            assert volume["emptyDir"].get("sizeLimit"), f"emptyDir {volume['name']} is unbounded"
    for c in all_containers(doc):
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert set(mounts.values()) <= set(volumes), c["name"]
        # Python's tempfile and gunicorn's heartbeats need a writable /tmp.
        assert "/tmp" in mounts, f"{c['name']} has no writable /tmp"
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        liveness = env.get("DQ_WORKER_LIVENESS_FILE")
        if liveness:
            assert any(liveness.startswith(path + "/") for path in mounts), liveness
        if c["command"][:2] == ["dq", "worker"] and "webhooks" not in c["command"]:
            config = next(d for d in k8s_docs() if d["kind"] == "ConfigMap")["data"]
            for setting in ("DQ_MODEL_CACHE_DIR", "DQ_WORK_DIR"):
                assert any(config[setting].startswith(p + "/") for p in mounts), setting


def test_only_the_migrate_job_changes_the_schema() -> None:
    for doc in workloads():
        for c in all_containers(doc):
            argv = c["command"] + c.get("args", [])
            assert "--migrate" not in argv, name_of(doc)
            assert argv[:2] != ["dq", "serve"], name_of(doc)
            migrates = argv[:3] == ["dq", "db", "upgrade"]
            assert migrates == (doc["metadata"]["name"] == "dq-migrate"), name_of(doc)
    # The web image's default command does not migrate either.
    assert "--migrate" not in (DEPLOY / "Dockerfile.web").read_text()
    guide = (ROOT / "docs" / "DEPLOY.md").read_text()
    assert "kubectl wait --for=condition=complete" in guide


def test_the_network_policy_denies_by_default_and_opens_only_the_web() -> None:
    policies = [d for d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    assert any(
        p["spec"]["podSelector"] == {}
        and "Ingress" in p["spec"]["policyTypes"]
        and not p["spec"].get("ingress")
        for p in policies
    ), "no default-deny ingress policy"
    pods = {pod_labels(d)["app.kubernetes.io/component"]: pod_labels(d) for d in workloads()}
    assert set(pods) == OUR_COMPONENTS
    opened = {
        component
        for p in policies
        if p["spec"].get("ingress")
        for component, labels in pods.items()
        if selects(p["spec"]["podSelector"], labels)
    }
    assert opened == {"web"}, "workers, the reaper and migrate must get no ingress"
    web_rules = [
        rule
        for p in policies
        if p["spec"].get("ingress") and selects(p["spec"]["podSelector"], pods["web"])
        for rule in p["spec"]["ingress"]
    ]
    sources = [s["namespaceSelector"]["matchLabels"] for r in web_rules for s in r["from"]]
    assert {"kubernetes.io/metadata.name": "ingress-nginx"} in sources
    assert {port["port"] for r in web_rules for port in r["ports"]} == {8000}


def test_app_egress_reaches_only_dns_and_the_backing_services() -> None:
    policies = [
        d
        for d in k8s_docs()
        if d["kind"] == "NetworkPolicy" and "Egress" in d["spec"]["policyTypes"]
    ]
    for component, labels in {
        pod_labels(d)["app.kubernetes.io/component"]: pod_labels(d) for d in workloads()
    }.items():
        mine = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert mine, f"{component} has no egress policy"
        ports = {
            port["port"] for p in mine for rule in p["spec"]["egress"] for port in rule["ports"]
        }
        # Only the webhook sender leaves the cluster: HTTPS to public addresses.
        webhooks = component == "worker-webhooks"
        assert ports == {53, 5432, 6379, 9000} | ({443} if webhooks else set()), component
        for rule in (rule for p in mine for rule in p["spec"]["egress"]):
            blocks = [to["ipBlock"] for to in rule["to"] if "ipBlock" in to]
            if not webhooks:
                assert not blocks, "no open egress to addresses"
            for block in blocks:
                assert rule["ports"] == [{"protocol": "TCP", "port": 443}]
                for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"):
                    assert private in block.get("except", []), private
    # The backing services take connections from the app pods, not from the whole namespace.
    for name, port in (("postgresql", 5432), ("redis", 6379), ("minio", 9000)):
        rules = [
            rule
            for p in k8s_docs()
            if p["kind"] == "NetworkPolicy"
            and selects(p["spec"]["podSelector"], {"app.kubernetes.io/name": name})
            for rule in p["spec"].get("ingress", [])
        ]
        assert rules and all(r["ports"] == [{"protocol": "TCP", "port": port}] for r in rules)
        peers = [peer for r in rules for peer in r["from"]]
        assert all(peer.get("podSelector") != {} for peer in peers), name
        app_peers = [peer["podSelector"] for peer in peers if "podSelector" in peer]
        assert all(
            selects(s, {"app.kubernetes.io/component": c})
            for s in app_peers
            for c in OUR_COMPONENTS
        )
        assert not any(selects(s, {"app.kubernetes.io/name": "other"}) for s in app_peers)


def test_metrics_need_the_bearer_token_behind_the_public_ingress() -> None:
    secret = next(d for d in k8s_docs() if d["kind"] == "Secret")["stringData"]
    assert "CHANGE-ME" in secret["DQ_METRICS_TOKEN"]
    routes_web = [
        d
        for d in k8s_docs()
        if d["kind"] == "Ingress"
        and any(
            path["backend"]["service"]["name"] == "dq-web"
            for rule in d["spec"]["rules"]
            for path in rule["http"]["paths"]
        )
    ]
    assert routes_web, "no Ingress routes to the web app"
    text = (DEPLOY / "k8s" / "web.yaml").read_text()
    assert "bearerTokenSecret: {name: dq-secrets, key: DQ_METRICS_TOKEN}" in text
    web = next(d for d in workloads() if d["metadata"]["name"] == "dq-web")
    annotations = web["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_production_settings_parse_and_say_what_a_public_service_needs() -> None:
    from core.runtime.settings import Settings, SettingsError

    config = next(d for d in k8s_docs() if d["kind"] == "ConfigMap")["data"]
    secret = next(d for d in k8s_docs() if d["kind"] == "Secret")["stringData"]
    settings = Settings.from_env({**config, **secret})
    assert settings.form_requires_login is True
    assert settings.retention == 30 * 86400
    assert settings.trusted_proxy_hops == 1
    assert str(settings.s3_public_endpoint_url).startswith("https://")
    assert settings.s3_public_endpoint_url != settings.s3_endpoint_url
    # The example key stays a placeholder that the app refuses, in both examples.
    with pytest.raises(SettingsError, match="DQ_SECRET_KEY"):
        settings.check_secret_key()
    env_key = next(
        line.split("=", 1)[1]
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line.startswith("DQ_SECRET_KEY=")
    )
    with pytest.raises(SettingsError, match="DQ_SECRET_KEY"):
        Settings.from_env({**config, **secret, "DQ_SECRET_KEY": env_key}).check_secret_key()
