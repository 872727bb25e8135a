"""Key policies: PutKeyPolicy, GetKeyPolicy, ListKeyPolicies.

A key has one policy, named "default" as in AWS. Documents are validated here
(kmsd.auth.policy) before they are proposed; the state machine stores them as
given. The policy lockout safety check refuses a policy that would stop the caller
from changing it again, unless the request bypasses it.
"""

from __future__ import annotations

from kms.fsm.v1 import commands_pb2 as fsm
from kms.v1 import kms_service_pb2 as pb

from kmsd.auth.authorizer import Caller
from kmsd.auth.policy import POLICY_NAME, Policy, parse_policy
from kmsd.errors import MalformedPolicyDocumentError, ValidationError
from kmsd.service import access, validate
from kmsd.service.context import Kms
from kmsd.service.paging import page

MAX_POLICY_NAME = 128


def policy_name(value: str) -> None:
    """Only "default" (or empty, meaning it) names a key policy, as in AWS."""
    if value and value != POLICY_NAME:
        if len(value) > MAX_POLICY_NAME:
            raise ValidationError("policy_name", f"must be at most {MAX_POLICY_NAME} characters")
        raise ValidationError("policy_name", "must be 'default', the only key policy name")


def checked_policy(
    kms: Kms, caller: Caller, text: str, key_arn: str, bypass_lockout_check: bool
) -> Policy:
    """Parses `text` (MalformedPolicyDocument naming what is wrong) and runs the policy
    lockout safety check for `caller` unless bypassed."""
    parsed = parse_policy(text, kms.names.account)
    if not bypass_lockout_check:
        lookup = access.condition_lookup(
            kms, caller, None, extra={"kms:bypasspolicylockoutsafetycheck": False}
        )
        if not kms.authorizer.allows_policy_change(caller, key_arn, parsed, lookup):
            raise MalformedPolicyDocumentError(
                "policy",
                f"the new key policy would not allow {caller.principal[:120]} to call"
                " PutKeyPolicy on the key later (policy lockout safety check); allow"
                " kms:PutKeyPolicy or set bypass_policy_lockout_safety_check",
            )
    return parsed


async def put_key_policy(
    kms: Kms, request: pb.PutKeyPolicyRequest, caller: Caller
) -> pb.PutKeyPolicyResponse:
    validate.request_id(request.request_id)
    policy_name(request.policy_name)
    if not request.policy:
        raise ValidationError("policy", "is required")
    bypass = request.bypass_policy_lockout_safety_check
    key = await access.key_for_write(
        kms,
        caller,
        request.key_id,
        "kms:PutKeyPolicy",
        extra={"kms:bypasspolicylockoutsafetycheck": bypass},
        request=request,
    )
    checked_policy(kms, caller, request.policy, kms.names.key_arn(key.key_id), bypass)
    command = kms.command(request, caller.principal)
    command.put_key_policy.CopyFrom(fsm.PutKeyPolicy(key_id=key.key_id, policy=request.policy))
    committed = await kms.propose(command)
    return pb.PutKeyPolicyResponse(commit_index=committed.commit_index)


async def get_key_policy(
    kms: Kms, request: pb.GetKeyPolicyRequest, caller: Caller
) -> pb.GetKeyPolicyResponse:
    policy_name(request.policy_name)
    key = await access.key_for_read(
        kms, caller, request.key_id, "kms:GetKeyPolicy", request.min_commit_index
    )
    return pb.GetKeyPolicyResponse(
        policy=key.policy or kms.authorizer.root_only_policy, policy_name=POLICY_NAME
    )


async def list_key_policies(
    kms: Kms, request: pb.ListKeyPoliciesRequest, caller: Caller
) -> pb.ListKeyPoliciesResponse:
    key = await access.key_for_read(
        kms, caller, request.key_id, "kms:ListKeyPolicies", request.min_commit_index
    )
    chosen, next_marker = page(
        [POLICY_NAME], lambda name: name, f"policies/{key.key_id}", request.limit, request.marker
    )
    return pb.ListKeyPoliciesResponse(
        policy_names=chosen, next_marker=next_marker, truncated=bool(next_marker)
    )
