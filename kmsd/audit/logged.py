"""Log-backed audit records: the record of a mutation made durable by the command log.

A mutating request's record needs the command's outcome, known only once the command
is committed and applied. Written then and fsynced before the answer, it puts a second
fsync in series after the log's (docs/performance.md). Instead the node that serves
the request drafts the record before proposing (everything but the outcome) and puts
the draft in the command (`kms.fsm.v1.AuditDraft`), so the log makes it durable with
the command. When that node applies the command, `LoggedAudit.applied` completes the
record with the outcome and hands it to the `AuditWriter` without waiting for its
fsync; the request is answered at once. Should the node crash before that fsync, it
applies the command again at its next start (from its snapshot and log) and writes the
record then, marked `rebuilt_from_log`: the writer says up to which log index the
node's records reached the chain (`logged_watermark`), and only later ones are written.
The log must keep what it may still need: `settle` makes every record durable before a
snapshot lets the log discard the entries behind it.

How the draft gets from the RPC to the command: the API's audit hook sets
`CURRENT_CALL` for the request it wraps; `Kms.propose` asks it for a draft and tells
it, after the command applied, whether the record was written from the log.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from kms.fsm.v1 import commands_pb2 as fsm

from kmsd.audit.record import AuditEvent, bounded, canonical_json
from kmsd.audit.writer import AuditWriter
from kmsd.errors import error_from_reason

log = logging.getLogger(__name__)

_TOOK_KEPT = 4096
"""Applied log indices remembered for `took` (proposals answered long after are rare)."""


class AuditedCall(Protocol):
    """The request being served, as the audit hook sees it."""

    logged: bool
    """Set once its command applied and the record was written from the log."""

    def draft_event(self) -> AuditEvent:
        """The record of the request, outcome aside."""
        ...


CURRENT_CALL: contextvars.ContextVar[AuditedCall | None] = contextvars.ContextVar(
    "kmsd_audited_call", default=None
)


def _detail(draft: fsm.AuditDraft) -> dict[str, Any]:
    if not draft.detail_json:
        return {}
    try:
        loaded = json.loads(draft.detail_json)
    except ValueError:
        return {"undecodable_detail": True}  # never expected: drafted by this node
    return loaded if isinstance(loaded, dict) else {}


class LoggedAudit:
    """Writes the records of this node's mutations as their commands are applied."""

    def __init__(self, writer: AuditWriter, node_id: int, key_arn: Callable[[str], str]) -> None:
        """`key_arn` names a key id as its ARN."""
        self._writer = writer
        self._node = node_id
        self._key_arn = key_arn
        self._life = os.urandom(8)
        # Records at or below this index reached the chain before this start.
        self._watermark = writer.logged_watermark
        self._took: OrderedDict[int, None] = OrderedDict()
        self.rebuilt = 0
        """Records written from the log for commands of an earlier process (a crash)."""

    def draft_into(self, command: fsm.Command) -> AuditedCall | None:
        """Puts the draft record of the request being served (if any, and if it has
        none yet) into `command`; returns that request."""
        call = CURRENT_CALL.get()
        if call is None or call.logged:
            return None
        event = call.draft_event()
        draft = command.audit
        draft.node = self._node
        draft.life = self._life
        draft.operation = event.operation
        draft.principal = event.principal
        draft.source = event.source
        if event.key_arn is not None:
            draft.key_arn = event.key_arn
        draft.request_id = event.request_id
        draft.encryption_context.update(event.encryption_context)
        if event.detail:
            draft.detail_json = canonical_json(event.detail)
        return call

    def applied(self, index: int, command: fsm.Command, result: fsm.CommandResult) -> None:
        """Called by the key store after it applied `command` at `index`, on the loop.
        Never raises: a record that cannot be made must not stop the state machine."""
        if not command.HasField("audit"):
            return
        try:
            self._record(index, command.audit, result)
        except Exception:
            log.exception("audit: cannot make the record of log index %d", index)

    def _record(self, index: int, draft: fsm.AuditDraft, result: fsm.CommandResult) -> None:
        if draft.node != self._node:
            return
        if index <= self._watermark:
            if draft.life != self._life:
                return  # recorded before the restart that replays it
            # Proposed by this process, yet at or below what the audit log has seen: the
            # log was emptied (its indices start again) while the audit log was kept.
            log.warning(
                "audit: log index %d is at or below the last recorded one (%d): the command"
                " log was reset; recording from here on",
                index,
                self._watermark,
            )
            self._watermark = 0
        detail = _detail(draft)
        key_arn = draft.key_arn if draft.HasField("key_arn") else None
        if result.HasField("error"):
            error = error_from_reason(result.error.reason, result.error.message, result.error.field)
            outcome, reason, exception = "error", error.reason, error.aws_exception
        else:
            outcome, reason, exception = "ok", "", ""
            if result.key_id:
                key_arn = self._key_arn(result.key_id)
            if result.grant_id:
                detail["grant_id"] = bounded(result.grant_id, 128)
        detail["log_index"] = index
        if draft.life != self._life:
            detail["rebuilt_from_log"] = True
            self.rebuilt += 1
        self._writer.submit_logged(
            AuditEvent(
                operation=draft.operation,
                outcome=outcome,
                principal=draft.principal,
                source=draft.source,
                key_arn=key_arn,
                request_id=draft.request_id,
                encryption_context=dict(draft.encryption_context),
                error_reason=reason,
                aws_exception=exception,
                detail=detail,
            ),
            index,
        )
        self._took[index] = None
        if len(self._took) > _TOOK_KEPT:
            self._took.popitem(last=False)

    def took(self, index: int) -> bool:
        """True (once) if the command applied at `index` had its record written here."""
        if index in self._took:
            del self._took[index]
            return True
        return False

    def settle(self) -> None:
        """Makes every record written so far durable now; raises AuditUnavailable if
        that is impossible (the log must then keep its entries)."""
        self._writer.settle()
