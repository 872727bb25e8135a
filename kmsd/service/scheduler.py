"""Time-driven work: deleting keys whose waiting period ended, rotating keys that are due.

Nothing here changes state directly: when work is due, the leader proposes a
command (`DeleteKey`, `RotateKey`) stamped with its clock, and the state
machine re-checks that the work is still due when it applies it. So a late or
duplicated proposal is harmless, and tests drive time with a fake clock.
"""

from __future__ import annotations

import asyncio
import logging

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import resources_pb2 as res

from kmsd.errors import KmsError
from kmsd.service.context import Kms

log = logging.getLogger(__name__)


class Scheduler:
    """Proposes due deletions and automatic rotations, every `interval_seconds`."""

    def __init__(self, kms: Kms, interval_seconds: float) -> None:
        self._kms = kms
        self._interval = interval_seconds

    async def run_once(self) -> int:
        """Proposes all work due now; returns how many commands were committed."""
        if not self._kms.log.is_leader():
            return 0
        now_ms = self._kms.clock.now_ms()
        done = 0
        for key in list(self._kms.store.due_deletions(now_ms)):
            command = self._kms.command()
            command.delete_key.CopyFrom(
                fsm.DeleteKey(key_id=key.key_id, deletion_date_ms=key.deletion_date_ms)
            )
            if await self._try(command, "delete", key.key_id):
                self._kms.materials.forget(key.key_id)
                done += 1
        for key in list(self._kms.store.due_rotations(now_ms)):
            version = key.materials[-1].version + 1
            command = self._kms.command()
            command.rotate_key.CopyFrom(
                fsm.RotateKey(
                    key_id=key.key_id,
                    version=version,
                    wrapped_material=self._kms.new_wrapped_material(key.key_id, version),
                    rotation_type=res.ROTATION_TYPE_AUTOMATIC,
                )
            )
            done += await self._try(command, "rotate", key.key_id)
        return done

    async def _try(self, command: fsm.Command, what: str, key_id: str) -> bool:
        try:
            await self._kms.propose(command)
        except KmsError as error:
            # Another proposal got there first, or the key changed: nothing is due any more.
            log.info("scheduled %s of key %s skipped: %s", what, key_id, error.reason)
            return False
        log.info("scheduled %s of key %s done", what, key_id)
        return True

    async def run_forever(self) -> None:
        """Runs `run_once` every interval until cancelled."""
        while True:
            try:
                await self.run_once()
            except KmsError as error:
                log.warning("scheduler pass failed: %s", error.reason)
            await asyncio.sleep(self._interval)
