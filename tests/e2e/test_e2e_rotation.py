"""End-to-end: EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus,
RotateKeyOnDemand and ListKeyRotations over a real kmsd process. (Automatic rotation
needs days to pass; it is tested in-process with a fake clock.)"""

from __future__ import annotations

import time
import uuid

import grpc
import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res
from test_e2e_errors import DAY, MATERIAL_ID, assert_kms_error, assert_near, new_key

from kmsd_process import KmsdProcess

Code = grpc.StatusCode
Stub = pb_grpc.KeyManagementServiceStub


def _status(stub: Stub, key_ref: str) -> pb.GetKeyRotationStatusResponse:
    return stub.GetKeyRotationStatus(pb.GetKeyRotationStatusRequest(key_id=key_ref))


def _current_material(stub: Stub, key_id: str) -> str:
    meta = stub.DescribeKey(pb.DescribeKeyRequest(key_id=key_id)).key_metadata
    return meta.current_key_material_id


def _rotations(stub: Stub, key_id: str, **kwargs: int) -> list[res.RotationsListEntry]:
    entries: list[res.RotationsListEntry] = []
    marker = ""
    while True:
        out = stub.ListKeyRotations(
            pb.ListKeyRotationsRequest(key_id=key_id, marker=marker, **kwargs)
        )
        entries.extend(out.rotations)
        assert out.truncated == bool(out.next_marker)
        if not out.truncated:
            return entries
        marker = out.next_marker


def test_new_key_has_rotation_off(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    status = _status(stub, key.arn)
    assert status.key_rotation_enabled is False
    assert status.key_id == key.key_id
    assert status.rotation_period_in_days == 0
    assert not status.HasField("next_rotation_date")
    assert not status.HasField("on_demand_rotation_start_date")
    assert _rotations(stub, key.key_id) == []


def test_enable_rotation_defaults_to_365_days(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    out = stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=key.key_id))
    assert out.commit_index > 0
    status = _status(stub, key.key_id)
    assert status.key_rotation_enabled is True
    assert status.rotation_period_in_days == 365
    assert_near(status.next_rotation_date, time.time() + 365 * DAY)
    # Enabling does not rotate.
    assert _current_material(stub, key.key_id) == key.current_key_material_id


@pytest.mark.parametrize("period", [90, 2560])
def test_rotation_period_bounds_are_accepted(kmsd: KmsdProcess, period: int) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    stub.EnableKeyRotation(
        pb.EnableKeyRotationRequest(key_id=key.arn, rotation_period_in_days=period)
    )
    status = _status(stub, key.key_id)
    assert status.rotation_period_in_days == period
    assert_near(status.next_rotation_date, time.time() + period * DAY)


@pytest.mark.parametrize("period", [89, 2561, -1])
def test_rotation_period_out_of_range(kmsd: KmsdProcess, period: int) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    assert_kms_error(
        lambda: stub.EnableKeyRotation(
            pb.EnableKeyRotationRequest(key_id=key.key_id, rotation_period_in_days=period)
        ),
        Code.INVALID_ARGUMENT,
        "ValidationException",
        field="rotation_period_in_days",
    )
    assert _status(stub, key.key_id).key_rotation_enabled is False


def test_change_period_then_disable_rotation(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=key.key_id))
    stub.EnableKeyRotation(
        pb.EnableKeyRotationRequest(key_id=key.key_id, rotation_period_in_days=180)
    )
    status = _status(stub, key.key_id)
    assert status.rotation_period_in_days == 180
    assert_near(status.next_rotation_date, time.time() + 180 * DAY)
    out = stub.DisableKeyRotation(pb.DisableKeyRotationRequest(key_id=key.arn))
    assert out.commit_index > 0
    status = _status(stub, key.key_id)
    assert status.key_rotation_enabled is False
    assert status.rotation_period_in_days == 0
    assert not status.HasField("next_rotation_date")


def test_rotate_on_demand(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    first_material = key.current_key_material_id
    old_blob = stub.Encrypt(
        pb.EncryptRequest(key_id=key.key_id, plaintext=b"old", encryption_context={"v": "1"})
    ).ciphertext_blob
    out = stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key.arn))
    assert out.key_id == key.key_id
    assert out.commit_index > 0
    second_material = _current_material(stub, key.key_id)
    assert MATERIAL_ID.match(second_material)
    assert second_material != first_material
    # Old ciphertexts still decrypt, with the old material.
    old = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=old_blob, encryption_context={"v": "1"}))
    assert old.plaintext == b"old"
    assert old.key_material_id == first_material
    # New ones use the new material.
    new_blob = stub.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"new")).ciphertext_blob
    new = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=new_blob))
    assert new.plaintext == b"new"
    assert new.key_material_id == second_material
    data_key = stub.GenerateDataKey(
        pb.GenerateDataKeyRequest(key_id=key.key_id, number_of_bytes=32)
    )
    assert data_key.key_material_id == second_material
    # ReEncrypt to the same key moves old data to the current material.
    moved = stub.ReEncrypt(
        pb.ReEncryptRequest(
            ciphertext_blob=old_blob,
            source_encryption_context={"v": "1"},
            destination_key_id=key.key_id,
            destination_encryption_context={"v": "1"},
        )
    )
    assert moved.source_key_material_id == first_material
    assert moved.destination_key_material_id == second_material
    # The rotation is listed, as ON_DEMAND, with the new material's id.
    rotations = _rotations(stub, key.key_id)
    assert len(rotations) == 1
    entry = rotations[0]
    assert entry.key_id == key.key_id
    assert entry.rotation_type == res.ROTATION_TYPE_ON_DEMAND
    assert entry.key_material_id == second_material
    assert_near(entry.rotation_date, time.time())
    # Rotating on demand leaves automatic rotation as it was.
    assert _status(stub, key.key_id).key_rotation_enabled is False


