"""Alice, Bob and a grant on a real 3-node `kmsd dev` cluster over mutual TLS: the
same authorization answer on every node, grants usable at once through their token,
encryption-context constraints, revocation and policy changes in force everywhere."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest

from kms_client import KmsClient
from kms_client.errors import AccessDeniedException, NotFoundException
from kms_client.tls import TlsFiles
from kmsd.auth import certs
from kmsd_process import KmsdProcess

pytestmark = pytest.mark.e2e

BOB = "spiffe://{cluster}/user/bob"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsdProcess]:
    process = KmsdProcess(tmp_path_factory.mktemp("authz") / "data", nodes=3).start()
    yield process
    process.stop()


def _as(cluster: KmsdProcess, name: str, endpoint: str) -> KmsClient:
    files = certs.client_files(cluster.tls_dir, name)
    if not files.cert.exists():
        files = certs.issue_client(cluster.tls_dir, name)
    return KmsClient([endpoint], tls=TlsFiles(cluster.ca_path, files.cert, files.key))


def _bob(cluster: KmsdProcess) -> str:
    return BOB.format(cluster=certs.cluster_id_of_ca(cluster.tls_dir))


def test_bob_needs_a_grant_and_its_constraint_and_revocation_hold_on_every_node(
    cluster: KmsdProcess,
) -> None:
    alice = _as(cluster, "alice", cluster.endpoints[0])
    bobs = [_as(cluster, "bob", endpoint) for endpoint in cluster.endpoints]
    try:
        created = alice.create_key(description="alice's")
        key = created.key_metadata.key_id
        blob = alice.encrypt(key, b"for bob's eyes", encryption_context={"app": "x"})
        other = alice.encrypt(key, b"not for bob", encryption_context={"app": "y"})
        missing = str(uuid.uuid4())

        # Denied everywhere, and a missing key looks exactly like a forbidden one.
        for bob in bobs:
            with pytest.raises(AccessDeniedException):
                bob.decrypt(
                    blob.ciphertext_blob,
                    encryption_context={"app": "x"},
                    min_commit_index=created.commit_index,
                )
            with pytest.raises(AccessDeniedException):
                bob.encrypt(key, b"x" * 20, min_commit_index=created.commit_index)
            with pytest.raises(AccessDeniedException) as denied_existing_describe:
                bob.describe_key(key, min_commit_index=created.commit_index)
            with pytest.raises(AccessDeniedException) as denied_missing:
                bob.describe_key(missing)
            assert str(denied_existing_describe.value).replace(key, missing) == str(
                denied_missing.value
            )
        with cluster.client() as admin, pytest.raises(NotFoundException):
            admin.describe_key(missing)

        grant = alice.create_grant(
            key, _bob(cluster), ["GRANT_OPERATION_DECRYPT"], encryption_context_equals={"app": "x"}
        )
        # With the token the grant works at once on every node, followers included.
        for bob in bobs:
            decrypted = bob.decrypt(
                blob.ciphertext_blob,
                encryption_context={"app": "x"},
                grant_tokens=[grant.grant_token],
            )
            assert decrypted.plaintext == b"for bob's eyes"
            with pytest.raises(AccessDeniedException):
                bob.decrypt(
                    other.ciphertext_blob,
                    encryption_context={"app": "y"},
                    grant_tokens=[grant.grant_token],
                )
            with pytest.raises(AccessDeniedException):  # Encrypt is not granted
                bob.encrypt(
                    key,
                    b"x" * 20,
                    encryption_context={"app": "x"},
                    grant_tokens=[grant.grant_token],
                )

        revoked = alice.revoke_grant(key, grant.grant_id)
        for bob in bobs:
            with pytest.raises(AccessDeniedException):
                bob.decrypt(
                    blob.ciphertext_blob,
                    encryption_context={"app": "x"},
                    grant_tokens=[grant.grant_token],
                    min_commit_index=revoked.commit_index,
                )
    finally:
        alice.close()
        for bob in bobs:
            bob.close()


def test_a_key_policy_allows_bob_and_an_explicit_deny_wins_on_every_node(
    cluster: KmsdProcess,
) -> None:
    alice = _as(cluster, "alice", cluster.endpoints[0])
    bobs = [_as(cluster, "bob", endpoint) for endpoint in cluster.endpoints]
    alice_principal = f"spiffe://{certs.cluster_id_of_ca(cluster.tls_dir)}/user/alice"
    try:
        key = alice.create_key().key_metadata.key_id
        blob = alice.encrypt(key, b"policy-protected", encryption_context={"app": "x"})
        owner = {
            "Sid": "Owner",
            "Effect": "Allow",
            "Principal": {"AWS": alice_principal},
            "Action": "kms:*",
            "Resource": "*",
        }
        bob_decrypts = {
            "Sid": "BobDecryptsApp",
            "Effect": "Allow",
            "Principal": {"AWS": _bob(cluster)},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {"StringEquals": {"kms:EncryptionContext:app": "x"}},
        }
        allowed = alice.put_key_policy(
            key,
            json.dumps({"Version": "2012-10-17", "Statement": [owner, bob_decrypts]}),
        )
        for bob in bobs:
            got = bob.decrypt(
                blob.ciphertext_blob,
                encryption_context={"app": "x"},
                min_commit_index=allowed.commit_index,
            )
            assert got.plaintext == b"policy-protected"

        deny_bob = {
            "Sid": "NoBob",
            "Effect": "Deny",
            "Principal": {"AWS": _bob(cluster)},
            "Action": "kms:*",
            "Resource": "*",
        }
        denied = alice.put_key_policy(
            key,
            json.dumps({"Version": "2012-10-17", "Statement": [owner, bob_decrypts, deny_bob]}),
        )
        for bob in bobs:
            with pytest.raises(AccessDeniedException):
                bob.decrypt(
                    blob.ciphertext_blob,
                    encryption_context={"app": "x"},
                    min_commit_index=denied.commit_index,
                )
    finally:
        alice.close()
        for bob in bobs:
            bob.close()
