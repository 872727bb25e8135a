"""ClusterClient: the operator API (kms.v1.ClusterService) — status of every node,
membership changes and leadership transfer, following the leader's address when a
node that is not the leader answers UNAVAILABLE."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc
from kms.v1 import cluster_service_pb2 as pb
from kms.v1 import cluster_service_pb2_grpc as pb_grpc

from kms_client.errors import KmsClientError, from_rpc_error
from kms_client.tls import TlsFiles, channel_credentials, open_channel

_Resp = TypeVar("_Resp")


class ClusterClient:
    """Talks to the ClusterService of the given nodes. Transport security as KmsClient:
    one of `tls`, `credentials` and `plaintext=True`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 10.0,
        tls: TlsFiles | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        plaintext: bool = False,
        attempts: int = 12,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        self._endpoints = list(dict.fromkeys(endpoints))
        self._timeout = timeout
        self._credentials = channel_credentials(tls, credentials, plaintext)
        self._channels: dict[str, grpc.Channel] = {}
        self._attempts = max(1, attempts)
        self._sleep = sleep

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stub(self, endpoint: str) -> pb_grpc.ClusterServiceStub:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = open_channel(endpoint, self._credentials)
            self._channels[endpoint] = channel
        return pb_grpc.ClusterServiceStub(channel)

    def node_status(self, endpoint: str) -> pb.GetClusterStatusResponse:
        """One node's own view."""
        try:
            return self._stub(endpoint).GetClusterStatus(
                pb.GetClusterStatusRequest(), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def status(self) -> dict[str, pb.GetClusterStatusResponse | KmsClientError]:
        """Every node's view, by client address: the given endpoints and every member
        they report. A node that does not answer maps to its error."""
        results: dict[str, pb.GetClusterStatusResponse | KmsClientError] = {}
        pending = list(self._endpoints)
        while pending:
            endpoint = pending.pop(0)
            if endpoint in results:
                continue
            try:
                response = self.node_status(endpoint)
            except KmsClientError as error:
                results[endpoint] = error
                continue
            results[endpoint] = response
            pending.extend(
                m.client_address
                for m in response.members
                if m.client_address and m.client_address not in results
            )
        return results

    def _on_leader(self, call: Callable[[pb_grpc.ClusterServiceStub], _Resp]) -> _Resp:
        """Runs `call` on the leader: tries the endpoints in turn, following leader
        hints, with backoff while an election is under way (bounded by `attempts`)."""
        last: KmsClientError | None = None
        hint = ""
        for attempt in range(self._attempts):
            endpoint = hint or self._endpoints[attempt % len(self._endpoints)]
            hint = ""
            try:
                return call(self._stub(endpoint))
            except grpc.RpcError as rpc_error:
                last = from_rpc_error(rpc_error)
                if last.code != grpc.StatusCode.UNAVAILABLE:
                    raise last from rpc_error
                # A hint may name a leader that just died: follow it once, then rotate.
                hint = last.leader_address or ""
            self._sleep(min(1.0, 0.05 * 2**attempt))
        assert last is not None
        raise last

    def add_member(
        self, node_id: int, peer_address: str, client_address: str
    ) -> pb.AddMemberResponse:
        request = pb.AddMemberRequest(
            node_id=node_id, peer_address=peer_address, client_address=client_address
        )
        return self._on_leader(lambda stub: stub.AddMember(request, timeout=self._timeout))

    def remove_member(self, node_id: int) -> pb.RemoveMemberResponse:
        request = pb.RemoveMemberRequest(node_id=node_id)
        return self._on_leader(lambda stub: stub.RemoveMember(request, timeout=self._timeout))

    def transfer_leadership(self, node_id: int) -> pb.TransferLeadershipResponse:
        request = pb.TransferLeadershipRequest(node_id=node_id)
        return self._on_leader(lambda stub: stub.TransferLeadership(request, timeout=self._timeout))
