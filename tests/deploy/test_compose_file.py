"""deploy/docker-compose.yml checked statically: the app's least-privilege MinIO user (root
credentials only in minio and minio-init), the migration before everything of ours, image URLs
a browser can load, pinned images and dropped privileges."""

from __future__ import annotations

import yaml

from tests.deploy.manifests import DEPLOY, compose, pinned

ROOT_CREDENTIAL_SERVICES = {"minio", "minio-init"}
APP_SERVICES = {"migrate", "web", "reaper", "worker-generate", "worker-train", "worker-webhooks"}


def test_only_minio_and_its_init_get_the_root_credentials() -> None:
    for name, service in compose()["services"].items():
        env = service.get("environment", {})
        text = yaml.safe_dump(env)
        has_root = "MINIO_ROOT_" in text
        assert has_root == (name in ROOT_CREDENTIAL_SERVICES), name
    for name in APP_SERVICES:
        env = compose()["services"][name]["environment"]
        assert env["AWS_ACCESS_KEY_ID"] == "${MINIO_APP_ACCESS_KEY}", name
        assert env["AWS_SECRET_ACCESS_KEY"] == "${MINIO_APP_SECRET_KEY}", name
    example = (DEPLOY / ".env.example").read_text()
    assert "MINIO_APP_ACCESS_KEY=" in example and "MINIO_APP_SECRET_KEY=change-me" in example


def test_minio_init_grants_the_app_its_bucket_and_nothing_more() -> None:
    import json

    script = compose()["services"]["minio-init"]["command"][0]
    policy = json.loads(script.split("<<'POLICY'\n", 1)[1].split("\nPOLICY\n", 1)[0])
    grants = {
        (action, resource)
        for statement in policy["Statement"]
        if statement["Effect"] == "Allow"
        for action in statement["Action"]
        for resource in statement["Resource"]
    }
    objects = "arn:aws:s3:::dq-objects/*"
    assert grants == {
        ("s3:ListBucket", "arn:aws:s3:::dq-objects"),
        ("s3:GetObject", objects),
        ("s3:PutObject", objects),
        ("s3:DeleteObject", objects),
    }
    assert "mc mb --ignore-existing local/dq-objects" in script
    assert 'mc admin user add local "$$MINIO_APP_ACCESS_KEY"' in script
    assert "mc admin policy attach local dq-app" in script
    assert compose()["x-dq-env"]["DQ_STORAGE_URL"].startswith("s3://dq-objects/")


def test_every_app_service_waits_for_the_migration() -> None:
    services = compose()["services"]
    assert services["migrate"]["command"] == ["dq", "db", "upgrade"]
    assert services["migrate"]["restart"] == "no"
    for name in APP_SERVICES - {"migrate"}:
        after = services[name]["depends_on"]
        assert after["migrate"] == {"condition": "service_completed_successfully"}, name
        assert after["minio-init"] == {"condition": "service_completed_successfully"}, name
        assert "--migrate" not in services[name]["command"], name


def test_browsers_get_image_urls_for_the_published_minio_port() -> None:
    env = compose()["x-dq-env"]
    assert env["DQ_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["DQ_S3_PUBLIC_ENDPOINT_URL"] == "${DQ_S3_PUBLIC_ENDPOINT_URL:-http://localhost:9000}"
    assert "9000:9000" in compose()["services"]["minio"]["ports"]


def test_every_compose_service_is_pinned_and_hardened() -> None:
    for name, service in compose()["services"].items():
        assert pinned(service["image"]), f"{name}: {service['image']} is not pinned"
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert service["cap_drop"] == ["ALL"], name
        if name in APP_SERVICES | {"redis", "postgres"}:
            assert service["read_only"] is True, name
        if service.get("restart") == "unless-stopped":
            assert "healthcheck" in service, f"{name} runs for good with no health check"
    for name in APP_SERVICES:
        assert "/tmp" in compose()["services"][name]["tmpfs"], name
