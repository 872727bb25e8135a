"""What every KMS operation needs: the store, the log, the seal, names, clock, RNG and
the authorizer.

`Kms.propose` turns a command into a committed, applied result (raising the
recorded error, if the state machine rejected it); `Kms.read` waits until this
node's state is fresh enough to answer a read.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import Message
from kms.fsm.v1 import commands_pb2 as fsm

from kmsd.audit.logged import LoggedAudit
from kmsd.auth.authorizer import Authorizer
from kmsd.auth.throttle import RateLimiter
from kmsd.clock import Clock
from kmsd.config import AuthConfig
from kmsd.crypto.keygen import material_id, new_symmetric_key_material
from kmsd.crypto.seal import Seal, material_aad
from kmsd.errors import InternalError, error_from_reason
from kmsd.fsm.store import KeyStore
from kmsd.log.base import CommandLog
from kmsd.service.names import Names


def request_digest(request: Message, principal: str = "") -> bytes:
    """SHA-256 of the caller, the RPC's request type and its bytes without the request_id
    (so another caller reusing a request_id is refused, not answered with the first
    caller's result)."""
    # Cleared and put back rather than copied: a copy of the message costs more than the
    # hash (request_id is a plain proto3 string, so putting it back restores the message).
    request_id = getattr(request, "request_id", "")
    if request_id:
        request.ClearField("request_id")
    try:
        body = request.SerializeToString(deterministic=True)
    finally:
        if request_id:
            setattr(request, "request_id", request_id)  # noqa: B010 (Message has no such attribute)
    caller = principal.encode("utf-8", "surrogatepass") + b"\x00" if principal else b""
    return hashlib.sha256(caller + request.DESCRIPTOR.full_name.encode() + b"\x00" + body).digest()


@dataclass(frozen=True)
class Committed:
    """A command's applied result and the log index it was committed at."""

    key_id: str
    commit_index: int
    grant_id: str = ""


class MaterialCache:
    """Unwrapped backing keys, by (key id, version), kept only in process memory."""

    def __init__(self, seal: Seal) -> None:
        self._seal = seal
        self._plain: dict[tuple[str, int], bytes] = {}
        self._uuids: dict[str, uuid.UUID] = {}
        self._material_ids: dict[tuple[str, int], str] = {}

    def key_uuid(self, key_id: str) -> uuid.UUID:
        """The parsed UUID of a key id (parsed once: this is on every data-plane call)."""
        parsed = self._uuids.get(key_id)
        if parsed is None:
            parsed = self._uuids[key_id] = uuid.UUID(key_id)
        return parsed

    def material_id(self, key_id: str, version: int) -> str:
        """The public id of a material version (see `keygen.material_id`), cached."""
        known = self._material_ids.get((key_id, version))
        if known is None:
            known = material_id(self.key_uuid(key_id), version)
            self._material_ids[(key_id, version)] = known
        return known

    def backing_key(self, key: fsm.KeyRecord, version: int) -> bytes:
        """The plaintext material of `version` of `key`; unwraps it on first use."""
        cached = self._plain.get((key.key_id, version))
        if cached is not None:
            return cached
        if not 1 <= version <= len(key.materials):
            raise InternalError(f"key {key.key_id} has no material version {version}")
        material = key.materials[version - 1]
        plain = self._seal.unwrap(
            material.wrapped_material, material_aad(uuid.UUID(key.key_id), version)
        )
        self._plain[(key.key_id, version)] = plain
        return plain

    def forget(self, key_id: str) -> None:
        """Drops every cached version of a deleted key."""
        for cached in [k for k in self._plain if k[0] == key_id]:
            del self._plain[cached]
        self._uuids.pop(key_id, None)
        for named in [k for k in self._material_ids if k[0] == key_id]:
            del self._material_ids[named]


@dataclass
class Kms:
    """The shared state of the KMS operations on one node."""

    store: KeyStore
    log: CommandLog
    seal: Seal
    names: Names
    clock: Clock
    rng: Callable[[int], bytes] = os.urandom
    max_staleness_s: float = 0.5
    # Who may do what ([auth]); enabled by default, as in the configuration.
    auth: AuthConfig = field(default_factory=AuthConfig)
    # Per-principal request rate ([limits]); off unless the node configures it.
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0, 1))
    # Audit records of mutations written from the log; None without an audit trail.
    logged_audit: LoggedAudit | None = None
    materials: MaterialCache = field(init=False)
    authorizer: Authorizer = field(init=False)

    def __post_init__(self) -> None:
        self.materials = MaterialCache(self.seal)
        self.authorizer = Authorizer(self.auth, self.names.account)

    def command(self, request: Message | None = None, principal: str = "") -> fsm.Command:
        """A new command stamped with this node's clock, carrying the request's
        request_id and a digest of the request, so a retry is recognised."""
        command = fsm.Command(now_ms=self.clock.now_ms(), principal=principal)
        request_id = getattr(request, "request_id", "") if request is not None else ""
        if request is not None and request_id:
            command.request_id = request_id
            command.request_digest = request_digest(request, principal)
        return command

    def new_wrapped_material(self, key_id: str, version: int) -> bytes:
        """Fresh symmetric material for `version` of `key_id`, wrapped by the seal."""
        return self.seal.wrap(
            new_symmetric_key_material(self.rng), material_aad(uuid.UUID(key_id), version)
        )

    async def propose(self, command: fsm.Command) -> Committed:
        """Commits and applies `command`; raises the error the store recorded, if any.
        The audit record of the request being served travels in the command, and is
        written when it applies (`kmsd.audit.logged`)."""
        logged = self.logged_audit
        call = logged.draft_into(command) if logged is not None else None
        applied = await self.log.propose(command.SerializeToString())
        if call is not None:
            call.logged = logged is not None and logged.took(applied.index)
        result = applied.result
        if not isinstance(result, fsm.CommandResult):
            raise InternalError("the state machine returned no result")
        if result.HasField("error"):
            raise error_from_reason(result.error.reason, result.error.message, result.error.field)
        # A retried request_id answers with the index its first attempt was committed at.
        first = self.store.remembered(command.request_id)
        index = first.index if first is not None else applied.index
        return Committed(key_id=result.key_id, commit_index=index, grant_id=result.grant_id)

    def fresh_for_crypto(self, min_commit_index: int = 0) -> bool:
        """True when a crypto operation may read the local state right now, without
        awaiting anything (the common case on the data plane)."""
        return min_commit_index <= self.log.applied_index and self.log.fresh_within(
            self.max_staleness_s
        )

    async def read(self, min_commit_index: int = 0, *, crypto: bool = False) -> None:
        """Waits until reading the local store is fresh enough and covers min_commit_index.

        Control-plane reads are linearizable (ReadIndex). Cryptographic operations may
        use this node's applied state if it heard from the leader within
        `max_staleness_s` (DESIGN.md §4), and go through ReadIndex otherwise, so a node
        cut off from the majority refuses rather than serve stale key state."""
        if min_commit_index:
            await self.log.wait_applied(min_commit_index)
        await self.log.read_barrier(self.max_staleness_s if crypto else 0.0)
