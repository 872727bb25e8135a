"""KeyManagementService over gRPC: each RPC hands its request to `kmsd.service` and maps errors.

Handlers are one line each on purpose: validation, authorization, commands and reads
live in `kmsd.service`; the mapping of errors to `google.rpc.Status` lives in
`status`. The one thing taken from gRPC here is the caller: its principal, from the
TLS auth context (`kmsd.auth.identity`), travels to the operation as a `Caller`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from kmsd.api.audit import AuditHook
from kmsd.api.status import abort
from kmsd.auth.authorizer import Caller
from kmsd.auth.identity import principal_of
from kmsd.errors import InternalError, KmsError
from kmsd.service import aliases, crypto_ops, grants, keys, policies, rotation, tags
from kmsd.service.context import Kms
from kmsd.service.validate import known_enum_values

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp")
Ctx = grpc.aio.ServicerContext[object, object]
Operation = Callable[[Kms, Req, Caller], Awaitable[Resp]]


class KeyManagementServicer(pb_grpc.KeyManagementServiceServicer):
    """Serves kms.v1.KeyManagementService from one node's `Kms`."""

    def __init__(self, kms: Kms, audit: AuditHook | None = None) -> None:
        self._kms = kms
        self._audit = audit

    async def _run(self, operation: Operation[Req, Resp], request: Req, caller: Caller) -> Resp:
        try:
            # Before any work, and inside the audit hook, so a throttled call is recorded.
            self._kms.limiter.take(caller.principal)
            known_enum_values(request)
            return await operation(self._kms, request, caller)
        except KmsError:
            raise
        except Exception as error:
            # The traceback names code, never request contents (which may be plaintext).
            log.exception("internal error in %s", operation.__name__)
            raise InternalError("internal error") from error

    async def _call(self, operation: Operation[Req, Resp], request: Req, context: Ctx) -> Resp:
        # Every RPC goes through here: with auditing on, the hook records its outcome.
        caller = Caller(principal_of(context))
        if self._audit is not None:
            return await self._audit.call(
                request, context, lambda: self._run(operation, request, caller), caller.principal
            )
        try:
            return await self._run(operation, request, caller)
        except KmsError as error:
            await abort(context, error)

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Ctx) -> pb.CreateKeyResponse:
        return await self._call(keys.create_key, request, context)

    async def DescribeKey(
        self, request: pb.DescribeKeyRequest, context: Ctx
    ) -> pb.DescribeKeyResponse:
        return await self._call(keys.describe_key, request, context)

    async def ListKeys(self, request: pb.ListKeysRequest, context: Ctx) -> pb.ListKeysResponse:
        return await self._call(keys.list_keys, request, context)

    async def UpdateKeyDescription(
        self, request: pb.UpdateKeyDescriptionRequest, context: Ctx
    ) -> pb.UpdateKeyDescriptionResponse:
        return await self._call(keys.update_key_description, request, context)

    async def EnableKey(self, request: pb.EnableKeyRequest, context: Ctx) -> pb.EnableKeyResponse:
        return await self._call(keys.enable_key, request, context)

    async def DisableKey(
        self, request: pb.DisableKeyRequest, context: Ctx
    ) -> pb.DisableKeyResponse:
        return await self._call(keys.disable_key, request, context)

    async def ScheduleKeyDeletion(
        self, request: pb.ScheduleKeyDeletionRequest, context: Ctx
    ) -> pb.ScheduleKeyDeletionResponse:
        return await self._call(keys.schedule_key_deletion, request, context)

    async def CancelKeyDeletion(
        self, request: pb.CancelKeyDeletionRequest, context: Ctx
    ) -> pb.CancelKeyDeletionResponse:
        return await self._call(keys.cancel_key_deletion, request, context)

    async def Encrypt(self, request: pb.EncryptRequest, context: Ctx) -> pb.EncryptResponse:
        return await self._call(crypto_ops.encrypt, request, context)

    async def Decrypt(self, request: pb.DecryptRequest, context: Ctx) -> pb.DecryptResponse:
        return await self._call(crypto_ops.decrypt, request, context)

    async def ReEncrypt(self, request: pb.ReEncryptRequest, context: Ctx) -> pb.ReEncryptResponse:
        return await self._call(crypto_ops.re_encrypt, request, context)

    async def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: Ctx
    ) -> pb.GenerateDataKeyResponse:
        return await self._call(crypto_ops.generate_data_key, request, context)

    async def GenerateDataKeyWithoutPlaintext(
        self, request: pb.GenerateDataKeyWithoutPlaintextRequest, context: Ctx
    ) -> pb.GenerateDataKeyWithoutPlaintextResponse:
        return await self._call(crypto_ops.generate_data_key_without_plaintext, request, context)

    async def GenerateRandom(
        self, request: pb.GenerateRandomRequest, context: Ctx
    ) -> pb.GenerateRandomResponse:
        return await self._call(crypto_ops.generate_random, request, context)

    async def CreateAlias(
        self, request: pb.CreateAliasRequest, context: Ctx
    ) -> pb.CreateAliasResponse:
        return await self._call(aliases.create_alias, request, context)

    async def UpdateAlias(
        self, request: pb.UpdateAliasRequest, context: Ctx
    ) -> pb.UpdateAliasResponse:
        return await self._call(aliases.update_alias, request, context)

    async def DeleteAlias(
        self, request: pb.DeleteAliasRequest, context: Ctx
    ) -> pb.DeleteAliasResponse:
        return await self._call(aliases.delete_alias, request, context)

    async def ListAliases(
        self, request: pb.ListAliasesRequest, context: Ctx
    ) -> pb.ListAliasesResponse:
        return await self._call(aliases.list_aliases, request, context)

    async def EnableKeyRotation(
        self, request: pb.EnableKeyRotationRequest, context: Ctx
    ) -> pb.EnableKeyRotationResponse:
        return await self._call(rotation.enable_key_rotation, request, context)

    async def DisableKeyRotation(
        self, request: pb.DisableKeyRotationRequest, context: Ctx
    ) -> pb.DisableKeyRotationResponse:
        return await self._call(rotation.disable_key_rotation, request, context)

    async def GetKeyRotationStatus(
        self, request: pb.GetKeyRotationStatusRequest, context: Ctx
    ) -> pb.GetKeyRotationStatusResponse:
        return await self._call(rotation.get_key_rotation_status, request, context)

    async def RotateKeyOnDemand(
        self, request: pb.RotateKeyOnDemandRequest, context: Ctx
    ) -> pb.RotateKeyOnDemandResponse:
        return await self._call(rotation.rotate_key_on_demand, request, context)

    async def ListKeyRotations(
        self, request: pb.ListKeyRotationsRequest, context: Ctx
    ) -> pb.ListKeyRotationsResponse:
        return await self._call(rotation.list_key_rotations, request, context)

    async def TagResource(
        self, request: pb.TagResourceRequest, context: Ctx
    ) -> pb.TagResourceResponse:
        return await self._call(tags.tag_resource, request, context)

    async def UntagResource(
        self, request: pb.UntagResourceRequest, context: Ctx
    ) -> pb.UntagResourceResponse:
        return await self._call(tags.untag_resource, request, context)

    async def ListResourceTags(
        self, request: pb.ListResourceTagsRequest, context: Ctx
    ) -> pb.ListResourceTagsResponse:
        return await self._call(tags.list_resource_tags, request, context)

    async def PutKeyPolicy(
        self, request: pb.PutKeyPolicyRequest, context: Ctx
    ) -> pb.PutKeyPolicyResponse:
        return await self._call(policies.put_key_policy, request, context)

    async def GetKeyPolicy(
        self, request: pb.GetKeyPolicyRequest, context: Ctx
    ) -> pb.GetKeyPolicyResponse:
        return await self._call(policies.get_key_policy, request, context)

    async def ListKeyPolicies(
        self, request: pb.ListKeyPoliciesRequest, context: Ctx
    ) -> pb.ListKeyPoliciesResponse:
        return await self._call(policies.list_key_policies, request, context)

    async def CreateGrant(
        self, request: pb.CreateGrantRequest, context: Ctx
    ) -> pb.CreateGrantResponse:
        return await self._call(grants.create_grant, request, context)

    async def ListGrants(
        self, request: pb.ListGrantsRequest, context: Ctx
    ) -> pb.ListGrantsResponse:
        return await self._call(grants.list_grants, request, context)

    async def ListRetirableGrants(
        self, request: pb.ListRetirableGrantsRequest, context: Ctx
    ) -> pb.ListRetirableGrantsResponse:
        return await self._call(grants.list_retirable_grants, request, context)

    async def RetireGrant(
        self, request: pb.RetireGrantRequest, context: Ctx
    ) -> pb.RetireGrantResponse:
        return await self._call(grants.retire_grant, request, context)

    async def RevokeGrant(
        self, request: pb.RevokeGrantRequest, context: Ctx
    ) -> pb.RevokeGrantResponse:
        return await self._call(grants.revoke_grant, request, context)
