"""Fixtures of the client tests: fake kmsd nodes (see kms_fake.py) and clients bound to them."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kms_fake import FakeCluster, FakeKms, Sleeps, unused_loopback_address

from kms_client.client import KmsClient


@pytest.fixture(autouse=True)
def plaintext_kmsctl(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fakes serve plaintext on loopback: kmsctl is told so (`KMSD_NO_TLS=1`), and
    TLS files of the developer's environment are ignored."""
    for name in ("KMSD_CA", "KMSD_CERT", "KMSD_KEY", "KMSD_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KMSD_NO_TLS", "1")


@pytest.fixture
def cluster() -> Iterator[FakeCluster]:
    fakes = FakeCluster()
    try:
        yield fakes
    finally:
        fakes.stop()


@pytest.fixture
def fake(cluster: FakeCluster) -> FakeKms:
    return cluster.start("node-a")


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_client(sleeps: Sleeps) -> Iterator[Callable[..., KmsClient]]:
    made: list[KmsClient] = []

    def make(endpoints: list[str], **kwargs: Any) -> KmsClient:
        kwargs.setdefault("sleep", sleeps)
        kwargs.setdefault("rng", random.Random(7))
        kwargs.setdefault("timeout", 5.0)
        if "tls" not in kwargs and "credentials" not in kwargs:
            kwargs.setdefault("plaintext", True)  # the fakes serve plaintext on loopback
        client = KmsClient(endpoints, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(fake: FakeKms, make_client: Callable[..., KmsClient]) -> KmsClient:
    return make_client([fake.address])


@pytest.fixture
def dead_endpoint() -> str:
    return unused_loopback_address()