def test_list_key_rotations_with_all_key_material(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key.key_id))
    rotated = _current_material(stub, key.key_id)
    only = _rotations(stub, key.key_id, include_key_material=pb.INCLUDE_KEY_MATERIAL_ROTATIONS_ONLY)
    assert [e.key_material_id for e in only] == [rotated]
    everything = _rotations(
        stub, key.key_id, include_key_material=pb.INCLUDE_KEY_MATERIAL_ALL_KEY_MATERIAL
    )
    assert [e.key_material_id for e in everything] == [key.current_key_material_id, rotated]


def test_on_demand_rotation_limit_is_25(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    blob = stub.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"v1")).ciphertext_blob
    materials = [key.current_key_material_id]
    for _ in range(25):
        stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key.key_id))
        materials.append(_current_material(stub, key.key_id))
    assert len(set(materials)) == 26
    assert_kms_error(
        lambda: stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key.key_id)),
        Code.RESOURCE_EXHAUSTED,
        "LimitExceededException",
    )
    assert _current_material(stub, key.key_id) == materials[-1]
    # Every version still decrypts; rotations page in order of creation.
    assert stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob)).plaintext == b"v1"
    paged = _rotations(stub, key.key_id, limit=10)
    assert [e.key_material_id for e in paged] == materials[1:]
    assert all(e.rotation_type == res.ROTATION_TYPE_ON_DEMAND for e in paged)
    first_page = stub.ListKeyRotations(pb.ListKeyRotationsRequest(key_id=key.key_id, limit=10))
    assert len(first_page.rotations) == 10 and first_page.truncated
    # Automatic rotation may still be turned on.
    stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=key.key_id))


def test_retried_on_demand_rotation_rotates_once(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    request = pb.RotateKeyOnDemandRequest(key_id=key.key_id, request_id=str(uuid.uuid4()))
    first = stub.RotateKeyOnDemand(request)
    material = _current_material(stub, key.key_id)
    again = stub.RotateKeyOnDemand(request)
    assert again == first
    assert _current_material(stub, key.key_id) == material
    assert len(_rotations(stub, key.key_id)) == 1


def test_list_key_rotations_errors(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    for limit in (-1, 1001):
        assert_kms_error(
            lambda limit=limit: stub.ListKeyRotations(
                pb.ListKeyRotationsRequest(key_id=key.key_id, limit=limit)
            ),
            Code.INVALID_ARGUMENT,
            "ValidationException",
            field="limit",
        )
    assert_kms_error(
        lambda: stub.ListKeyRotations(pb.ListKeyRotationsRequest(key_id=key.key_id, marker="x")),
        Code.INVALID_ARGUMENT,
        "InvalidMarkerException",
        field="marker",
    )
    assert_kms_error(
        lambda: stub.ListKeyRotations(pb.ListKeyRotationsRequest(key_id=str(uuid.uuid4()))),
        Code.NOT_FOUND,
        "NotFoundException",
    )


def test_rotation_of_a_disabled_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=key.key_id))
    stub.DisableKey(pb.DisableKeyRequest(key_id=key.key_id))
    for call in (
        lambda: stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=key.key_id)),
        lambda: stub.DisableKeyRotation(pb.DisableKeyRotationRequest(key_id=key.key_id)),
        lambda: stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key.key_id)),
    ):
        assert_kms_error(call, Code.FAILED_PRECONDITION, "DisabledException")
    # Status and history stay readable.
    assert _status(stub, key.key_id).key_rotation_enabled is True
    assert _rotations(stub, key.key_id) == []
    assert _current_material(stub, key.key_id) == key.current_key_material_id


def test_rotation_of_a_key_pending_deletion(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    stub.ScheduleKeyDeletion(pb.ScheduleKeyDeletionRequest(key_id=key.key_id))
    for call in (
        lambda: stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=key.key_id)),
        lambda: stub.DisableKeyRotation(pb.DisableKeyRotationRequest(key_id=key.key_id)),
        lambda: stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key.key_id)),
    ):
        assert_kms_error(call, Code.FAILED_PRECONDITION, "KMSInvalidStateException")


def test_rotation_of_an_unknown_key(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    missing = str(uuid.uuid4())
    for call in (
        lambda: stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=missing)),
        lambda: stub.DisableKeyRotation(pb.DisableKeyRotationRequest(key_id=missing)),
        lambda: stub.GetKeyRotationStatus(pb.GetKeyRotationStatusRequest(key_id=missing)),
        lambda: stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=missing)),
    ):
        assert_kms_error(call, Code.NOT_FOUND, "NotFoundException")


def test_rotation_survives_a_restart(kmsd: KmsdProcess) -> None:
    stub = kmsd.stub()
    key = new_key(stub)
    blob = stub.Encrypt(pb.EncryptRequest(key_id=key.key_id, plaintext=b"r")).ciphertext_blob
    stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=key.key_id))
    stub.EnableKeyRotation(
        pb.EnableKeyRotationRequest(key_id=key.key_id, rotation_period_in_days=90)
    )
    status = _status(stub, key.key_id)
    material = _current_material(stub, key.key_id)
    kmsd.stop()
    kmsd.restart()
    stub = kmsd.stub()
    assert _status(stub, key.key_id) == status
    assert _current_material(stub, key.key_id) == material
    back = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob))
    assert back.plaintext == b"r" and back.key_material_id == key.current_key_material_id
