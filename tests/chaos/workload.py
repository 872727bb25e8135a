"""Concurrent key-store clients for chaos runs, recording every operation for the checker.

`Workload` runs logical clients, one thread each, with at most one operation in flight
per client. Each client is either *direct* (a raw stub, one attempt, to a node picked at
random for every operation, so requests land on followers, leaders, dead, paused and
isolated nodes alike) or *failover* (a `KmsClient` over every node: it retries
UNAVAILABLE elsewhere with the same request_id and follows leader hints).

Operations and how they are recorded in the `HistoryRecorder` (docs/checking.md):

| RPC | recorded as | output |
|---|---|---|
| CreateKey | `create()` | the new key id |
| EnableKey, DisableKey | `enable(id)`, `disable(id)` | "ok" or the AWS exception |
| ScheduleKeyDeletion | `schedule_deletion(id)` | "ok" or the AWS exception |
| CancelKeyDeletion | `cancel_deletion(id)` | "ok" or the AWS exception |
| DescribeKey | `describe(id)` | "Enabled" / "Disabled" / "PendingDeletion" |
| Encrypt | `encrypt_allowed(id)` | "ok" or the AWS exception |

An answer the model predicts (KMSInvalidStateException, DisabledException,
NotFoundException) is an output. A ValidationException is a definite failure. Anything
else (UNAVAILABLE, DEADLINE_EXCEEDED, a reset connection, INTERNAL) is indeterminate:
it may have taken effect. Only ids from completed creates are ever named.
"""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cluster import CHANNEL_OPTIONS
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc
from kms.v1 import resources_pb2 as res

from kms_client import KmsClient, TlsFiles
from kms_client.errors import KmsClientError, from_rpc_error
from kmsd.checker import HistoryRecorder

# Answers the KeyStoreModel predicts: the operation happened (or was refused by the state
# machine, which is also an observation of the key's state).
MODEL_ANSWERS = frozenset({"KMSInvalidStateException", "DisabledException", "NotFoundException"})
# Answers that prove the request had no effect.
NO_EFFECT = frozenset({"ValidationException"})

KEY_STATES = {
    res.KEY_STATE_ENABLED: "Enabled",
    res.KEY_STATE_DISABLED: "Disabled",
    res.KEY_STATE_PENDING_DELETION: "PendingDeletion",
}

# (operation, weight); creates are added when there are few keys.
OP_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("create", 4),
    ("enable", 13),
    ("disable", 13),
    ("schedule_deletion", 6),
    ("cancel_deletion", 8),
    ("describe", 22),
    ("encrypt_allowed", 30),
)
WRITES = frozenset({"create", "enable", "disable", "schedule_deletion", "cancel_deletion"})


