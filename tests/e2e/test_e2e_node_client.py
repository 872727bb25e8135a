"""Cross-language end-to-end test: the Node.js example client against a real kmsd.

Runs clients/node/kms_example.js (grpc-js + proto-loader, protos loaded at runtime)
against the module's `kmsd` process, checks the JSON it prints, and checks interop
both ways: a ciphertext made in Node decrypts from Python and one made in Python
decrypts from Node. The Node dependencies are installed on first use with
`npm ci` (exact versions from package-lock.json).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from kms.v1 import kms_service_pb2 as pb

from kmsd_process import KmsdProcess

pytestmark = [pytest.mark.e2e, pytest.mark.node]

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "clients" / "node"
SCRIPT = NODE_DIR / "kms_example.js"
REQUIRED_MODULES = ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs")
INSTALL_TIMEOUT = 300
RUN_TIMEOUT = 90

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
KEY_ARN = re.compile(rf"^arn:aws:kms:[a-z0-9-]+:\d{{12}}:key/({UUID})$")

PY_PLAINTEXT = "made in Python ✓ \x00\xff".encode()
PY_CONTEXT = {"origin": "python", "tenant": "ünïcødé"}


def _node_tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js tests need `node` and `npm` on PATH (install Node.js 18+)")
    return node, npm


def _deps_installed() -> bool:
    modules = NODE_DIR / "node_modules"
    return all((modules / name / "package.json").is_file() for name in REQUIRED_MODULES)


def _install_deps(npm: str) -> None:
    """`npm ci` from the committed lock file (`npm install` if there is none)."""
    if _deps_installed():
        return
    verb = "ci" if (NODE_DIR / "package-lock.json").is_file() else "install"
    cmd = [npm, verb, "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"]
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    assert _deps_installed(), f"{' '.join(cmd)} did not install {REQUIRED_MODULES}"


def _run_example(node: str, endpoint: str, env_extra: dict[str, str]) -> dict[str, Any]:
    done = subprocess.run(
        [node, str(SCRIPT), endpoint],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        env={**os.environ, **env_extra},
        check=False,
    )
    assert done.returncode == 0, (
        f"kms_example.js exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got:\n{done.stdout}"
    result: dict[str, Any] = json.loads(lines[0])
    return result


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


@pytest.fixture(scope="module")
def python_ciphertext(kmsd: KmsdProcess) -> tuple[pb.KeyMetadata, bytes]:
    """A key and a ciphertext made from Python, for Node to decrypt."""
    stub = kmsd.stub()
    key = stub.CreateKey(pb.CreateKeyRequest(description="python side of the node test"))
    blob = stub.Encrypt(
        pb.EncryptRequest(
            key_id=key.key_metadata.key_id,
            plaintext=PY_PLAINTEXT,
            encryption_context=PY_CONTEXT,
        )
    ).ciphertext_blob
    return key.key_metadata, blob


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` executable, with the example's dependencies installed."""
    node, npm = _node_tools()
    _install_deps(npm)
    return node


@pytest.fixture(scope="module")
def node_result(
    node: str, kmsd: KmsdProcess, python_ciphertext: tuple[pb.KeyMetadata, bytes]
) -> Any:
    """The JSON kms_example.js prints, given a Python-made ciphertext to decrypt too."""
    _, blob = python_ciphertext
    return _run_example(
        node,
        kmsd.endpoint,
        {
            "KMS_EXAMPLE_CIPHERTEXT_B64": base64.b64encode(blob).decode(),
            "KMS_EXAMPLE_CONTEXT_JSON": json.dumps(PY_CONTEXT),
            **kmsd.kmsctl_env(),  # KMSD_CA, KMSD_CERT, KMSD_KEY: mutual TLS as the admin
        },
    )


