"""The authorization decision for one request: roles from `[auth]`, the key's policy and
the caller's grants.

Evaluation order (docs/security.md), for a request on a key:

1. `[auth].enabled = false`: everything is allowed.
2. An explicit Deny in the key policy that matches the request: denied (also for
   administrators; only `[auth].enabled = false` or a new policy lifts it).
3. An Allow in the key policy, or being an administrator (AWS: the account's root,
   which the default policy names), or a grant of the caller that allows the
   operation with this encryption context: allowed.
4. Otherwise denied (default deny).

Account-level operations that name no key (CreateKey, ListKeys, ListAliases,
GenerateRandom) are allowed to administrators and to principals matching a
`[auth].key_creators` pattern; ClusterService to `[auth].operators`. The anonymous
caller of plaintext mode matches a role only where "anonymous" is listed literally.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kms.fsm.v1 import commands_pb2 as fsm

from kmsd.auth.conditions import Lookup
from kmsd.auth.grants import grant_allows
from kmsd.auth.identity import ANONYMOUS as ANONYMOUS  # the caller without a certificate
from kmsd.auth.policy import (
    AccessRequest,
    Decision,
    Policy,
    default_policy,
    evaluate,
    parse_policy,
)
from kmsd.config import AuthConfig
from kmsd.errors import KmsError

log = logging.getLogger(__name__)

_POLICY_CACHE = 1024


@dataclass(frozen=True)
class Caller:
    """Who sends a request: the principal mutual TLS established."""

    principal: str

    @property
    def authenticated(self) -> bool:
        return self.principal != ANONYMOUS


@dataclass(frozen=True)
class Verdict:
    """An authorization decision and, when denied, why (for the audit log only)."""

    allowed: bool
    why: str = ""


ALLOWED = Verdict(True)


class Authorizer:
    """Decides requests for one node from its `[auth]` configuration."""

    def __init__(self, config: AuthConfig, account: str) -> None:
        self.config = config
        self.account = account
        self._admins = frozenset(config.administrators)
        self._operators = frozenset(config.operators)
        self._policies: OrderedDict[str, Policy] = OrderedDict()
        self.root_only_policy = default_policy(account, None)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def is_admin(self, caller: Caller) -> bool:
        return caller.principal in self._admins

    def is_operator(self, caller: Caller) -> bool:
        return not self.enabled or caller.principal in self._operators

    def may_use_account(self, caller: Caller) -> bool:
        """CreateKey, ListKeys, ListAliases, GenerateRandom: administrators and key creators."""
        if not self.enabled or self.is_admin(caller):
            return True
        if not caller.authenticated:
            return ANONYMOUS in self.config.key_creators
        return any(fnmatch.fnmatchcase(caller.principal, p) for p in self.config.key_creators)

    def policy(self, text: str) -> Policy:
        """The parsed policy (cached); "" is the root-only default of keys created before
        policies were enforced."""
        text = text or self.root_only_policy
        cached = self._policies.get(text)
        if cached is not None:
            self._policies.move_to_end(text)
            return cached
        try:
            parsed = parse_policy(text, self.account)
        except KmsError as error:
            # Stored policies were valid when written; if a later kmsd reads one
            # differently, fall back to the administrators only rather than fail open.
            log.error("a stored key policy no longer parses (%s); administrators only", error)
            parsed = parse_policy(self.root_only_policy, self.account)
        self._policies[text] = parsed
        if len(self._policies) > _POLICY_CACHE:
            self._policies.popitem(last=False)
        return parsed

    def decide(
        self,
        caller: Caller,
        action: str,
        key_arn: str,
        policy_text: str,
        grants: Sequence[fsm.GrantRecord],
        lookup: Lookup,
        encryption_context: Mapping[str, str] | None = None,
    ) -> Verdict:
        """Whether `caller` may do `action` on the key `key_arn` whose policy is
        `policy_text` and on which the caller holds `grants`."""
        if not self.enabled:
            return ALLOWED
        admin = self.is_admin(caller)
        decision = self.policy_decision(caller, action, key_arn, self.policy(policy_text), lookup)
        if decision is Decision.DENY:
            return Verdict(False, "explicit deny in the key policy")
        if decision is Decision.ALLOW or admin:
            return ALLOWED
        if any(grant_allows(g, action, encryption_context) for g in grants):
            return ALLOWED
        return Verdict(False, "no key policy statement or grant allows it")

    def policy_decision(
        self, caller: Caller, action: str, key_arn: str, policy: Policy, lookup: Lookup
    ) -> Decision:
        """What the key policy alone says about `caller` doing `action` on the key."""
        request = AccessRequest(
            principal=caller.principal,
            authenticated=caller.authenticated,
            is_admin=self.is_admin(caller),
            action=action,
            resource=key_arn,
            lookup=lookup,
        )
        return evaluate(policy, request)

    def allows_policy_change(
        self, caller: Caller, key_arn: str, policy: Policy, lookup: Lookup
    ) -> bool:
        """The policy lockout safety check: would `policy` let `caller` call
        PutKeyPolicy afterwards? (Grants cannot give PutKeyPolicy.)"""
        if not self.enabled:
            return True
        decision = self.policy_decision(caller, "kms:PutKeyPolicy", key_arn, policy, lookup)
        return decision is Decision.ALLOW or (self.is_admin(caller) and decision is Decision.NONE)
