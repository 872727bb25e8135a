"""KeyStore: the deterministic state machine of keys, aliases, grants and request ids.

It is driven by a `kmsd.log.base.CommandLog`: `apply` takes a serialized
`kms.fsm.v1.Command`, checks it against the current state (the AWS key-state
table, limits, alias rules) and either changes the state or records a
rejection; it never raises for a bad command and never reads a clock or an
RNG, so every replica that applies the same log holds the same bytes.

Key material is held only as the seal-wrapped bytes the command carried.

Records are copy-on-write: a command that changes a key or an alias stores a changed
copy and never touches the record it replaced. That is what makes `freeze` cheap: a
snapshot image is a list of the current records, encoded later on another thread
while commands go on being applied. It also lets a snapshot reuse the previous one's
encoding of every key and request id that is still the same object, so it encodes
only what changed since (the rest is joined as bytes).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from google.protobuf.message import DecodeError, Message
from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import resources_pb2 as res

from kmsd.errors import (
    AlreadyExistsError,
    ConflictError,
    InternalError,
    KmsError,
    LimitExceededError,
    NotFoundError,
    UnsupportedOperationError,
    ValidationError,
)
from kmsd.fsm.key_states import check_key_state
from kmsd.protowire import bytes_field_tag, varint

DAY_MS = 86_400_000
# How long a request_id is remembered, by log time (AWS-style retry windows are minutes).
DEDUPE_TTL_MS = 24 * 3_600_000
MAX_ON_DEMAND_ROTATIONS = 25
MAX_ALIASES_PER_KEY = 50
MAX_TAGS_PER_KEY = 50
MAX_GRANTS_PER_KEY = 50_000
DEFAULT_ROTATION_PERIOD_DAYS = 365


_KEYS_TAG = bytes_field_tag(fsm.Snapshot.KEYS_FIELD_NUMBER)
_DEDUPE_TAG = bytes_field_tag(fsm.Snapshot.DEDUPE_FIELD_NUMBER)


# A record's encoding as an element of a repeated field, by id(record); the record is
# kept with it, so the id cannot be reused while the entry exists and a hit is checked
# by identity.
_Encodings = dict[int, tuple[Message, bytes]]


def _encode_repeated(
    tag: bytes, records: Iterable[Message], known: _Encodings, made: _Encodings
) -> Iterator[bytes]:
    """The wire encoding of a repeated message field holding `records`, one chunk each,
    taken from `known` for records it has (records are never changed in place) and
    noted in `made` for the next time."""
    for record in records:
        hit = known.get(id(record))
        if hit is not None and hit[0] is record:
            chunk = hit[1]
        else:
            body = record.SerializeToString(deterministic=True)
            chunk = tag + varint(len(body)) + body
        made[id(record)] = (record, chunk)
        yield chunk


class KeyStore:
    """The in-memory key store, rebuilt from snapshot + log on start."""

    def __init__(self) -> None:
        self._keys: dict[str, fsm.KeyRecord] = {}
        self._aliases: dict[str, fsm.AliasRecord] = {}
        # Grants by id, in creation order; and by key, then grantee, for evaluation.
        self._grants: dict[str, fsm.GrantRecord] = {}
        self._key_grants: dict[str, dict[str, fsm.GrantRecord]] = {}
        self._grantee_grants: dict[tuple[str, str], dict[str, fsm.GrantRecord]] = {}
        self._result_grant_id = ""
        self._dedupe: OrderedDict[str, fsm.DedupeEntry] = OrderedDict()
        self._applied_index = 0
        self._last_now_ms = 0
        # The encodings of the last snapshot made in full; replaced, never changed, so
        # a snapshot encoding on another thread may read it while a newer one is made.
        self._encodings: _Encodings = {}
        self.observer: Callable[[int, fsm.Command, fsm.CommandResult], None] | None = None
        """Told of every command applied, with its result (the audit of logged mutations)."""
        self._handlers: dict[str, Callable[[fsm.Command], str]] = {
            "create_key": self._create_key,
            "update_key_description": self._update_key_description,
            "enable_key": self._enable_key,
            "disable_key": self._disable_key,
            "schedule_key_deletion": self._schedule_key_deletion,
            "cancel_key_deletion": self._cancel_key_deletion,
            "delete_key": self._delete_key,
            "create_alias": self._create_alias,
            "update_alias": self._update_alias,
            "delete_alias": self._delete_alias,
            "enable_key_rotation": self._enable_key_rotation,
            "disable_key_rotation": self._disable_key_rotation,
            "rotate_key": self._rotate_key,
            "tag_resource": self._tag_resource,
            "untag_resource": self._untag_resource,
            "put_key_policy": self._put_key_policy,
            "create_grant": self._create_grant,
            "retire_grant": self._retire_grant,
            "revoke_grant": self._revoke_grant,
        }

    # ---- StateMachine protocol -------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self._applied_index

    def apply(self, index: int, command: bytes) -> fsm.CommandResult:
        self._applied_index = index
        cmd = fsm.Command()
        try:
            cmd.ParseFromString(command)
        except DecodeError:
            return _rejected(InternalError("undecodable command"))
        result = self._apply(index, cmd)
        if self.observer is not None:
            self.observer(index, cmd, result)
        return result

    def _apply(self, index: int, cmd: fsm.Command) -> fsm.CommandResult:
        kind = cmd.WhichOneof("kind")
        if kind is None:
            return _rejected(InternalError("empty command"))
        self._last_now_ms = max(self._last_now_ms, cmd.now_ms)
        self._expire_request_ids()
        digest = b""
        if cmd.request_id:
            # Without a request digest, the kind is hashed too: EnableKey{k} and
            # DisableKey{k} serialize alike.
            digest = (
                cmd.request_digest
                or hashlib.sha256(
                    kind.encode()
                    + b"\x00"
                    + getattr(cmd, kind).SerializeToString(deterministic=True)
                ).digest()
            )
            seen = self._dedupe.get(cmd.request_id)
            if seen is not None:
                if seen.command_digest != digest:
                    return _rejected(
                        ValidationError("request_id", "was already used for a different request")
                    )
                return seen.result
        self._result_grant_id = ""
        try:
            result = fsm.CommandResult(
                key_id=self._handlers[kind](cmd), grant_id=self._result_grant_id
            )
        except KmsError as error:
            result = _rejected(error)
        if cmd.request_id:
            self._dedupe[cmd.request_id] = fsm.DedupeEntry(
                request_id=cmd.request_id,
                command_digest=digest,
                index=index,
                applied_ms=cmd.now_ms,
                result=result,
            )
        return result

    def snapshot(self) -> bytes:
        """The state as a serialized `kms.fsm.v1.Snapshot` (equal stores, equal bytes)."""
        return b"".join(self.freeze())

    def freeze(self) -> Iterator[bytes]:
        """The state as of now: what `snapshot` returns now, as chunks made lazily.

        Taking it costs a list of references per table; iterating does the encoding,
        safe on any thread while `apply` goes on (records are replaced, never
        changed, so the image cannot move), one chunk per key or request id. The two
        big tables are encoded record by record after the rest: a valid encoding of
        the same message (fields may come in any order on the wire) built in half the
        time, because building one Snapshot message first copies every record.
        """
        applied_index, last_now_ms = self._applied_index, self._last_now_ms
        aliases = [self._aliases[name] for name in sorted(self._aliases)]
        grants = list(self._grants.values())
        keys = list(self._keys.values())
        dedupe = list(self._dedupe.values())
        known = self._encodings

        def encode() -> Iterator[bytes]:
            yield fsm.Snapshot(
                applied_index=applied_index,
                aliases=aliases,
                last_now_ms=last_now_ms,
                grants=grants,
            ).SerializeToString(deterministic=True)
            made: _Encodings = {}
            yield from _encode_repeated(_KEYS_TAG, keys, known, made)
            yield from _encode_repeated(_DEDUPE_TAG, dedupe, known, made)
            # Only a complete pass is kept; the records it holds stay alive until the
            # next one replaces it (at most the records changed in between).
            self._encodings = made

        return encode()

    def restore(self, data: bytes) -> None:
        snap = fsm.Snapshot()
        snap.ParseFromString(data)
        self._encodings = {}
        self._keys = {key.key_id: key for key in snap.keys}
        self._aliases = {alias.alias_name: alias for alias in snap.aliases}
        self._dedupe = OrderedDict((entry.request_id, entry) for entry in snap.dedupe)
        self._applied_index = snap.applied_index
        self._last_now_ms = snap.last_now_ms
        self._grants = {}
        self._key_grants = {}
        self._grantee_grants = {}
        for grant in snap.grants:
            self._index_grant(grant)

    # ---- queries ----------------------------------------------------------------

    def key(self, key_id: str) -> fsm.KeyRecord | None:
        """The key with this UUID, or None. The record must not be modified."""
        return self._keys.get(key_id)

    def remembered(self, request_id: str) -> fsm.DedupeEntry | None:
        """The first result of `request_id` while it is remembered, or None. The entry
        must not be modified."""
        return self._dedupe.get(request_id) if request_id else None

    def alias(self, alias_name: str) -> fsm.AliasRecord | None:
        """The alias with this exact name, or None."""
        return self._aliases.get(alias_name)

    def keys(self) -> list[fsm.KeyRecord]:
        """All keys in creation order."""
        return list(self._keys.values())

    def aliases(self, target_key_id: str = "") -> list[fsm.AliasRecord]:
        """Aliases sorted by name, optionally only those pointing at one key."""
        return [
            self._aliases[name]
            for name in sorted(self._aliases)
            if not target_key_id or self._aliases[name].target_key_id == target_key_id
        ]

    def grant(self, grant_id: str) -> fsm.GrantRecord | None:
        """The grant with this id, or None. The record must not be modified."""
        return self._grants.get(grant_id)

    def grants_of(self, key_id: str) -> list[fsm.GrantRecord]:
        """The grants of a key, in creation order."""
        return list(self._key_grants.get(key_id, {}).values())

    def grants_for(self, key_id: str, grantee: str) -> list[fsm.GrantRecord]:
        """The grants of a key whose grantee is `grantee` (on every data-plane call)."""
        found = self._grantee_grants.get((key_id, grantee))
        return list(found.values()) if found else []

    def retirable_grants(self, retiring_principal: str) -> list[fsm.GrantRecord]:
        """Every grant `retiring_principal` may retire as its retiring principal, in
        creation order."""
        return [g for g in self._grants.values() if g.retiring_principal == retiring_principal]

    def due_deletions(self, now_ms: int) -> Iterator[fsm.KeyRecord]:
        """Keys pending deletion whose deletion date has passed."""
        for key in self._keys.values():
            if key.key_state == res.KEY_STATE_PENDING_DELETION and key.deletion_date_ms <= now_ms:
                yield key

    def due_rotations(self, now_ms: int) -> Iterator[fsm.KeyRecord]:
        """Enabled keys with automatic rotation on whose next rotation date has passed."""
        for key in self._keys.values():
            if (
                key.rotation_enabled
                and key.key_state == res.KEY_STATE_ENABLED
                and key.next_rotation_ms <= now_ms
            ):
                yield key

    # ---- command handlers: each returns the affected key id or raises KmsError --

    def _existing(self, key_id: str) -> fsm.KeyRecord:
        key = self._keys.get(key_id)
        if key is None:
            raise NotFoundError(f"Key '{key_id}' does not exist.")
        return key

    def _for_update(self, key_id: str, operation: str) -> fsm.KeyRecord:
        """`_checked`, then a copy of the key put in its place for the caller to change
        (copy-on-write: a frozen snapshot image may still hold the original)."""
        key = fsm.KeyRecord()
        key.CopyFrom(self._checked(key_id, operation))
        self._keys[key_id] = key
        return key

    def _create_key(self, cmd: fsm.Command) -> str:
        c = cmd.create_key
        if c.key_id in self._keys:
            raise AlreadyExistsError(f"Key '{c.key_id}' already exists.")
        self._keys[c.key_id] = fsm.KeyRecord(
            key_id=c.key_id,
            creation_ms=cmd.now_ms,
            description=c.description,
            key_spec=c.key_spec,
            key_usage=c.key_usage,
            origin=c.origin,
            key_state=res.KEY_STATE_ENABLED,
            materials=[
                fsm.KeyMaterial(
                    version=1, wrapped_material=c.wrapped_material, create_ms=cmd.now_ms
                )
            ],
            rotation_period_in_days=DEFAULT_ROTATION_PERIOD_DAYS,
            tags=c.tags,
            policy=c.policy,
        )
        return c.key_id

    def _update_key_description(self, cmd: fsm.Command) -> str:
        c = cmd.update_key_description
        key = self._for_update(c.key_id, "UpdateKeyDescription")
        key.description = c.description
        return c.key_id

    def _enable_key(self, cmd: fsm.Command) -> str:
        key = self._for_update(cmd.enable_key.key_id, "EnableKey")
        key.key_state = res.KEY_STATE_ENABLED
        return key.key_id

    def _disable_key(self, cmd: fsm.Command) -> str:
        key = self._for_update(cmd.disable_key.key_id, "DisableKey")
        key.key_state = res.KEY_STATE_DISABLED
        return key.key_id

    def _schedule_key_deletion(self, cmd: fsm.Command) -> str:
        c = cmd.schedule_key_deletion
        key = self._for_update(c.key_id, "ScheduleKeyDeletion")
        key.key_state = res.KEY_STATE_PENDING_DELETION
        key.pending_window_in_days = c.pending_window_in_days
        key.deletion_date_ms = cmd.now_ms + c.pending_window_in_days * DAY_MS
        return key.key_id

    def _cancel_key_deletion(self, cmd: fsm.Command) -> str:
        key = self._for_update(cmd.cancel_key_deletion.key_id, "CancelKeyDeletion")
        key.key_state = res.KEY_STATE_DISABLED
        key.pending_window_in_days = 0
        key.deletion_date_ms = 0
        return key.key_id

    def _delete_key(self, cmd: fsm.Command) -> str:
        c = cmd.delete_key
        key = self._existing(c.key_id)
        if (
            key.key_state != res.KEY_STATE_PENDING_DELETION
            or key.deletion_date_ms != c.deletion_date_ms
            or cmd.now_ms < key.deletion_date_ms
        ):
            raise ConflictError(f"Key '{c.key_id}' is no longer due for deletion.")
        del self._keys[c.key_id]
        for alias in self.aliases(c.key_id):
            del self._aliases[alias.alias_name]
        for grant in self.grants_of(c.key_id):
            self._unindex_grant(grant)
        return c.key_id

    def _create_alias(self, cmd: fsm.Command) -> str:
        c = cmd.create_alias
        if c.alias_name in self._aliases:
            raise AlreadyExistsError(f"An alias with the name {c.alias_name} already exists.")
        self._checked(c.target_key_id, "CreateAlias")
        if len(self.aliases(c.target_key_id)) >= MAX_ALIASES_PER_KEY:
            raise LimitExceededError(
                f"Key '{c.target_key_id}' has {MAX_ALIASES_PER_KEY} aliases, the most allowed."
            )
        self._aliases[c.alias_name] = fsm.AliasRecord(
            alias_name=c.alias_name,
            target_key_id=c.target_key_id,
            creation_ms=cmd.now_ms,
            last_updated_ms=cmd.now_ms,
        )
        return c.target_key_id

    def _update_alias(self, cmd: fsm.Command) -> str:
        c = cmd.update_alias
        alias = self._aliases.get(c.alias_name)
        if alias is None:
            raise NotFoundError(f"Alias {c.alias_name} does not exist.")
        self._checked(c.target_key_id, "UpdateAlias")
        updated = fsm.AliasRecord()  # copy-on-write, as for keys
        updated.CopyFrom(alias)
        updated.target_key_id = c.target_key_id
        updated.last_updated_ms = cmd.now_ms
        self._aliases[c.alias_name] = updated
        return c.target_key_id

    def _delete_alias(self, cmd: fsm.Command) -> str:
        name = cmd.delete_alias.alias_name
        alias = self._aliases.pop(name, None)
        if alias is None:
            raise NotFoundError(f"Alias {name} does not exist.")
        return alias.target_key_id

    def _enable_key_rotation(self, cmd: fsm.Command) -> str:
        c = cmd.enable_key_rotation
        key = self._for_update(c.key_id, "EnableKeyRotation")
        _require_rotatable(key)
        key.rotation_enabled = True
        key.rotation_period_in_days = c.rotation_period_in_days
        key.next_rotation_ms = cmd.now_ms + c.rotation_period_in_days * DAY_MS
        return key.key_id

    def _disable_key_rotation(self, cmd: fsm.Command) -> str:
        key = self._for_update(cmd.disable_key_rotation.key_id, "DisableKeyRotation")
        _require_rotatable(key)
        key.rotation_enabled = False
        key.next_rotation_ms = 0
        return key.key_id

    def _rotate_key(self, cmd: fsm.Command) -> str:
        c = cmd.rotate_key
        key = self._for_update(c.key_id, "RotateKeyOnDemand")
        _require_rotatable(key)
        newest = key.materials[-1].version
        if c.version != newest + 1:
            raise ConflictError(
                f"Key '{c.key_id}' was rotated concurrently (now at version {newest}); retry."
            )
        if c.rotation_type == res.ROTATION_TYPE_ON_DEMAND:
            if key.on_demand_rotations >= MAX_ON_DEMAND_ROTATIONS:
                raise LimitExceededError(
                    f"Key '{c.key_id}' has had {MAX_ON_DEMAND_ROTATIONS} on-demand rotations,"
                    " the most allowed."
                )
            key.on_demand_rotations += 1
        elif key.rotation_enabled:
            key.next_rotation_ms = cmd.now_ms + key.rotation_period_in_days * DAY_MS
        else:
            raise ConflictError(f"Automatic rotation of key '{c.key_id}' was turned off.")
        key.materials.append(
            fsm.KeyMaterial(
                version=c.version,
                wrapped_material=c.wrapped_material,
                create_ms=cmd.now_ms,
                rotation_type=c.rotation_type,
            )
        )
        return key.key_id

    def _tag_resource(self, cmd: fsm.Command) -> str:
        c = cmd.tag_resource
        key = self._for_update(c.key_id, "TagResource")
        tags = {tag.tag_key: tag.tag_value for tag in key.tags}
        tags.update((tag.tag_key, tag.tag_value) for tag in c.tags)
        if len(tags) > MAX_TAGS_PER_KEY:
            raise LimitExceededError(
                f"Key '{c.key_id}' would have {len(tags)} tags; at most {MAX_TAGS_PER_KEY}."
            )
        _set_tags(key, tags)
        return key.key_id

    def _untag_resource(self, cmd: fsm.Command) -> str:
        c = cmd.untag_resource
        key = self._for_update(c.key_id, "UntagResource")
        removed = set(c.tag_keys)
        _set_tags(key, {t.tag_key: t.tag_value for t in key.tags if t.tag_key not in removed})
        return key.key_id

    def _put_key_policy(self, cmd: fsm.Command) -> str:
        c = cmd.put_key_policy
        key = self._for_update(c.key_id, "PutKeyPolicy")
        if not c.policy:
            raise ValidationError("policy", "is required")
        key.policy = c.policy
        return key.key_id

    def _create_grant(self, cmd: fsm.Command) -> str:
        c = cmd.create_grant
        key = self._checked(c.key_id, "CreateGrant")
        if c.name:
            for grant in self.grants_of(c.key_id):
                if _same_grant(grant, c):
                    # AWS: a retry of a named CreateGrant returns the existing grant.
                    self._result_grant_id = grant.grant_id
                    return key.key_id
        if c.grant_id in self._grants:
            raise ConflictError(f"Grant id {c.grant_id} is taken; retry.")
        if len(self._key_grants.get(c.key_id, {})) >= MAX_GRANTS_PER_KEY:
            raise LimitExceededError(
                f"Key '{c.key_id}' has {MAX_GRANTS_PER_KEY} grants, the most allowed."
            )
        grant = fsm.GrantRecord(
            grant_id=c.grant_id,
            key_id=c.key_id,
            name=c.name,
            grantee_principal=c.grantee_principal,
            retiring_principal=c.retiring_principal,
            operations=c.operations,
            creation_ms=cmd.now_ms,
            issuing_principal=cmd.principal,
            create_index=self._applied_index,
        )
        if c.HasField("constraints"):
            grant.constraints.CopyFrom(c.constraints)
        self._index_grant(grant)
        self._result_grant_id = grant.grant_id
        return key.key_id

    def _retire_grant(self, cmd: fsm.Command) -> str:
        return self._remove_grant(cmd.retire_grant.key_id, cmd.retire_grant.grant_id)

    def _revoke_grant(self, cmd: fsm.Command) -> str:
        return self._remove_grant(cmd.revoke_grant.key_id, cmd.revoke_grant.grant_id)

    def _remove_grant(self, key_id: str, grant_id: str) -> str:
        self._existing(key_id)
        grant = self._key_grants.get(key_id, {}).get(grant_id)
        if grant is None:
            raise NotFoundError(f"Grant '{grant_id}' does not exist on key '{key_id}'.")
        self._unindex_grant(grant)
        self._result_grant_id = grant_id
        return key_id

    def _index_grant(self, grant: fsm.GrantRecord) -> None:
        self._grants[grant.grant_id] = grant
        self._key_grants.setdefault(grant.key_id, {})[grant.grant_id] = grant
        grantee = (grant.key_id, grant.grantee_principal)
        self._grantee_grants.setdefault(grantee, {})[grant.grant_id] = grant

    def _unindex_grant(self, grant: fsm.GrantRecord) -> None:
        del self._grants[grant.grant_id]
        of_key = self._key_grants[grant.key_id]
        del of_key[grant.grant_id]
        if not of_key:
            del self._key_grants[grant.key_id]
        grantee = (grant.key_id, grant.grantee_principal)
        of_grantee = self._grantee_grants[grantee]
        del of_grantee[grant.grant_id]
        if not of_grantee:
            del self._grantee_grants[grantee]

    def _checked(self, key_id: str, operation: str) -> fsm.KeyRecord:
        key = self._existing(key_id)
        check_key_state(operation, key_id, key.key_state)
        return key

    def _expire_request_ids(self) -> None:
        horizon = self._last_now_ms - DEDUPE_TTL_MS
        while self._dedupe:
            oldest = next(iter(self._dedupe.values()))
            if oldest.applied_ms >= horizon:
                break
            self._dedupe.popitem(last=False)


def _require_rotatable(key: fsm.KeyRecord) -> None:
    if key.key_spec != res.KEY_SPEC_SYMMETRIC_DEFAULT or key.origin != res.ORIGIN_AWS_KMS:
        raise UnsupportedOperationError(
            f"Key '{key.key_id}' does not support rotation: only symmetric keys with"
            " kmsd-generated material rotate."
        )


def _same_grant(grant: fsm.GrantRecord, c: fsm.CreateGrant) -> bool:
    """Whether an existing grant has the name and parameters of a CreateGrant."""
    return (
        grant.name == c.name
        and grant.grantee_principal == c.grantee_principal
        and grant.retiring_principal == c.retiring_principal
        and sorted(grant.operations) == sorted(c.operations)
        and grant.constraints.SerializeToString(deterministic=True)
        == c.constraints.SerializeToString(deterministic=True)
    )


def _set_tags(key: fsm.KeyRecord, tags: dict[str, str]) -> None:
    del key.tags[:]
    key.tags.extend(res.Tag(tag_key=k, tag_value=v) for k, v in tags.items())


def _rejected(error: KmsError) -> fsm.CommandResult:
    field = ""
    message = error.message
    if isinstance(error, ValidationError):
        field = error.violations[0].field
        message = error.violations[0].description
    return fsm.CommandResult(
        error=fsm.CommandError(reason=error.reason, message=message, field=field)
    )
