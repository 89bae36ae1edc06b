"""Shared fixtures: a tiny, randomly initialised pipeline that is quick to build and run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy.engine import Engine

from core.diffusion.autoencoder import Autoencoder, AutoencoderConfig
from core.diffusion.data.shapes import vocabulary
from core.diffusion.pipeline import LatentDiffusion
from core.diffusion.schedule import NoiseSchedule
from core.diffusion.text import TextEncoder, TextEncoderConfig, WordTokenizer
from core.diffusion.unet import UNet, UNetConfig
from tests.fake_redis import FakeRedis, serve_fake_redis
from tests.services import postgres_schema

CHECKOUT_VAR = Path(__file__).resolve().parents[1] / "var"


def tmp_env(tmp_path: Path) -> dict[str, str]:
    """What keeps Settings built in a test from the embedded defaults' files in var/: the
    database and broker in ``tmp_path``, and a secret key (else var/secret_key is made)."""
    return {
        "DQ_DATABASE_URL": f"sqlite:///{tmp_path / 'unused.sqlite3'}",
        "DQ_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.sqlite3'}",
        "DQ_SECRET_KEY": "6f1d2c3b4a5e6f708192a3b4c5d6e7f8",
    }


@pytest.fixture(autouse=True)
def _the_checkout_gets_no_var() -> Iterator[None]:
    """Fails the test that makes var/ (the embedded defaults' files) in the checkout: a test
    that builds Settings or runs dq must point DQ_DATABASE_URL, DQ_BROKER_URL, DQ_SECRET_KEY
    and the like into its tmp_path. Inert where var/ is there already (a developer's dq serve)."""
    existed = CHECKOUT_VAR.exists()
    yield
    if not existed and CHECKOUT_VAR.exists():
        made = sorted(p.name for p in CHECKOUT_VAR.iterdir())
        import shutil

        shutil.rmtree(CHECKOUT_VAR)  # so that the next test is checked too
        pytest.fail(f"this test made var/ in the checkout ({', '.join(made) or 'empty'})")


TINY_AE = AutoencoderConfig(channels=(8, 16), groups=4, latent_scale_factor=1.0)
TINY_TEXT = TextEncoderConfig(width=32, layers=1, heads=2, max_length=16)
TINY_UNET = UNetConfig(
    channels=(16, 32), attention_levels=(False, True), heads=2, context_width=32, groups=8
)


def make_tiny_pipeline(seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    model = LatentDiffusion(
        Autoencoder(TINY_AE),
        TextEncoder(TINY_TEXT, WordTokenizer(vocabulary(), max_length=TINY_TEXT.max_length)),
        UNet(TINY_UNET),
        NoiseSchedule(),
        image_size=32,
    )
    # The UNet's last conv starts at zero; give it weights so outputs depend on the input.
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_pipeline() -> LatentDiffusion:
    return make_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_model")
    make_tiny_pipeline().save(d)
    return d


# --- services ----------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, then a fresh schema on the real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'dq.sqlite3'}"
        from core.db import dispose_engines

        dispose_engines()
    else:
        with postgres_schema() as url:
            yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """The schema of core.db.models on each backend (migrations are tested on their own)."""
    from core.db import Base, make_engine

    eng = make_engine(db_url)
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, over real HTTP."""
    from moto.server import ThreadedMotoServer

    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(var, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def fake_redis() -> Iterator[FakeRedis]:
    """fakeredis over TCP on a free loopback port (tests/fake_redis.py): no Redis needed."""
    with serve_fake_redis() as fake:
        yield fake
