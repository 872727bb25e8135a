"""`KmsClient`: typed calls for every kms.v1 RPC, with failover, retries and idempotency.

What this module owns:

* one gRPC channel per kmsd node (mutual TLS with `tls=TlsFiles(ca, cert, key)`;
  plaintext only when asked for with `plaintext=True`), created lazily and closed
  by `close()`;
* the retry policy: UNAVAILABLE is retried (it is what kmsd returns when it has no
  quorum or no reachable leader, and what gRPC returns for a dead node), with
  exponential backoff and jitter, never shorter than the server's RetryInfo, moving
  to the next node (or to the leader a follower named) on each retry;
  ThrottlingException is retried on the same node after the delay its RetryInfo
  names, when that delay is at most `max_backoff` (a longer one is raised at once);
* idempotency: every mutating call carries a fresh uuid4 `request_id` unless the
  caller gives one, and the same request (so the same id) is sent on every retry,
  so kmsd applies it at most once even across a leader change. A mutating call
  with `request_id=""` is never retried, since kmsd could not deduplicate it;
* the envelope-encryption helpers (format in `kms_client.envelope`).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Self, TypeVar

import grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res

from kms_client import envelope
from kms_client._enums import enum_value
from kms_client.errors import KmsClientError, ThrottlingException, from_rpc_error
from kms_client.tls import TlsFiles, channel_credentials, open_channel

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

#: An enum argument: the AWS string ("SYMMETRIC_DEFAULT"), the proto name, or the number.
EnumArg = str | int
#: Tags: a mapping of tag key to value, or Tag messages.
TagsArg = Mapping[str, str] | Iterable[res.Tag]

DEFAULT_ENDPOINT = "127.0.0.1:7400"


def _tags(tags: TagsArg | None) -> list[res.Tag]:
    if tags is None:
        return []
    if isinstance(tags, Mapping):
        return [res.Tag(tag_key=k, tag_value=v) for k, v in tags.items()]
    return list(tags)


class KmsClient:
    """A synchronous, thread-safe client for a kmsd cluster.

    Args:
        endpoints: ``host:port`` of one or more kmsd nodes (any node serves any call).
            A single string may hold several, comma-separated.
        timeout: deadline in seconds for each attempt of a call.
        tls: the CA bundle, client certificate and key (``TlsFiles(ca, cert, key)``):
            kmsd's mutual TLS; the certificate's URI SAN is the caller's principal.
        credentials: instead of ``tls``, ready-made channel credentials.
        plaintext: True for plaintext channels (a loopback ``kmsd dev --plaintext``);
            one of ``tls``, ``credentials`` and ``plaintext`` must be given.
        max_attempts: attempts per call, the first included (>= 1).
        initial_backoff, max_backoff: bounds in seconds of the exponential backoff.
        metadata: extra gRPC metadata sent with every call.
        channel_options: extra gRPC channel arguments.
        sleep, rng: injected for tests (no real sleeping, reproducible jitter).
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = (DEFAULT_ENDPOINT,),
        *,
        timeout: float = 10.0,
        tls: TlsFiles | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        plaintext: bool = False,
        # Enough that backoff (0.05 s doubling, capped at 2 s) outlasts a 1-2 s election.
        max_attempts: int = 8,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
        metadata: Sequence[tuple[str, str]] = (),
        channel_options: Sequence[tuple[str, str | int]] = (),
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        parsed = [e.strip() for item in endpoints for e in item.split(",") if e.strip()]
        if not parsed:
            raise ValueError("at least one endpoint is needed")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._endpoints: list[str] = list(dict.fromkeys(parsed))
        self._current = 0
        self._timeout = timeout
        self._credentials = channel_credentials(tls, credentials, plaintext)
        self._max_attempts = max_attempts
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._metadata = tuple(metadata)
        self._channel_options = list(channel_options)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._channels: dict[str, tuple[grpc.Channel, pb_grpc.KeyManagementServiceStub]] = {}
        self._closed = False

    # ------------------------------------------------------------------ plumbing

    @property
    def endpoints(self) -> list[str]:
        """The nodes this client knows, including leaders learnt from hints."""
        with self._lock:
            return list(self._endpoints)

    @property
    def current_endpoint(self) -> str:
        """The node the next call goes to first."""
        with self._lock:
            return self._endpoints[self._current]

    def close(self) -> None:
        """Closes every channel; the client cannot be used afterwards."""
        with self._lock:
            channels = list(self._channels.values())
            self._channels.clear()
            self._closed = True
        for channel, _ in channels:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _stub(self, endpoint: str) -> pb_grpc.KeyManagementServiceStub:
        with self._lock:
            if self._closed:
                raise ValueError("KmsClient is closed")
            entry = self._channels.get(endpoint)
            if entry is None:
                channel = open_channel(endpoint, self._credentials, self._channel_options or None)
                entry = (channel, pb_grpc.KeyManagementServiceStub(channel))
                self._channels[endpoint] = entry
            return entry[1]

    def _fail_over(self, failed: str, leader: str | None) -> None:
        with self._lock:
            if leader:
                # The follower knows who leads now; go there next, even if it is a
                # node we were not told about (it joined after we were configured).
                if leader not in self._endpoints:
                    self._endpoints.append(leader)
                self._current = self._endpoints.index(leader)
            elif self._endpoints[self._current] == failed:
                # Only advance if no other thread has moved on already.
                self._current = (self._current + 1) % len(self._endpoints)

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        ceiling = min(self._max_backoff, self._initial_backoff * 2.0 ** (retry - 1))
        # "Equal jitter": at least half the exponential step, so retries of many
        # clients spread out without collapsing to zero delay.
        delay = ceiling / 2 + self._rng.uniform(0, ceiling / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def _call(
        self,
        method: Callable[
            [pb_grpc.KeyManagementServiceStub], grpc.UnaryUnaryMultiCallable[_Req, _Resp]
        ],
        request: _Req,
        *,
        retryable: bool = True,
    ) -> _Resp:
        attempt = 0
        while True:
            attempt += 1
            endpoint = self.current_endpoint
            try:
                return method(self._stub(endpoint))(
                    request, timeout=self._timeout, metadata=self._metadata or None
                )
            except grpc.RpcError as rpc_error:
                err = from_rpc_error(rpc_error)
                if not retryable or attempt >= self._max_attempts:
                    raise err from rpc_error
                if isinstance(err, ThrottlingException):
                    # The node's limit for this caller: wait as told, on the same node.
                    if err.retry_after is None or err.retry_after > self._max_backoff:
                        raise err from rpc_error
                    self._sleep(self._backoff(attempt, err.retry_after))
                    continue
                if err.code != grpc.StatusCode.UNAVAILABLE:
                    raise err from rpc_error
            self._fail_over(endpoint, err.leader_address)
            self._sleep(self._backoff(attempt, err.retry_after))

    @staticmethod
    def _request_id(request_id: str | None) -> str:
        return str(uuid.uuid4()) if request_id is None else request_id

    # ------------------------------------------------------------------ keys

    def create_key(
        self,
        description: str = "",
        *,
        policy: str = "",
        key_usage: EnumArg | None = None,
        key_spec: EnumArg | None = None,
        origin: EnumArg | None = None,
        tags: TagsArg | None = None,
        custom_key_store_id: str = "",
        bypass_policy_lockout_safety_check: bool = False,
        multi_region: bool = False,
        xks_key_id: str = "",
        request_id: str | None = None,
    ) -> pb.CreateKeyResponse:
        """CreateKey: a new symmetric KMS key, Enabled. Unset enums take the AWS defaults."""
        request = pb.CreateKeyRequest(
            policy=policy,
            description=description,
            tags=_tags(tags),
            custom_key_store_id=custom_key_store_id,
            bypass_policy_lockout_safety_check=bypass_policy_lockout_safety_check,
            multi_region=multi_region,
            xks_key_id=xks_key_id,
            request_id=self._request_id(request_id),
        )
        if key_usage is not None:
            request.key_usage = enum_value(res.KeyUsage, key_usage)
        if key_spec is not None:
            request.key_spec = enum_value(res.KeySpec, key_spec)
        if origin is not None:
            request.origin = enum_value(res.Origin, origin)
        return self._call(lambda s: s.CreateKey, request, retryable=bool(request.request_id))

    def describe_key(
        self,
        key_id: str,
        *,
        grant_tokens: Sequence[str] = (),
        min_commit_index: int = 0,
    ) -> pb.DescribeKeyResponse:
        """DescribeKey: the metadata of a key (key id, key ARN, alias name or alias ARN)."""
        request = pb.DescribeKeyRequest(
            key_id=key_id, grant_tokens=list(grant_tokens), min_commit_index=min_commit_index
        )
        return self._call(lambda s: s.DescribeKey, request)

    def list_keys(
        self, *, limit: int = 0, marker: str = "", min_commit_index: int = 0
    ) -> pb.ListKeysResponse:
        """ListKeys: one page of keys; see `iter_keys` for all of them."""
        request = pb.ListKeysRequest(limit=limit, marker=marker, min_commit_index=min_commit_index)
        return self._call(lambda s: s.ListKeys, request)

    def iter_keys(self, *, limit: int = 0, min_commit_index: int = 0) -> Iterator[res.KeyListEntry]:
        """Every key, following `next_marker` page by page (`limit` is the page size)."""
        marker = ""
        while True:
            page = self.list_keys(limit=limit, marker=marker, min_commit_index=min_commit_index)
            yield from page.keys
            if not (page.truncated and page.next_marker):
                return
            marker = page.next_marker

    def update_key_description(
        self, key_id: str, description: str, *, request_id: str | None = None
    ) -> pb.UpdateKeyDescriptionResponse:
        """UpdateKeyDescription: replaces the description (empty clears it)."""
        request = pb.UpdateKeyDescriptionRequest(
            key_id=key_id, description=description, request_id=self._request_id(request_id)
        )
        return self._call(
            lambda s: s.UpdateKeyDescription, request, retryable=bool(request.request_id)
        )

    def enable_key(self, key_id: str, *, request_id: str | None = None) -> pb.EnableKeyResponse:
        """EnableKey: sets the key state to Enabled."""
        request = pb.EnableKeyRequest(key_id=key_id, request_id=self._request_id(request_id))
        return self._call(lambda s: s.EnableKey, request, retryable=bool(request.request_id))

    def disable_key(self, key_id: str, *, request_id: str | None = None) -> pb.DisableKeyResponse:
        """DisableKey: sets the key state to Disabled."""
        request = pb.DisableKeyRequest(key_id=key_id, request_id=self._request_id(request_id))
        return self._call(lambda s: s.DisableKey, request, retryable=bool(request.request_id))

    def schedule_key_deletion(
        self,
        key_id: str,
        *,
        pending_window_in_days: int = 0,
        request_id: str | None = None,
    ) -> pb.ScheduleKeyDeletionResponse:
        """ScheduleKeyDeletion: PendingDeletion for 7-30 days (0 means 30), then deleted."""
        request = pb.ScheduleKeyDeletionRequest(
            key_id=key_id,
            pending_window_in_days=pending_window_in_days,
            request_id=self._request_id(request_id),
        )
        return self._call(
            lambda s: s.ScheduleKeyDeletion, request, retryable=bool(request.request_id)
        )

    def cancel_key_deletion(
        self, key_id: str, *, request_id: str | None = None
    ) -> pb.CancelKeyDeletionResponse:
        """CancelKeyDeletion: stops a scheduled deletion; the key becomes Disabled."""
        request = pb.CancelKeyDeletionRequest(
            key_id=key_id, request_id=self._request_id(request_id)
        )
        return self._call(
            lambda s: s.CancelKeyDeletion, request, retryable=bool(request.request_id)
        )

    # ------------------------------------------------------------------ cryptography

    def encrypt(
        self,
        key_id: str,
        plaintext: bytes,
        encryption_context: Mapping[str, str] | None = None,
        *,
        grant_tokens: Sequence[str] = (),
        encryption_algorithm: EnumArg | None = None,
        dry_run: bool = False,
        min_commit_index: int = 0,
    ) -> pb.EncryptResponse:
        """Encrypt: up to 4096 bytes under a symmetric key."""
        request = pb.EncryptRequest(
            key_id=key_id,
            plaintext=plaintext,
            encryption_context=dict(encryption_context or {}),
            grant_tokens=list(grant_tokens),
            dry_run=dry_run,
            min_commit_index=min_commit_index,
        )
        if encryption_algorithm is not None:
            request.encryption_algorithm = enum_value(
                res.EncryptionAlgorithmSpec, encryption_algorithm
            )
        return self._call(lambda s: s.Encrypt, request)

    def decrypt(
        self,
        ciphertext_blob: bytes,
        encryption_context: Mapping[str, str] | None = None,
        *,
        key_id: str = "",
        grant_tokens: Sequence[str] = (),
        encryption_algorithm: EnumArg | None = None,
        recipient: pb.RecipientInfo | None = None,
        dry_run: bool = False,
        dry_run_modifiers: Sequence[EnumArg] = (),
        min_commit_index: int = 0,
    ) -> pb.DecryptResponse:
        """Decrypt: the ciphertext names its key; `key_id`, if given, must be that key."""
        request = pb.DecryptRequest(
            ciphertext_blob=ciphertext_blob,
            encryption_context=dict(encryption_context or {}),
            grant_tokens=list(grant_tokens),
            key_id=key_id,
            recipient=recipient,
            dry_run=dry_run,
            dry_run_modifiers=[enum_value(pb.DryRunModifier, m) for m in dry_run_modifiers],
            min_commit_index=min_commit_index,
        )
        if encryption_algorithm is not None:
            request.encryption_algorithm = enum_value(
                res.EncryptionAlgorithmSpec, encryption_algorithm
            )
        return self._call(lambda s: s.Decrypt, request)

    def re_encrypt(
        self,
        ciphertext_blob: bytes,
        destination_key_id: str,
        *,
        source_encryption_context: Mapping[str, str] | None = None,
        source_key_id: str = "",
        destination_encryption_context: Mapping[str, str] | None = None,
        source_encryption_algorithm: EnumArg | None = None,
        destination_encryption_algorithm: EnumArg | None = None,
        grant_tokens: Sequence[str] = (),
        dry_run: bool = False,
        dry_run_modifiers: Sequence[EnumArg] = (),
        min_commit_index: int = 0,
    ) -> pb.ReEncryptResponse:
        """ReEncrypt: decrypts and re-encrypts under `destination_key_id` inside kmsd."""
        request = pb.ReEncryptRequest(
            ciphertext_blob=ciphertext_blob,
            source_encryption_context=dict(source_encryption_context or {}),
            source_key_id=source_key_id,
            destination_key_id=destination_key_id,
            destination_encryption_context=dict(destination_encryption_context or {}),
            grant_tokens=list(grant_tokens),
            dry_run=dry_run,
            dry_run_modifiers=[enum_value(pb.DryRunModifier, m) for m in dry_run_modifiers],
            min_commit_index=min_commit_index,
        )
        if source_encryption_algorithm is not None:
            request.source_encryption_algorithm = enum_value(
                res.EncryptionAlgorithmSpec, source_encryption_algorithm
            )
        if destination_encryption_algorithm is not None:
            request.destination_encryption_algorithm = enum_value(
                res.EncryptionAlgorithmSpec, destination_encryption_algorithm
            )
        return self._call(lambda s: s.ReEncrypt, request)

    def generate_data_key(
        self,
        key_id: str,
        encryption_context: Mapping[str, str] | None = None,
        *,
        key_spec: EnumArg | None = None,
        number_of_bytes: int = 0,
        grant_tokens: Sequence[str] = (),
        recipient: pb.RecipientInfo | None = None,
        dry_run: bool = False,
        min_commit_index: int = 0,
    ) -> pb.GenerateDataKeyResponse:
        """GenerateDataKey: a data key in plaintext and wrapped under `key_id`.

        Give `key_spec` ("AES_256", "AES_128") or `number_of_bytes`; with neither,
        this client asks for AES_256 (AWS itself would refuse the request).
        """
        request = pb.GenerateDataKeyRequest(
            key_id=key_id,
            encryption_context=dict(encryption_context or {}),
            number_of_bytes=number_of_bytes,
            grant_tokens=list(grant_tokens),
            recipient=recipient,
            dry_run=dry_run,
            min_commit_index=min_commit_index,
        )
        if key_spec is not None:
            request.key_spec = enum_value(res.DataKeySpec, key_spec)
        elif not number_of_bytes:
            request.key_spec = res.DATA_KEY_SPEC_AES_256
        return self._call(lambda s: s.GenerateDataKey, request)

    def generate_data_key_without_plaintext(
        self,
        key_id: str,
        encryption_context: Mapping[str, str] | None = None,
        *,
        key_spec: EnumArg | None = None,
        number_of_bytes: int = 0,
        grant_tokens: Sequence[str] = (),
        dry_run: bool = False,
        min_commit_index: int = 0,
    ) -> pb.GenerateDataKeyWithoutPlaintextResponse:
        """GenerateDataKeyWithoutPlaintext: a data key only wrapped (AES_256 by default)."""
        request = pb.GenerateDataKeyWithoutPlaintextRequest(
            key_id=key_id,
            encryption_context=dict(encryption_context or {}),
            number_of_bytes=number_of_bytes,
            grant_tokens=list(grant_tokens),
            dry_run=dry_run,
            min_commit_index=min_commit_index,
        )
        if key_spec is not None:
            request.key_spec = enum_value(res.DataKeySpec, key_spec)
        elif not number_of_bytes:
            request.key_spec = res.DATA_KEY_SPEC_AES_256
        return self._call(lambda s: s.GenerateDataKeyWithoutPlaintext, request)

    def generate_random(
        self,
        number_of_bytes: int,
        *,
        custom_key_store_id: str = "",
        recipient: pb.RecipientInfo | None = None,
    ) -> pb.GenerateRandomResponse:
        """GenerateRandom: 1-1024 cryptographically secure random bytes."""
        request = pb.GenerateRandomRequest(
            number_of_bytes=number_of_bytes,
            custom_key_store_id=custom_key_store_id,
            recipient=recipient,
        )
        return self._call(lambda s: s.GenerateRandom, request)

    # ------------------------------------------------------------------ aliases

    def create_alias(
        self, alias_name: str, target_key_id: str, *, request_id: str | None = None
    ) -> pb.CreateAliasResponse:
        """CreateAlias: `alias/<name>` pointing at a key id or key ARN."""
        request = pb.CreateAliasRequest(
            alias_name=alias_name,
            target_key_id=target_key_id,
            request_id=self._request_id(request_id),
        )
        return self._call(lambda s: s.CreateAlias, request, retryable=bool(request.request_id))

    def update_alias(
        self, alias_name: str, target_key_id: str, *, request_id: str | None = None
    ) -> pb.UpdateAliasResponse:
        """UpdateAlias: points an existing alias at another key."""
        request = pb.UpdateAliasRequest(
            alias_name=alias_name,
            target_key_id=target_key_id,
            request_id=self._request_id(request_id),
        )
        return self._call(lambda s: s.UpdateAlias, request, retryable=bool(request.request_id))

    def delete_alias(
        self, alias_name: str, *, request_id: str | None = None
    ) -> pb.DeleteAliasResponse:
        """DeleteAlias: removes the alias, not the key."""
        request = pb.DeleteAliasRequest(
            alias_name=alias_name, request_id=self._request_id(request_id)
        )
        return self._call(lambda s: s.DeleteAlias, request, retryable=bool(request.request_id))

    def list_aliases(
        self,
        *,
        key_id: str = "",
        limit: int = 0,
        marker: str = "",
        min_commit_index: int = 0,
    ) -> pb.ListAliasesResponse:
        """ListAliases: one page of aliases, of every key or only of `key_id`."""
        request = pb.ListAliasesRequest(
            key_id=key_id, limit=limit, marker=marker, min_commit_index=min_commit_index
        )
        return self._call(lambda s: s.ListAliases, request)

    def iter_aliases(
        self, *, key_id: str = "", limit: int = 0, min_commit_index: int = 0
    ) -> Iterator[res.AliasListEntry]:
        """Every alias (of every key, or of `key_id`), following markers."""
        marker = ""
        while True:
            page = self.list_aliases(
                key_id=key_id, limit=limit, marker=marker, min_commit_index=min_commit_index
            )
            yield from page.aliases
            if not (page.truncated and page.next_marker):
                return
            marker = page.next_marker

    # ------------------------------------------------------------------ rotation

    def enable_key_rotation(
        self,
        key_id: str,
        *,
        rotation_period_in_days: int = 0,
        request_id: str | None = None,
    ) -> pb.EnableKeyRotationResponse:
        """EnableKeyRotation: automatic rotation every 90-2560 days (0 means 365)."""
        request = pb.EnableKeyRotationRequest(
            key_id=key_id,
            rotation_period_in_days=rotation_period_in_days,
            request_id=self._request_id(request_id),
        )
        return self._call(
            lambda s: s.EnableKeyRotation, request, retryable=bool(request.request_id)
        )

    def disable_key_rotation(
        self, key_id: str, *, request_id: str | None = None
    ) -> pb.DisableKeyRotationResponse:
        """DisableKeyRotation: turns automatic rotation off."""
        request = pb.DisableKeyRotationRequest(
            key_id=key_id, request_id=self._request_id(request_id)
        )
        return self._call(
            lambda s: s.DisableKeyRotation, request, retryable=bool(request.request_id)
        )

    def get_key_rotation_status(
        self, key_id: str, *, min_commit_index: int = 0
    ) -> pb.GetKeyRotationStatusResponse:
        """GetKeyRotationStatus: whether automatic rotation is on, its period and next date."""
        request = pb.GetKeyRotationStatusRequest(key_id=key_id, min_commit_index=min_commit_index)
        return self._call(lambda s: s.GetKeyRotationStatus, request)

    def rotate_key_on_demand(
        self, key_id: str, *, request_id: str | None = None
    ) -> pb.RotateKeyOnDemandResponse:
        """RotateKeyOnDemand: new key material now (at most 25 times per key)."""
        request = pb.RotateKeyOnDemandRequest(
            key_id=key_id, request_id=self._request_id(request_id)
        )
        return self._call(
            lambda s: s.RotateKeyOnDemand, request, retryable=bool(request.request_id)
        )

    def list_key_rotations(
        self,
        key_id: str,
        *,
        include_key_material: EnumArg | None = None,
        limit: int = 0,
        marker: str = "",
        min_commit_index: int = 0,
    ) -> pb.ListKeyRotationsResponse:
        """ListKeyRotations: one page of completed rotations of a key."""
        request = pb.ListKeyRotationsRequest(
            key_id=key_id, limit=limit, marker=marker, min_commit_index=min_commit_index
        )
        if include_key_material is not None:
            request.include_key_material = enum_value(pb.IncludeKeyMaterial, include_key_material)
        return self._call(lambda s: s.ListKeyRotations, request)

    def iter_key_rotations(
        self,
        key_id: str,
        *,
        include_key_material: EnumArg | None = None,
        limit: int = 0,
        min_commit_index: int = 0,
    ) -> Iterator[res.RotationsListEntry]:
        """Every completed rotation of a key, following markers."""
        marker = ""
        while True:
            page = self.list_key_rotations(
                key_id,
                include_key_material=include_key_material,
                limit=limit,
                marker=marker,
                min_commit_index=min_commit_index,
            )
            yield from page.rotations
            if not (page.truncated and page.next_marker):
                return
            marker = page.next_marker

    # ------------------------------------------------------------------ tags

    def tag_resource(
        self, key_id: str, tags: TagsArg, *, request_id: str | None = None
    ) -> pb.TagResourceResponse:
        """TagResource: adds tags, or replaces the values of existing tag keys."""
        request = pb.TagResourceRequest(
            key_id=key_id, tags=_tags(tags), request_id=self._request_id(request_id)
        )
        return self._call(lambda s: s.TagResource, request, retryable=bool(request.request_id))

    def untag_resource(
        self, key_id: str, tag_keys: Iterable[str], *, request_id: str | None = None
    ) -> pb.UntagResourceResponse:
        """UntagResource: removes tags by tag key; unknown tag keys are ignored."""
        if isinstance(tag_keys, str):
            # A lone string would otherwise be split into one-character tag keys.
            tag_keys = [tag_keys]
        request = pb.UntagResourceRequest(
            key_id=key_id, tag_keys=list(tag_keys), request_id=self._request_id(request_id)
        )
        return self._call(lambda s: s.UntagResource, request, retryable=bool(request.request_id))

    def list_resource_tags(
        self,
        key_id: str,
        *,
        limit: int = 0,
        marker: str = "",
        min_commit_index: int = 0,
    ) -> pb.ListResourceTagsResponse:
        """ListResourceTags: one page of a key's tags."""
        request = pb.ListResourceTagsRequest(
            key_id=key_id, limit=limit, marker=marker, min_commit_index=min_commit_index
        )
        return self._call(lambda s: s.ListResourceTags, request)

    def iter_resource_tags(
        self, key_id: str, *, limit: int = 0, min_commit_index: int = 0
    ) -> Iterator[res.Tag]:
        """Every tag of a key, following markers."""
        marker = ""
        while True:
            page = self.list_resource_tags(
                key_id, limit=limit, marker=marker, min_commit_index=min_commit_index
            )
            yield from page.tags
            if not (page.truncated and page.next_marker):
                return
            marker = page.next_marker

    # ------------------------------------------------------------------ key policies

    def put_key_policy(
        self,
        key_id: str,
        policy: str,
        *,
        policy_name: str = "default",
        bypass_policy_lockout_safety_check: bool = False,
        request_id: str | None = None,
    ) -> pb.PutKeyPolicyResponse:
        """PutKeyPolicy: replaces the key policy (a JSON document, at most 32 KiB)."""
        request = pb.PutKeyPolicyRequest(
            key_id=key_id,
            policy_name=policy_name,
            policy=policy,
            bypass_policy_lockout_safety_check=bypass_policy_lockout_safety_check,
            request_id=self._request_id(request_id),
        )
        return self._call(lambda s: s.PutKeyPolicy, request, retryable=bool(request.request_id))

    def get_key_policy(
        self, key_id: str, *, policy_name: str = "default", min_commit_index: int = 0
    ) -> pb.GetKeyPolicyResponse:
        """GetKeyPolicy: the key policy document."""
        request = pb.GetKeyPolicyRequest(
            key_id=key_id, policy_name=policy_name, min_commit_index=min_commit_index
        )
        return self._call(lambda s: s.GetKeyPolicy, request)

    def list_key_policies(
        self, key_id: str, *, limit: int = 0, marker: str = "", min_commit_index: int = 0
    ) -> pb.ListKeyPoliciesResponse:
        """ListKeyPolicies: the names of a key's policies (always ["default"])."""
        request = pb.ListKeyPoliciesRequest(
            key_id=key_id, limit=limit, marker=marker, min_commit_index=min_commit_index
        )
        return self._call(lambda s: s.ListKeyPolicies, request)

    # ------------------------------------------------------------------ grants

    def create_grant(
        self,
        key_id: str,
        grantee_principal: str,
        operations: Iterable[EnumArg],
        *,
        retiring_principal: str = "",
        encryption_context_equals: Mapping[str, str] | None = None,
        encryption_context_subset: Mapping[str, str] | None = None,
        grant_tokens: Sequence[str] = (),
        name: str = "",
        dry_run: bool = False,
        request_id: str | None = None,
    ) -> pb.CreateGrantResponse:
        """CreateGrant: lets `grantee_principal` use the key for `operations` ("Encrypt",
        "GRANT_OPERATION_DECRYPT" or numbers), optionally only with an encryption context.
        Pass the returned `grant_token` in `grant_tokens` to use the grant at once."""
        if isinstance(operations, str):
            operations = [operations]
        request = pb.CreateGrantRequest(
            key_id=key_id,
            grantee_principal=grantee_principal,
            retiring_principal=retiring_principal,
            operations=[enum_value(res.GrantOperation, op) for op in operations],
            grant_tokens=list(grant_tokens),
            name=name,
            dry_run=dry_run,
            request_id=self._request_id(request_id),
        )
        if encryption_context_equals or encryption_context_subset:
            request.constraints.CopyFrom(
                res.GrantConstraints(
                    encryption_context_equals=dict(encryption_context_equals or {}),
                    encryption_context_subset=dict(encryption_context_subset or {}),
                )
            )
        return self._call(lambda s: s.CreateGrant, request, retryable=bool(request.request_id))

    def list_grants(
        self,
        key_id: str,
        *,
        grant_id: str = "",
        grantee_principal: str = "",
        limit: int = 0,
        marker: str = "",
        min_commit_index: int = 0,
    ) -> pb.ListGrantsResponse:
        """ListGrants: one page of a key's grants, optionally one grant or one grantee's."""
        request = pb.ListGrantsRequest(
            key_id=key_id,
            grant_id=grant_id,
            grantee_principal=grantee_principal,
            limit=limit,
            marker=marker,
            min_commit_index=min_commit_index,
        )
        return self._call(lambda s: s.ListGrants, request)

    def iter_grants(
        self,
        key_id: str,
        *,
        grant_id: str = "",
        grantee_principal: str = "",
        limit: int = 0,
        min_commit_index: int = 0,
    ) -> Iterator[res.GrantListEntry]:
        """Every grant of a key (filtered as `list_grants`), following markers."""
        marker = ""
        while True:
            page = self.list_grants(
                key_id,
                grant_id=grant_id,
                grantee_principal=grantee_principal,
                limit=limit,
                marker=marker,
                min_commit_index=min_commit_index,
            )
            yield from page.grants
            if not (page.truncated and page.next_marker):
                return
            marker = page.next_marker

    def list_retirable_grants(
        self,
        retiring_principal: str,
        *,
        limit: int = 0,
        marker: str = "",
        min_commit_index: int = 0,
    ) -> pb.ListRetirableGrantsResponse:
        """ListRetirableGrants: one page of the grants `retiring_principal` may retire."""
        request = pb.ListRetirableGrantsRequest(
            retiring_principal=retiring_principal,
            limit=limit,
            marker=marker,
            min_commit_index=min_commit_index,
        )
        return self._call(lambda s: s.ListRetirableGrants, request)

    def retire_grant(
        self,
        *,
        grant_token: str = "",
        key_id: str = "",
        grant_id: str = "",
        dry_run: bool = False,
        request_id: str | None = None,
    ) -> pb.RetireGrantResponse:
        """RetireGrant: deletes a grant named by `grant_token`, or by `key_id` and `grant_id`."""
        request = pb.RetireGrantRequest(
            grant_token=grant_token,
            key_id=key_id,
            grant_id=grant_id,
            dry_run=dry_run,
            request_id=self._request_id(request_id),
        )
        return self._call(lambda s: s.RetireGrant, request, retryable=bool(request.request_id))

    def revoke_grant(
        self,
        key_id: str,
        grant_id: str,
        *,
        dry_run: bool = False,
        request_id: str | None = None,
    ) -> pb.RevokeGrantResponse:
        """RevokeGrant: deletes a grant (needs kms:RevokeGrant on the key)."""
        request = pb.RevokeGrantRequest(
            key_id=key_id,
            grant_id=grant_id,
            dry_run=dry_run,
            request_id=self._request_id(request_id),
        )
        return self._call(lambda s: s.RevokeGrant, request, retryable=bool(request.request_id))

    # ------------------------------------------------------------------ envelope

    def envelope_encrypt(
        self,
        key_id: str,
        plaintext: bytes,
        encryption_context: Mapping[str, str] | None = None,
    ) -> bytes:
        """Encrypts data of any size locally under a fresh AES-256 data key from kmsd.

        Returns a self-describing KMSE1 blob (layout in `kms_client.envelope`) that
        holds the wrapped data key; `envelope_decrypt` reverses it. The same
        `encryption_context` must be given to decrypt.
        """
        response = self.generate_data_key(
            key_id, encryption_context, key_spec=res.DATA_KEY_SPEC_AES_256
        )
        data_key = response.plaintext
        try:
            return envelope.seal(data_key, response.ciphertext_blob, plaintext)
        finally:
            # Python cannot wipe immutable bytes; dropping every reference (the
            # response holds one too) is the most it allows.
            del data_key
            response.ClearField("plaintext")

    def envelope_decrypt(
        self,
        blob: bytes,
        encryption_context: Mapping[str, str] | None = None,
        *,
        key_id: str = "",
    ) -> bytes:
        """Decrypts a KMSE1 blob made by `envelope_encrypt`.

        Raises `envelope.InvalidEnvelopeError` for a malformed or tampered blob and
        `InvalidCiphertextException` when kmsd cannot unwrap the data key (wrong
        encryption context, for instance). `key_id`, if given, must name the key
        that wrapped the data key.
        """
        parsed = envelope.Envelope.parse(blob)
        response = self.decrypt(parsed.wrapped_key, encryption_context, key_id=key_id)
        data_key = response.plaintext
        try:
            return envelope.open_envelope(data_key, parsed)
        finally:
            del data_key
            response.ClearField("plaintext")


__all__ = ["DEFAULT_ENDPOINT", "EnumArg", "KmsClient", "KmsClientError", "TagsArg"]