@dataclass(frozen=True)
class Outcome:
    """One finished operation, for availability accounting."""

    call: float
    ret: float
    client: int
    via: str  # "node-<id>" for direct clients, "failover"
    op: str
    result: str  # "ok" (answered), "fail" (no effect), "unknown" (indeterminate)
    detail: str
    key_id: str = ""
    history_call: int = 0  # the recorder's timestamp of the call
    answered_by: str = ""  # the endpoint of the (last) attempt

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class Workload:
    """Runs the clients until `stop()`; see the module docstring."""

    def __init__(
        self,
        endpoints: list[str],
        recorder: HistoryRecorder,
        *,
        tls: TlsFiles,
        seed: int,
        direct_clients: int = 4,
        failover_clients: int = 2,
        op_timeout_s: float = 3.0,
        hot_keys: int = 6,
        think_s: float = 0.01,
    ) -> None:
        self.endpoints = list(endpoints)
        self.recorder = recorder
        self.seed = seed
        self.op_timeout_s = op_timeout_s
        self.hot_keys = hot_keys
        self.think_s = think_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.keys: list[str] = []
        self.acked_creates: set[str] = set()
        self.unknown_creates = 0
        self.outcomes: list[Outcome] = []
        self.errors: list[BaseException] = []
        credentials = tls.credentials()
        self._channels = [
            grpc.secure_channel(e, credentials, options=CHANNEL_OPTIONS) for e in endpoints
        ]
        self._stubs = [pb_grpc.KeyManagementServiceStub(c) for c in self._channels]
        self._failover = [
            KmsClient(
                self.endpoints,
                tls=tls,
                timeout=op_timeout_s,
                max_attempts=4,
                initial_backoff=0.05,
                max_backoff=0.5,
                channel_options=CHANNEL_OPTIONS,
                rng=random.Random(seed * 1000 + 900 + i),
            )
            for i in range(failover_clients)
        ]
        self._solo = KmsClient(
            self.endpoints,
            tls=tls,
            timeout=op_timeout_s,
            max_attempts=4,
            initial_backoff=0.05,
            max_backoff=0.5,
            channel_options=CHANNEL_OPTIONS,
            rng=random.Random(seed * 1000 + 999),
        )
        self._direct_clients = direct_clients
        self._threads: list[threading.Thread] = []

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Workload:
        """Starts the client threads (again, after a `stop()`)."""
        assert not self._threads, "already running"
        self._stop.clear()
        direct = self._direct_clients
        self._threads = [
            threading.Thread(target=self._client, args=(i, None), name=f"chaos-client-{i}")
            for i in range(direct)
        ] + [
            threading.Thread(
                target=self._client, args=(direct + i, client), name=f"chaos-failover-{i}"
            )
            for i, client in enumerate(self._failover)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stops the clients: each finishes (or times out) its operation in flight."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.op_timeout_s * 6 + 10)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        self._threads = []
        if self.errors:
            raise AssertionError(f"a client thread crashed: {self.errors[0]!r}") from self.errors[0]

    def close(self) -> None:
        """Stops the clients and closes every channel."""
        self.stop()
        for client in [*self._failover, self._solo]:
            client.close()
        for channel in self._channels:
            channel.close()

    def one(
        self, op: str, key_id: str = "", *, node: int | None = None, client_id: int = 999
    ) -> Outcome:
        """One recorded operation, on node `node` (1-based) alone, or through failover.
        `client_id` must have no other operation in flight."""
        if node is None:
            return self._run(
                client_id, "failover", op, key_id, self._via_client(self._solo), self._solo
            )
        return self._run(
            client_id, f"node-{node}", op, key_id, self._via_stub(self._stubs[node - 1])
        )

    # -- accounting --------------------------------------------------------------------

    def counts(
        self,
        since: float = 0.0,
        until: float = float("inf"),
        *,
        ops: frozenset[str] | None = None,
        via: Callable[[str], bool] = lambda via: True,
    ) -> Counter[str]:
        """Results ("ok", "fail", "unknown") of the operations called in [since, until)."""
        with self._lock:
            return Counter(
                o.result
                for o in self.outcomes
                if since <= o.call < until and (ops is None or o.op in ops) and via(o.via)
            )

    def save_outcomes(self, path: Path) -> None:
        """Every finished operation with the node that answered it, as JSON lines."""
        with self._lock:
            outcomes = list(self.outcomes)
        with path.open("w") as out:
            for outcome in outcomes:
                out.write(json.dumps(outcome.to_json()) + "\n")

    def summary(self) -> str:
        with self._lock:
            by_op = Counter((o.op, o.result) for o in self.outcomes)
        ops = sorted({op for op, _ in by_op})
        return (
            ", ".join(
                f"{op} " + "/".join(f"{by_op[(op, r)]}" for r in ("ok", "fail", "unknown"))
                for op in ops
            )
            + f" (ok/fail/unknown); {len(self.acked_creates)} keys created"
        )

    # -- the clients -------------------------------------------------------------------

    def _client(self, client_id: int, failover: KmsClient | None) -> None:
        rng = random.Random(self.seed * 1000 + client_id)
        ops, weights = zip(*OP_WEIGHTS, strict=True)
        try:
            while not self._stop.is_set():
                with self._lock:
                    keys = list(self.keys)
                op = "create" if len(keys) < 3 else rng.choices(ops, weights)[0]
                key_id = ""
                if op != "create":
                    hot = keys[-self.hot_keys :]
                    key_id = rng.choice(hot if rng.random() < 0.85 else keys)
                if failover is not None:
                    self._run(
                        client_id, "failover", op, key_id, self._via_client(failover), failover
                    )
                else:
                    node = rng.randrange(len(self._stubs))
                    self._run(
                        client_id, f"node-{node + 1}", op, key_id, self._via_stub(self._stubs[node])
                    )
                if self.think_s:
                    time.sleep(rng.uniform(0, self.think_s))  # pacing, not a wait for state
        except BaseException as error:  # a bug in the test itself: make it loud
            self.errors.append(error)
            raise

    def _via_stub(self, stub: pb_grpc.KeyManagementServiceStub) -> Callable[[str, str], Any]:
        timeout = self.op_timeout_s

        def call(op: str, key_id: str) -> Any:
            rid = str(uuid.uuid4())
            try:
                if op == "create":
                    return stub.CreateKey(
                        pb.CreateKeyRequest(description="chaos", request_id=rid), timeout=timeout
                    ).key_metadata.key_id
                if op == "enable":
                    stub.EnableKey(
                        pb.EnableKeyRequest(key_id=key_id, request_id=rid), timeout=timeout
                    )
                elif op == "disable":
                    stub.DisableKey(
                        pb.DisableKeyRequest(key_id=key_id, request_id=rid), timeout=timeout
                    )
                elif op == "schedule_deletion":
                    stub.ScheduleKeyDeletion(
                        pb.ScheduleKeyDeletionRequest(
                            key_id=key_id, pending_window_in_days=7, request_id=rid
                        ),
                        timeout=timeout,
                    )
                elif op == "cancel_deletion":
                    stub.CancelKeyDeletion(
                        pb.CancelKeyDeletionRequest(key_id=key_id, request_id=rid), timeout=timeout
                    )
                elif op == "describe":
                    meta = stub.DescribeKey(
                        pb.DescribeKeyRequest(key_id=key_id), timeout=timeout
                    ).key_metadata
                    return KEY_STATES.get(meta.key_state, res.KeyState.Name(meta.key_state))
                elif op == "encrypt_allowed":
                    stub.Encrypt(
                        pb.EncryptRequest(key_id=key_id, plaintext=b"chaos"), timeout=timeout
                    )
                else:
                    raise ValueError(op)
                return "ok"
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None

        return call

    @staticmethod
    def _via_client(client: KmsClient) -> Callable[[str, str], Any]:
        def call(op: str, key_id: str) -> Any:
            if op == "create":
                return client.create_key(description="chaos").key_metadata.key_id
            if op == "enable":
                client.enable_key(key_id)
            elif op == "disable":
                client.disable_key(key_id)
            elif op == "schedule_deletion":
                client.schedule_key_deletion(key_id, pending_window_in_days=7)
            elif op == "cancel_deletion":
                client.cancel_key_deletion(key_id)
            elif op == "describe":
                state = client.describe_key(key_id).key_metadata.key_state
                return KEY_STATES.get(state, res.KeyState.Name(state))
            elif op == "encrypt_allowed":
                client.encrypt(key_id, b"chaos")
            else:
                raise ValueError(op)
            return "ok"

        return call

    def _run(
        self,
        client_id: int,
        via: str,
        op: str,
        key_id: str,
        call: Callable[[str, str], Any],
        client: KmsClient | None = None,
    ) -> Outcome:
        args = () if op == "create" else (key_id,)
        handle = self.recorder.invoke(client_id, op, args)
        started = time.monotonic()
        try:
            output = call(op, key_id)
        except KmsClientError as error:
            name = error.aws_exception
            if name in MODEL_ANSWERS and error.code != grpc.StatusCode.UNAVAILABLE:
                operation = self.recorder.complete(handle, name)
                result, detail = "ok", name
            elif name in NO_EFFECT:
                operation = self.recorder.fail(handle, name)
                result, detail = "fail", f"{name}: {error.message}"
            else:
                operation = self.recorder.fail_indeterminate(handle)
                result, detail = "unknown", f"{error.code.name}: {error.message}"
                if op == "create":
                    with self._lock:
                        self.unknown_creates += 1
        else:
            operation = self.recorder.complete(handle, output)
            result, detail = "ok", str(output)
            if op == "create":
                with self._lock:
                    self.keys.append(str(output))
                    self.acked_creates.add(str(output))
        # After a failover client's call, its current endpoint is the one it tried last
        # (it moves on only after an error it retries).
        answered_by = (
            client.current_endpoint
            if client is not None
            else self.endpoints[int(via.removeprefix("node-")) - 1]
        )
        outcome = Outcome(
            started,
            time.monotonic(),
            client_id,
            via,
            op,
            result,
            detail,
            key_id,
            operation.call,
            answered_by,
        )
        with self._lock:
            self.outcomes.append(outcome)
        return outcome
