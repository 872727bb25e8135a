"""kmsctl end to end against a fake kmsd: human and JSON output, inputs, exit codes."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
from pathlib import Path

import grpc
import pytest
from kms.v1 import resources_pb2 as res
from kms_fake import FakeCluster, FakeKms, make_status

from kms_client.cli import COMMANDS, main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def ep(fake: FakeKms) -> list[str]:
    return ["--endpoint", fake.address]


def _create(capsys: pytest.CaptureFixture[str], ep: list[str], *extra: str) -> dict[str, object]:
    code, out, _ = run(capsys, *ep, "--json", "create-key", *extra)
    assert code == 0
    return json.loads(out)["key_metadata"]  # type: ignore[no-any-return]


def test_every_rpc_has_a_subcommand() -> None:
    assert len(COMMANDS) == 34
    assert len({c.name for c in COMMANDS}) == 34


def test_put_key_policy_reads_a_file_stdin_or_text(
    capsys: pytest.CaptureFixture[str],
    ep: list[str],
    fake: FakeKms,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    document = '{"Version": "2012-10-17", "Statement": []}'
    path = tmp_path / "policy.json"
    path.write_text(document)
    assert run(capsys, *ep, "put-key-policy", "--key-id", "k", "--policy", str(path))[0] == 0
    assert run(capsys, *ep, "put-key-policy", "--key-id", "k", "--policy", document)[0] == 0
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"{}")))
    assert run(capsys, *ep, "put-key-policy", "--key-id", "k", "--policy", "-")[0] == 0
    sent = fake.calls_of("PutKeyPolicy")
    assert [r.policy for r in sent] == [document, document, "{}"]
    assert all(r.policy_name == "default" and r.request_id for r in sent)


def test_create_grant_and_retire_grant(
    capsys: pytest.CaptureFixture[str], ep: list[str], fake: FakeKms
) -> None:
    code, _, err = run(
        capsys,
        *ep,
        "create-grant",
        "--key-id",
        "k",
        "--grantee-principal",
        "spiffe://x/bob",
        "--operation",
        "Encrypt",
        "--operation",
        "re-encrypt-from",
        "--constraint-equals",
        "tenant=a",
        "--name",
        "n",
    )
    assert code == 0, err
    (request,) = fake.calls_of("CreateGrant")
    assert list(request.operations) == [
        res.GRANT_OPERATION_ENCRYPT,
        res.GRANT_OPERATION_RE_ENCRYPT_FROM,
    ]
    assert dict(request.constraints.encryption_context_equals) == {"tenant": "a"}
    assert not request.constraints.encryption_context_subset
    # retire-grant needs a token, or a key id and a grant id.
    assert run(capsys, *ep, "retire-grant", "--key-id", "k")[0] == 2
    assert run(capsys, *ep, "retire-grant", "--grant-token", "t")[0] == 0
    assert run(capsys, *ep, "revoke-grant", "--key-id", "k", "--grant-id", "g")[0] == 0
    assert [r.grant_token for r in fake.calls_of("RetireGrant")] == ["t"]
    assert run(capsys, *ep, "create-grant", "--key-id", "k", "--grantee-principal", "p")[0] == 2


def test_create_key_human_output(capsys: pytest.CaptureFixture[str], ep: list[str]) -> None:
    code, out, err = run(capsys, *ep, "create-key", "--description", "payments", "--tag", "t=v")
    assert code == 0 and err == ""
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines())}
    assert fields["KeyState"] == "Enabled"
    assert fields["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert fields["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert fields["Origin"] == "AWS_KMS"
    assert fields["KeyManager"] == "CUSTOMER"
    assert fields["EncryptionAlgorithms"] == "SYMMETRIC_DEFAULT"
    assert fields["Enabled"] == "true"
    assert fields["Description"] == "payments"
    assert fields["CreationDate"] == "2024-05-01T12:00:00+00:00"
    assert fields["Arn"].startswith("arn:aws:kms:")
    # Values are aligned in one column.
    starts = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in out.splitlines()}
    assert len(starts) == 1


def test_create_key_json_output(capsys: pytest.CaptureFixture[str], ep: list[str]) -> None:
    code, out, _ = run(capsys, *ep, "--json", "create-key", "--description", "d")
    assert code == 0
    doc = json.loads(out)
    assert doc["key_metadata"]["key_state"] == "KEY_STATE_ENABLED"
    assert doc["key_metadata"]["description"] == "d"
    assert doc["commit_index"]


def test_global_options_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], fake: FakeKms
) -> None:
    code, out, _ = run(capsys, "create-key", "--endpoint", fake.address, "--json")
    assert code == 0
    assert "key_metadata" in json.loads(out)


def test_endpoint_from_environment(
    capsys: pytest.CaptureFixture[str],
    cluster: FakeCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = cluster.start("a"), cluster.start("b")
    monkeypatch.setenv("KMSD_ENDPOINT", f"{a.address}, {b.address}")
    code, out, _ = run(capsys, "generate-random", "--number-of-bytes", "3")
    assert code == 0
    assert out.strip() == f"Plaintext: {base64.b64encode(bytes(range(3))).decode()}"
    assert len(a.calls) == 1 and b.calls == []


def test_encrypt_decrypt_round_trip(
    capsys: pytest.CaptureFixture[str], ep: list[str], tmp_path: Path
) -> None:
    key = _create(capsys, ep)
    code, out, _ = run(
        capsys,
        *ep,
        "--json",
        "encrypt",
        "--key-id",
        str(key["key_id"]),
        "--plaintext",
        "hello world",
        "--context",
        "tenant=a",
        "--context",
        "k=v=w",
    )
    assert code == 0
    blob_b64 = json.loads(out)["ciphertext_blob"]

    # Human output: base64 plaintext among the other fields.
    code, out, _ = run(
        capsys,
        *ep,
        "decrypt",
        "--ciphertext-blob",
        blob_b64,
        "--context",
        "tenant=a",
        "--context",
        "k=v=w",
    )
    assert code == 0
    assert f"Plaintext:           {base64.b64encode(b'hello world').decode()}" in out
    assert "EncryptionAlgorithm: SYMMETRIC_DEFAULT" in out

    # --out -: only the raw plaintext on stdout.
    code, out, _ = run(
        capsys,
        *ep,
        "decrypt",
        "--ciphertext-blob",
        blob_b64,
        "--context",
        "tenant=a",
        "--context",
        "k=v=w",
        "--out",
        "-",
    )
    assert code == 0 and out == "hello world"

    # Ciphertext from a raw file; plaintext to a private file.
    ct_file = tmp_path / "ct.bin"
    ct_file.write_bytes(base64.b64decode(blob_b64))
    pt_file = tmp_path / "pt.bin"
    code, out, _ = run(
        capsys,
        *ep,
        "decrypt",
        "--ciphertext-file",
        str(ct_file),
        "--context",
        "tenant=a",
        "--context",
        "k=v=w",
        "--out",
        str(pt_file),
    )
    assert code == 0
    assert pt_file.read_bytes() == b"hello world"
    assert stat.S_IMODE(os.stat(pt_file).st_mode) == 0o600
    assert "Plaintext" not in out and "KeyId" in out


def test_encrypt_from_file_to_file(
    capsys: pytest.CaptureFixture[str], ep: list[str], tmp_path: Path, fake: FakeKms
) -> None:
    key = _create(capsys, ep)
    src = tmp_path / "in.bin"
    src.write_bytes(b"\x00\x01binary")
    dst = tmp_path / "out.bin"
    code, out, _ = run(
        capsys,
        *ep,
        "encrypt",
        "--key-id",
        str(key["key_id"]),
        "--plaintext-file",
        str(src),
        "--out",
        str(dst),
    )
    assert code == 0
    assert fake.calls_of("Encrypt")[0].plaintext == b"\x00\x01binary"
    assert dst.read_bytes().startswith(b"FAKECT")  # the fake's raw ciphertext handle
    assert "CiphertextBlob" not in out


def test_list_keys_all_follows_markers(capsys: pytest.CaptureFixture[str], ep: list[str]) -> None:
    ids = sorted(str(_create(capsys, ep)["key_id"]) for _ in range(3))

    code, out, _ = run(capsys, *ep, "list-keys", "--limit", "2")
    assert code == 0
    assert out.count("KeyId:") == 2 and "NextMarker: 2" in out

    code, out, _ = run(capsys, *ep, "list-keys", "--limit", "2", "--all")
    assert code == 0
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("KeyId:")] == ids
    assert "NextMarker" not in out

    code, out, _ = run(capsys, *ep, "--json", "list-keys", "--limit", "1", "--all")
    doc = json.loads(out)
    assert [k["key_id"] for k in doc["keys"]] == ids
    assert "truncated" not in doc


def test_tags(capsys: pytest.CaptureFixture[str], ep: list[str]) -> None:
    key_id = str(_create(capsys, ep, "--tag", "team=billing")["key_id"])
    assert run(capsys, *ep, "tag-resource", "--key-id", key_id, "--tag", "env=prod")[0] == 0
    code, out, _ = run(capsys, *ep, "list-resource-tags", "--key-id", key_id)
    assert code == 0
    assert out.split("\n\n") == [
        "TagKey:   env\nTagValue: prod",
        "TagKey:   team\nTagValue: billing\n",
    ]


def test_service_error_exit_code_and_message(
    capsys: pytest.CaptureFixture[str], ep: list[str]
) -> None:
    code, out, err = run(capsys, *ep, "describe-key", "--key-id", "nope")
    assert code == 1 and out == ""
    assert err == "error: NotFoundException: Key 'nope' not found\n"


def test_field_violations_are_printed(
    capsys: pytest.CaptureFixture[str], ep: list[str], fake: FakeKms
) -> None:
    fake.fail(
        "ScheduleKeyDeletion",
        make_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "2 fields are invalid",
            reason="VALIDATION_FAILED",
            aws_exception="ValidationException",
            violations=(
                ("pending_window_in_days", "must be 7-30"),
                ("key_id", "required"),
            ),
        ),
    )
    code, _, err = run(
        capsys, *ep, "schedule-key-deletion", "--key-id", "k", "--pending-window-in-days", "3"
    )
    assert code == 1
    assert err.splitlines() == [
        "error: ValidationException: 2 fields are invalid",
        "  pending_window_in_days: must be 7-30",
        "  key_id: required",
    ]


def test_single_violation_repeating_the_message_is_printed_once(
    capsys: pytest.CaptureFixture[str], ep: list[str], fake: FakeKms
) -> None:
    fake.fail(
        "CreateAlias",
        make_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "alias_name: reserved",
            reason="INVALID_ALIAS_NAME",
            aws_exception="InvalidAliasNameException",
            violations=(("alias_name", "reserved"),),
        ),
    )
    code, _, err = run(
        capsys, *ep, "create-alias", "--alias-name", "alias/aws/x", "--target-key-id", "k"
    )
    assert code == 1
    assert err == "error: InvalidAliasNameException: alias_name: reserved\n"


def test_unreachable_cluster_is_an_error(
    capsys: pytest.CaptureFixture[str], dead_endpoint: str
) -> None:
    code, _, err = run(capsys, "--endpoint", dead_endpoint, "--max-attempts", "1", "list-keys")
    assert code == 1
    assert err.startswith("error: KMSInternalException: ")


@pytest.mark.parametrize(
    "argv",
    [
        ["describe-key"],  # missing --key-id
        ["encrypt", "--key-id", "k"],  # no plaintext
        ["encrypt", "--key-id", "k", "--plaintext", "a", "--plaintext-file", "f"],
        ["encrypt", "--key-id", "k", "--plaintext", "a", "--context", "novalue"],
        ["decrypt", "--ciphertext-blob", "***"],
        ["create-key", "--key-spec", "RSA_1"],
        ["no-such-command"],
        [],
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str], ep: list[str], fake: FakeKms
) -> None:
    code, out, err = run(capsys, *ep, *argv)
    assert code == 2
    assert "error" in err
    assert fake.calls == []


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "encrypt", "--help")
    assert code == 0 and "--plaintext-file" in out


def test_generate_data_key_outputs(
    capsys: pytest.CaptureFixture[str], ep: list[str], tmp_path: Path
) -> None:
    key_id = str(_create(capsys, ep)["key_id"])
    wrapped = tmp_path / "dk.wrapped"
    plain = tmp_path / "dk.plain"
    code, out, _ = run(
        capsys,
        *ep,
        "generate-data-key",
        "--key-id",
        key_id,
        "--out",
        str(wrapped),
        "--plaintext-out",
        str(plain),
    )
    assert code == 0
    assert len(plain.read_bytes()) == 32 and wrapped.read_bytes()
    assert "Plaintext" not in out and "CiphertextBlob" not in out
    assert "KeyMaterialId:" in out
