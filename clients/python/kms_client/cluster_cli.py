"""`kmsctl cluster status|add|remove|transfer`: the operator commands."""

from __future__ import annotations

import argparse
import sys

import grpc
from google.protobuf import json_format
from kms.v1 import cluster_service_pb2 as pb

from kms_client.cluster import ClusterClient
from kms_client.errors import KmsClientError

_ROLE = {
    pb.NODE_ROLE_FOLLOWER: "follower",
    pb.NODE_ROLE_PRE_CANDIDATE: "pre-candidate",
    pb.NODE_ROLE_CANDIDATE: "candidate",
    pb.NODE_ROLE_LEADER: "leader",
}


def configure(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Adds the `cluster` command and its subcommands."""
    cluster = sub.add_parser(
        "cluster", help="cluster status and membership (ClusterService)", allow_abbrev=False
    )
    actions = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    actions.add_parser("status", help="every node's role, term, commit/applied index and lag")
    add = actions.add_parser("add", help="add a node (as a learner, promoted once caught up)")
    add.add_argument("--node-id", type=int, required=True, help="a new, never used node id")
    add.add_argument("--peer-address", required=True, help="host:port of its Raft port")
    add.add_argument("--client-address", required=True, help="host:port of its client API")
    remove = actions.add_parser("remove", help="remove a node from the cluster")
    remove.add_argument("--node-id", type=int, required=True)
    transfer = actions.add_parser("transfer", help="hand leadership to another voter")
    transfer.add_argument("--node-id", type=int, required=True)
    return cluster


def _status_table(results: dict[str, pb.GetClusterStatusResponse | KmsClientError]) -> str:
    header = ("NODE", "ENDPOINT", "ROLE", "TERM", "COMMIT", "APPLIED", "LEADER", "CONTACT")
    rows: list[tuple[str, ...]] = [header]
    lag_rows: list[tuple[str, ...]] = []
    for endpoint, result in results.items():
        if isinstance(result, KmsClientError):
            rows.append(("?", endpoint, f"unreachable ({result.name})", "", "", "", "", ""))
            continue
        contact = "-" if result.last_contact_ms < 0 else f"{result.last_contact_ms}ms"
        rows.append(
            (
                str(result.node_id),
                endpoint,
                _ROLE.get(result.role, "unknown") + ("" if result.replicated else " (single)"),
                str(result.term),
                str(result.commit_index),
                str(result.applied_index),
                str(result.leader_id),
                contact,
            )
        )
        if result.role == pb.NODE_ROLE_LEADER and result.replicated:
            lag_rows = [("MEMBER", "VOTER", "MATCH", "LAG", "ACTIVE", "PEER ADDRESS")]
            lag_rows += [
                (
                    str(m.node_id),
                    "yes" if m.voter else "learner",
                    str(m.match_index),
                    str(m.lag),
                    "yes" if m.recent_active else "no",
                    m.peer_address,
                )
                for m in result.members
            ]
    text = _table(rows)
    if lag_rows:
        text += "\n\nAs the leader sees its members:\n" + _table(lag_rows)
    return text


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def run(
    args: argparse.Namespace,
    endpoints: list[str],
    timeout: float,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    plaintext: bool = False,
) -> int:
    """Runs one `kmsctl cluster` action; returns the exit status."""
    with ClusterClient(
        endpoints, timeout=timeout, credentials=credentials, plaintext=plaintext
    ) as client:
        try:
            if args.cluster_command == "status":
                results = client.status()
                if args.json:
                    print(
                        "["
                        + ",\n".join(
                            json_format.MessageToJson(r, preserving_proto_field_name=True)
                            if not isinstance(r, KmsClientError)
                            else f'{{"endpoint": "{e}", "error": "{r.name}"}}'
                            for e, r in results.items()
                        )
                        + "]"
                    )
                else:
                    print(_status_table(results))
                return 0 if any(not isinstance(r, KmsClientError) for r in results.values()) else 1
            if args.cluster_command == "add":
                added = client.add_member(args.node_id, args.peer_address, args.client_address)
                print(f"node {args.node_id} added as a learner at index {added.commit_index}")
            elif args.cluster_command == "remove":
                removed = client.remove_member(args.node_id)
                print(f"node {args.node_id} removed at index {removed.commit_index}")
            else:
                client.transfer_leadership(args.node_id)
                print(f"node {args.node_id} is the leader")
        except KmsClientError as error:
            print(f"error: {error.name}: {error.message}", file=sys.stderr)
            return 1
    return 0
