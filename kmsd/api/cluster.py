"""ClusterService: node status, membership changes and leadership transfer.

On a single node without Raft the status describes that node alone and the
membership operations answer UnsupportedOperationException.

Every ClusterService RPC is for operators: a caller whose principal is not in
`[auth].operators` gets PERMISSION_DENIED (AccessDeniedException), recorded in the
audit log like any refusal.

A membership change that cannot be valid (adding a removed id, since ids are never
reused, or an existing member; removing a non-member) is refused by the log
(`RaftLog._change_conf`, from the core's rules) on whichever node answers, before
anything is proposed, with INVALID_ARGUMENT naming `node_id`. The leader checks
again when proposing (its applied membership is authoritative), and a change that
commits anyway is skipped on every node and reported the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from kms.v1 import cluster_service_pb2 as pb
from kms.v1 import cluster_service_pb2_grpc as pb_grpc

from kmsd.api.audit import AuditHook
from kmsd.api.status import abort
from kmsd.auth.authorizer import Authorizer, Caller
from kmsd.auth.identity import principal_of
from kmsd.errors import (
    AccessDeniedError,
    KmsError,
    NotFoundError,
    UnavailableError,
    UnsupportedOperationError,
    ValidationError,
)
from kmsd.log.base import CommandLog
from kmsd.log.raft_disk import Member
from kmsd.log.raft_log import RaftLog
from kmsd.raft import Role

Ctx = grpc.aio.ServicerContext[object, object]
Resp = TypeVar("Resp")

_ROLES = {
    Role.FOLLOWER: pb.NODE_ROLE_FOLLOWER,
    Role.PRE_CANDIDATE: pb.NODE_ROLE_PRE_CANDIDATE,
    Role.CANDIDATE: pb.NODE_ROLE_CANDIDATE,
    Role.LEADER: pb.NODE_ROLE_LEADER,
}


class ClusterServicer(pb_grpc.ClusterServiceServicer):
    """Serves kms.v1.ClusterService from one node's command log."""

    def __init__(
        self,
        log: CommandLog,
        node_id: int,
        client_address: str,
        audit: AuditHook | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self._log = log
        self._node_id = node_id
        self._client_address = client_address
        self._audit = audit
        # None: no operator check (in-process tests that build the servicer alone).
        self._authorizer = authorizer

    async def _call(
        self, request: Message, context: Ctx, body: Callable[[], Awaitable[Resp]]
    ) -> Resp:
        """Runs one RPC's body (which raises KmsError) for an operator, recorded when
        auditing is on."""
        caller = Caller(principal_of(context))

        async def guarded() -> Resp:
            if self._authorizer is not None and not self._authorizer.is_operator(caller):
                operation = request.DESCRIPTOR.name.removesuffix("Request")
                raise AccessDeniedError(
                    f"{caller.principal[:120]} is not authorized to perform"
                    f" {operation}: ClusterService is for [auth].operators.",
                    denial="not an operator",
                )
            return await body()

        if self._audit is not None:
            return await self._audit.call(request, context, guarded, caller.principal)
        try:
            return await guarded()
        except KmsError as error:
            await abort(context, error)

    def _raft(self) -> RaftLog:
        if not isinstance(self._log, RaftLog):
            raise UnsupportedOperationError("this node runs alone, without a cluster")
        return self._log

    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, context: Ctx
    ) -> pb.GetClusterStatusResponse:
        return await self._call(request, context, self._status)

    async def _status(self) -> pb.GetClusterStatusResponse:
        if not isinstance(self._log, RaftLog):
            applied = await self._log.read_barrier()
            return pb.GetClusterStatusResponse(
                node_id=self._node_id,
                role=pb.NODE_ROLE_LEADER,
                commit_index=applied,
                applied_index=applied,
                leader_id=self._node_id,
                leader_address=self._client_address,
                last_contact_ms=0,
                members=[
                    pb.MemberStatus(
                        node_id=self._node_id, client_address=self._client_address, voter=True
                    )
                ],
                replicated=False,
            )
        raft = self._log
        status = raft.status()
        members = raft.members
        last = max([p.match for p in status.progress.values()], default=0)
        response = pb.GetClusterStatusResponse(
            node_id=status.id,
            role=_ROLES[status.role],
            term=status.term,
            commit_index=status.commit,
            applied_index=raft.applied_index,
            leader_id=status.leader,
            leader_address=raft.leader_address(),
            last_contact_ms=-1
            if status.ticks_since_leader_contact is None
            else int(status.ticks_since_leader_contact * raft.settings.tick_seconds * 1000),
            replicated=True,
        )
        ids = sorted(status.conf.voters | status.conf.learners | set(members))
        for node_id in ids:
            member = members.get(node_id, Member(node_id, "", ""))
            entry = pb.MemberStatus(
                node_id=node_id,
                peer_address=member.peer_address,
                client_address=member.client_address,
                voter=node_id in status.conf.voters,
            )
            progress = status.progress.get(node_id)
            if progress is not None:
                entry.match_index = progress.match
                entry.lag = max(0, last - progress.match)
                entry.recent_active = progress.recent_active
            response.members.append(entry)
        return response

    async def AddMember(self, request: pb.AddMemberRequest, context: Ctx) -> pb.AddMemberResponse:
        return await self._call(request, context, lambda: self._add_member(request))

    async def _add_member(self, request: pb.AddMemberRequest) -> pb.AddMemberResponse:
        raft = self._raft()
        node_id = request.node_id
        if node_id < 1:
            raise ValidationError("node_id", "must be a positive integer")
        for field in ("peer_address", "client_address"):
            if ":" not in getattr(request, field):
                raise ValidationError(field, "must be host:port")
        index = await raft.add_member(
            Member(request.node_id, request.peer_address, request.client_address)
        )
        return pb.AddMemberResponse(commit_index=index)

    async def RemoveMember(
        self, request: pb.RemoveMemberRequest, context: Ctx
    ) -> pb.RemoveMemberResponse:
        return await self._call(request, context, lambda: self._remove_member(request))

    async def _remove_member(self, request: pb.RemoveMemberRequest) -> pb.RemoveMemberResponse:
        raft = self._raft()
        node_id = request.node_id
        if node_id < 1:
            raise ValidationError("node_id", "must be a positive integer")
        index = await raft.remove_member(node_id)
        return pb.RemoveMemberResponse(commit_index=index)

    async def TransferLeadership(
        self, request: pb.TransferLeadershipRequest, context: Ctx
    ) -> pb.TransferLeadershipResponse:
        return await self._call(request, context, lambda: self._transfer_leadership(request))

    async def _transfer_leadership(
        self, request: pb.TransferLeadershipRequest
    ) -> pb.TransferLeadershipResponse:
        raft = self._raft()
        if request.node_id not in raft.status().conf.voters:
            raise NotFoundError(f"node {request.node_id} is not a voter")
        raft.transfer_leadership(request.node_id)
        # Leadership moves within an election timeout when the target is caught up.
        deadline = asyncio.get_running_loop().time() + raft.settings.request_timeout_s
        while raft.leader_id != request.node_id:
            if asyncio.get_running_loop().time() > deadline:
                raise UnavailableError(
                    f"node {request.node_id} did not take over in time; is it caught up?"
                )
            await asyncio.sleep(raft.settings.tick_seconds)
        return pb.TransferLeadershipResponse()