def test_created_key_and_describe(node_result: Any) -> None:
    created = node_result["create_key"]
    match = KEY_ARN.match(created["arn"])
    assert match, created["arn"]
    assert match.group(1) == created["key_id"]
    assert created["key_state"] == "KEY_STATE_ENABLED"
    assert created["key_spec"] == "KEY_SPEC_SYMMETRIC_DEFAULT"
    assert created["description"] == "created by clients/node/kms_example.js"
    assert int(created["commit_index"]) > 0
    assert node_result["tags"] == [{"tag_key": "created-by", "tag_value": "node-example"}]
    described = node_result["describe_key"]
    assert described["key_id"] == created["key_id"]
    assert described["arn"] == created["arn"]
    assert described["description"] == created["description"]
    assert described["enabled"] is True


def test_encrypt_decrypt_round_trip(node_result: Any) -> None:
    arn = node_result["create_key"]["arn"]
    assert node_result["encrypt"]["key_id"] == arn
    assert node_result["decrypt"]["key_id"] == arn
    assert node_result["encrypt"]["encryption_algorithm"] == (
        "ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT"
    )
    plaintext = _b64(node_result["encrypt"]["plaintext_b64"])
    assert plaintext
    assert _b64(node_result["decrypt"]["plaintext_b64"]) == plaintext
    assert re.fullmatch(r"[0-9a-f]{64}", node_result["decrypt"]["key_material_id"])


def test_data_key(node_result: Any) -> None:
    data_key = node_result["data_key"]
    plaintext = _b64(data_key["plaintext_b64"])
    assert len(plaintext) == 32 == data_key["length"]
    assert _b64(data_key["decrypted_b64"]) == plaintext
    assert data_key["key_id"] == node_result["create_key"]["arn"]


def test_alias(node_result: Any) -> None:
    alias = node_result["alias"]
    assert alias["alias_name"].startswith("alias/node-example-")
    assert alias["encrypt_key_id"] == node_result["create_key"]["arn"]
    assert _b64(alias["decrypted_b64"]) == b"via alias"


def test_error_carries_grpc_code_and_error_info(node_result: Any) -> None:
    error = node_result["expected_error"]
    assert error["rpc"] == "Decrypt"
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
    assert error["code_name"] == "INVALID_ARGUMENT"
    assert error["aws_exception"] == "InvalidCiphertextException"
    assert error["reason"] == "INVALID_CIPHERTEXT"
    assert error["domain"] == "kmsd"


def test_node_ciphertexts_decrypt_from_python(kmsd: KmsdProcess, node_result: Any) -> None:
    stub = kmsd.stub()
    arn = node_result["create_key"]["arn"]
    encrypted = node_result["encrypt"]
    out = stub.Decrypt(
        pb.DecryptRequest(
            ciphertext_blob=_b64(encrypted["ciphertext_b64"]),
            encryption_context=encrypted["encryption_context"],
        )
    )
    assert out.plaintext == _b64(encrypted["plaintext_b64"])
    assert out.key_id == arn

    data_key = stub.Decrypt(
        pb.DecryptRequest(
            ciphertext_blob=_b64(node_result["data_key"]["ciphertext_b64"]),
            encryption_context=encrypted["encryption_context"],
            key_id=node_result["create_key"]["key_id"],
        )
    )
    assert data_key.plaintext == _b64(node_result["data_key"]["plaintext_b64"])

    via_alias = stub.Decrypt(
        pb.DecryptRequest(
            ciphertext_blob=_b64(node_result["alias"]["ciphertext_b64"]),
            key_id=node_result["alias"]["alias_name"],
        )
    )
    assert via_alias.plaintext == b"via alias"

    # And the same wrong-context failure looks the same from Python.
    with pytest.raises(grpc.RpcError) as info:
        stub.Decrypt(
            pb.DecryptRequest(
                ciphertext_blob=_b64(encrypted["ciphertext_b64"]),
                encryption_context={**encrypted["encryption_context"], "purpose": "wrong"},
            )
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
    assert status is not None
    error_info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(error_info)
    assert error_info.metadata["aws_exception"] == "InvalidCiphertextException"


def test_python_ciphertext_decrypts_from_node(
    node_result: Any, python_ciphertext: tuple[pb.KeyMetadata, bytes]
) -> None:
    key, _ = python_ciphertext
    external = node_result["external_decrypt"]
    assert _b64(external["plaintext_b64"]) == PY_PLAINTEXT
    assert external["key_id"] == key.arn
