"""Time-driven work with a fake clock: deletion after the waiting period, automatic rotation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from inprocess import open_kms
from kmsd.auth.authorizer import Caller
from kmsd.clock import FakeClock
from kmsd.config import AuthConfig
from kmsd.errors import NotFoundError
from kmsd.service import crypto_ops, keys, rotation
from kmsd.service.scheduler import Scheduler

ALICE = Caller("spiffe://kmsd.dev/user/alice")
# The administrator: a deleted key is NotFound to administrators (AccessDenied to others).
AUTH = AuthConfig(administrators=(ALICE.principal,))


def test_pending_deletion_deletes_only_after_the_window(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        kms = await open_kms(tmp_path, clock, auth=AUTH)
        scheduler = Scheduler(kms, interval_seconds=1)
        key = (await keys.create_key(kms, pb.CreateKeyRequest(), ALICE)).key_metadata
        await keys.schedule_key_deletion(
            kms, pb.ScheduleKeyDeletionRequest(key_id=key.key_id, pending_window_in_days=7), ALICE
        )
        clock.advance(days=7, seconds=-1)
        assert await scheduler.run_once() == 0
        described = await keys.describe_key(kms, pb.DescribeKeyRequest(key_id=key.key_id), ALICE)
        assert described.key_metadata.key_state == res.KEY_STATE_PENDING_DELETION
        clock.advance(seconds=1)
        assert await scheduler.run_once() == 1
        with pytest.raises(NotFoundError):
            await keys.describe_key(kms, pb.DescribeKeyRequest(key_id=key.key_id), ALICE)
        assert await scheduler.run_once() == 0
        await kms.log.stop()

    asyncio.run(scenario())


def test_cancelled_deletion_is_not_carried_out(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        kms = await open_kms(tmp_path, clock, auth=AUTH)
        key = (await keys.create_key(kms, pb.CreateKeyRequest(), ALICE)).key_metadata
        await keys.schedule_key_deletion(
            kms, pb.ScheduleKeyDeletionRequest(key_id=key.key_id), ALICE
        )
        await keys.cancel_key_deletion(kms, pb.CancelKeyDeletionRequest(key_id=key.key_id), ALICE)
        clock.advance(days=31)
        assert await Scheduler(kms, 1).run_once() == 0
        meta = (
            await keys.describe_key(kms, pb.DescribeKeyRequest(key_id=key.key_id), ALICE)
        ).key_metadata
        assert meta.key_state == res.KEY_STATE_DISABLED
        await kms.log.stop()

    asyncio.run(scenario())


def test_automatic_rotation_when_due_and_old_material_still_decrypts(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        kms = await open_kms(tmp_path, clock, auth=AUTH)
        scheduler = Scheduler(kms, 1)
        key = (await keys.create_key(kms, pb.CreateKeyRequest(), ALICE)).key_metadata
        await rotation.enable_key_rotation(
            kms, pb.EnableKeyRotationRequest(key_id=key.key_id, rotation_period_in_days=90), ALICE
        )
        old = await crypto_ops.encrypt(
            kms, pb.EncryptRequest(key_id=key.key_id, plaintext=b"a"), ALICE
        )
        clock.advance(days=89)
        assert await scheduler.run_once() == 0
        clock.advance(days=1)
        assert await scheduler.run_once() == 1
        status = await rotation.get_key_rotation_status(
            kms, pb.GetKeyRotationStatusRequest(key_id=key.key_id), ALICE
        )
        assert status.next_rotation_date.seconds * 1000 == clock.now_ms() + 90 * 86_400_000
        listed = await rotation.list_key_rotations(
            kms, pb.ListKeyRotationsRequest(key_id=key.key_id), ALICE
        )
        assert [r.rotation_type for r in listed.rotations] == [res.ROTATION_TYPE_AUTOMATIC]
        new = await crypto_ops.encrypt(
            kms, pb.EncryptRequest(key_id=key.key_id, plaintext=b"b"), ALICE
        )
        old_out = await crypto_ops.decrypt(
            kms, pb.DecryptRequest(ciphertext_blob=old.ciphertext_blob), ALICE
        )
        new_out = await crypto_ops.decrypt(
            kms, pb.DecryptRequest(ciphertext_blob=new.ciphertext_blob), ALICE
        )
        assert (old_out.plaintext, new_out.plaintext) == (b"a", b"b")
        assert old_out.key_material_id != new_out.key_material_id
        assert new_out.key_material_id == listed.rotations[0].key_material_id
        await kms.log.stop()

    asyncio.run(scenario())


def test_disabled_key_is_not_rotated_until_enabled(tmp_path: Path) -> None:
    async def scenario() -> None:
        clock = FakeClock()
        kms = await open_kms(tmp_path, clock, auth=AUTH)
        scheduler = Scheduler(kms, 1)
        key = (await keys.create_key(kms, pb.CreateKeyRequest(), ALICE)).key_metadata
        await rotation.enable_key_rotation(
            kms, pb.EnableKeyRotationRequest(key_id=key.key_id), ALICE
        )
        await keys.disable_key(kms, pb.DisableKeyRequest(key_id=key.key_id), ALICE)
        clock.advance(days=400)
        assert await scheduler.run_once() == 0
        await keys.enable_key(kms, pb.EnableKeyRequest(key_id=key.key_id), ALICE)
        assert await scheduler.run_once() == 1
        await kms.log.stop()

    asyncio.run(scenario())
