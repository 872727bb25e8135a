"""End-to-end fuzzing: random requests to every KeyManagementService RPC of a real kmsd.

Requests are built generically from each request message's DESCRIPTOR (scalars, bytes,
enums with unknown values, maps, repeated and nested messages), drawing every field
either from known-good values (existing keys, aliases, ciphertexts with their
contexts, markers the server issued, ...) or from wild ones (garbage ids, odd Unicode,
empty and huge strings and bytes, out-of-range integers, unknown enum numbers,
tampered ciphertexts, foreign markers, reused request ids). A per-example mode makes
every field good (so calls succeed and move the state on), one or two fields wild,
a random half of them wild, or all of them wild.

Every call must either succeed or fail with a client-error gRPC code that carries a
google.rpc.ErrorInfo (domain "kmsd", non-empty reason and aws_exception); UNKNOWN,
INTERNAL, UNAVAILABLE or DEADLINE_EXCEEDED are server defects. Each defect is
minimized (fields cleared and values cut while the defect stays) and all of an RPC's
defects are reported together. Afterwards the server must still be healthy and
consistent: every key created is listed, ciphertexts made during the fuzz still
decrypt, the state after a restart is identical, and the log holds neither a
traceback nor any plaintext that was sent or generated.

Below the protobuf API, test_malformed_request_bytes sends every RPC bytes no protobuf
library would produce (invalid UTF-8 in each string field, corrupt framing, random
bytes): those must be client errors with an ErrorInfo too, never UNKNOWN.

Hypothesis runs EXAMPLES_PER_RPC examples for each of the 34 RPCs from fixed seeds
(printed; the same examples every run) without an example database. For a longer hunt
with other examples: KMSD_FUZZ_EXAMPLES=500 KMSD_FUZZ_SEED=1234 pytest -s <this file>
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from kmsd.api.server import MAX_MESSAGE_BYTES
from kmsd.auth.grants import SYMMETRIC_OPERATIONS, encode_token
from kmsd_process import KmsdProcess

pytestmark = pytest.mark.e2e

SERVICE = pb.DESCRIPTOR.services_by_name["KeyManagementService"]
RPCS = [method.name for method in SERVICE.methods]
# 34 RPCs x 24 = 816 fuzzed calls (plus minimizing): a few seconds.
EXAMPLES_PER_RPC = int(os.environ.get("KMSD_FUZZ_EXAMPLES", "24"))
# Each RPC's examples come from its own fixed seed (this plus a hash of its name), so
# runs repeat exactly and RPCs with look-alike requests still get different ones.
FUZZ_SEED = int(os.environ.get("KMSD_FUZZ_SEED", "20240601"))
CALL_TIMEOUT = 10.0
DOMAIN = "kmsd"

# The codes a client mistake may give. UNKNOWN, INTERNAL, UNAVAILABLE, DATA_LOSS and
# DEADLINE_EXCEEDED mean the server broke.
ALLOWED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_RPC,
    deadline=None,
    derandomize=False,  # explicit seeds instead, see FUZZ_SEED
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)

KEY_REF_FIELDS = {"key_id", "target_key_id", "source_key_id", "destination_key_id"}
CONTEXT_FIELDS = {
    "encryption_context",
    "source_encryption_context",
    "destination_encryption_context",
}
LISTINGS = {
    "ListKeys",
    "ListAliases",
    "ListKeyRotations",
    "ListResourceTags",
    "ListKeyPolicies",
    "ListGrants",
    "ListRetirableGrants",
}
# Grantees and retiring principals of the grants the fuzz creates (nobody calls as them).
PRINCIPALS = ["spiffe://kmsd.dev/fuzz/app-a", "spiffe://kmsd.dev/fuzz/app-b", "CN with spaces"]
# Every operation a symmetric key's grant may allow.
SYMMETRIC_GRANT_OPERATIONS = sorted(SYMMETRIC_OPERATIONS)


def good_policy(account: str, extra: str) -> str:
    """A key policy that keeps the fuzz's caller (an administrator: the account's root)
    in charge and lets a fuzz principal use the key."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                    "Action": "kms:*",
                    "Resource": "*",
                },
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": extra},
                    "Action": ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey*"],
                    "Resource": "*",
                    "Condition": {"StringLike": {"kms:EncryptionContext:tenant": "fuzz-*"}},
                },
            ],
        }
    )


@dataclass
class Grant:
    key_id: str
    grant_id: str
    token: str


ENABLED = res.KEY_STATE_ENABLED

# Strings that have broken parsers before: control characters, BOM, direction
# overrides, noncharacters, astral planes, case mappings that change lengths, format
# strings, injection attempts. (Lone surrogates and invalid UTF-8 cannot be put in a
# proto string; test_malformed_request_bytes sends them as raw bytes.)
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t\r\n",
    "\u0085\u2028\u2029",
    "\ufeff",
    "\u202eevil",
    "\ufffe\uffff",
    "\U0010ffff",
    "\U0001f600" * 3,
    "e\u0301\u0301\u0301",
    "İıßﬃǅ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "%s%n%x{0}${x}",
    "'; DROP TABLE keys; --",
    "../../../../etc/passwd",
    "\\",
    '"',
    "null",
    "-1",
    "0",
    "NaN",
    "alias",
    "alias/",
    "arn:",
    "key/",
]
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
LENGTHS = [1, 2, 15, 16, 64, 127, 128, 129, 256, 257, 1024, 1025, 2048, 2049, 8192, 8193]
HUGE_LENGTHS = [*LENGTHS, 65536, 300_000]
INT32_EDGES = [0, 1, -1, 2, 6, 7, 30, 31, 49, 50, 51, 89, 90, 99, 100, 101, 365, 999, 1000]
INT32_EDGES += [1001, 1024, 1025, 2560, 2561, 2**31 - 1, -(2**31)]
UINT64_EDGES = [0, 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
UNKNOWN_ENUMS = [999, -1, -(2**31), 2**31 - 1, 100]


@dataclass
class Ciphertext:
    blob: bytes
    context: dict[str, str]
    key_id: str
    plaintext: bytes | None


@dataclass(repr=False)
class World:
    """What the fuzz knows about the server: the pools good values are drawn from, what
    it created, and the secrets it must never find in the log."""

    stub: Any
    region: str
    account: str
    seed_keys: list[str]
    sentinel: str  # never shown to the fuzz; used after it
    keys: list[str] = field(default_factory=list)
    created: set[str] = field(default_factory=set)
    state: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias name -> key id
    deleted_aliases: list[str] = field(default_factory=list)
    ciphertexts: list[Ciphertext] = field(default_factory=list)
    # (marker, key_id), or (marker, retiring principal) for ListRetirableGrants
    markers: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    grants: list[Grant] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    tag_keys: list[str] = field(default_factory=lambda: ["env", "team"])
    secrets: list[bytes] = field(default_factory=list)
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    counter: Iterator[int] = field(default_factory=itertools.count)

    def __repr__(self) -> str:  # short, for Hypothesis's failure reports
        return f"World({len(self.keys)} keys, {len(self.aliases)} aliases)"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis's printer
        printer.text(repr(self))

    def arn(self, key_id: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:key/{key_id}"

    def alias_arn(self, alias: str) -> str:
        return f"arn:aws:kms:{self.region}:{self.account}:{alias}"

    def add_key(self, key_id: str, state: int = ENABLED) -> None:
        if key_id not in self.state:
            self.keys.append(key_id)
        self.state[key_id] = state

    def keys_in(self, *states: int) -> list[str]:
        return [k for k in self.keys if self.state.get(k) in states]

    def add_secret(self, value: bytes) -> None:
        # Low-entropy values (16 spaces, 16 zeros) could occur in any log by chance.
        if len(value) >= 16 and len(set(value)) >= 6 and len(self.secrets) < 500:
            self.secrets.append(bytes(value))


def _list_all(call: Callable[..., Any], items: str, limit: int, **request: Any) -> list[Any]:
    """Every item of a listing, following markers; checks that pages never repeat."""
    found: list[Any] = []
    marker = ""
    for _ in range(10_000):
        page = call(limit=limit, marker=marker, **request)
        found.extend(getattr(page, items))
        assert page.truncated == bool(page.next_marker)
        if not page.truncated:
            return found
        assert page.next_marker != marker, "a listing repeated its marker"
        marker = page.next_marker
    raise AssertionError("a listing never ended")


def _listing(stub: Any, rpc: str, request_type: type[Message]) -> Callable[..., Any]:
    method = getattr(stub, rpc)
    return lambda **fields: method(request_type(**fields), timeout=CALL_TIMEOUT)


@pytest.fixture(scope="module")
def world(kmsd: KmsdProcess) -> World:
    """Seed keys, aliases, tags, rotations, ciphertexts and markers for the fuzz."""
    stub = kmsd.stub()
    sentinel = stub.CreateKey(pb.CreateKeyRequest(description="sentinel")).key_metadata
    _, _, _, region, account, _ = sentinel.arn.split(":", 5)
    seeds = [
        stub.CreateKey(
            pb.CreateKeyRequest(
                description=f"fuzz seed {n}",
                tags=[
                    res.Tag(tag_key="env", tag_value="fuzz"),
                    res.Tag(tag_key="team", tag_value="kms"),
                ],
            )
        ).key_metadata.key_id
        for n in range(3)
    ]
    w = World(stub=stub, region=region, account=account, seed_keys=seeds, sentinel=sentinel.key_id)
    for key_id in seeds:
        w.add_key(key_id)
    for n, key_id in enumerate(seeds[:2]):
        stub.CreateAlias(
            pb.CreateAliasRequest(alias_name=f"alias/fuzz-seed-{n}", target_key_id=key_id)
        )
        w.aliases[f"alias/fuzz-seed-{n}"] = key_id
    stub.EnableKeyRotation(pb.EnableKeyRotationRequest(key_id=seeds[1]))
    for _ in range(2):
        stub.RotateKeyOnDemand(pb.RotateKeyOnDemandRequest(key_id=seeds[1]))
    for n, key_id in enumerate(seeds):
        plaintext = f"seed plaintext {n} {uuid.uuid4()}".encode()
        context = {"seed": str(n)} if n else {}
        blob = stub.Encrypt(
            pb.EncryptRequest(key_id=key_id, plaintext=plaintext, encryption_context=context)
        ).ciphertext_blob
        w.ciphertexts.append(Ciphertext(blob, context, key_id, plaintext))
        w.add_secret(plaintext)
    first_pages: list[tuple[str, Message, str]] = [
        ("ListKeys", pb.ListKeysRequest(limit=1), ""),
        ("ListAliases", pb.ListAliasesRequest(limit=1), ""),
        ("ListResourceTags", pb.ListResourceTagsRequest(key_id=seeds[0], limit=1), seeds[0]),
        (
            "ListKeyRotations",
            pb.ListKeyRotationsRequest(key_id=seeds[1], limit=1),
            seeds[1],
        ),
    ]
    for n in range(8):
        key_id = seeds[n % 2]
        made = stub.CreateGrant(
            pb.CreateGrantRequest(
                key_id=key_id,
                grantee_principal=PRINCIPALS[n % 2],
                retiring_principal=PRINCIPALS[0],
                operations=[res.GRANT_OPERATION_ENCRYPT, res.GRANT_OPERATION_RETIRE_GRANT],
            )
        )
        w.grants.append(Grant(key_id, made.grant_id, made.grant_token))
    first_pages += [
        ("ListGrants", pb.ListGrantsRequest(key_id=seeds[0], limit=1), seeds[0]),
        (
            "ListRetirableGrants",
            pb.ListRetirableGrantsRequest(retiring_principal=PRINCIPALS[0], limit=1),
            PRINCIPALS[0],
        ),
    ]
    for rpc, request, key_id in first_pages:
        marker = getattr(stub, rpc)(request).next_marker
        assert marker, f"{rpc} gave no marker for a one-item page"
        w.markers.setdefault(rpc, []).append((marker, key_id))
    return w


# ---------------------------------------------------------------------------------------
# Value generators. `data` is Hypothesis's DataObject; each generator draws from it.

UNSET = object()


def _pick(data: Any, values: list[Any], label: str = "") -> Any:
    """One of `values`. The pools grow as the fuzz goes, so the draw must not depend on
    their size (Hypothesis replays a choice sequence and insists that it draws the same
    way): draw an index from a fixed range and wrap it."""
    index = data.draw(st.integers(0, 1023), label=label or None)
    return values[index % len(values)]


def _chance(data: Any, percent: int) -> bool:
    return bool(data.draw(st.integers(0, 99)) < percent)


def _sized_text(data: Any, lengths: list[int]) -> str:
    unit = data.draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=4))
    size = _pick(data, lengths)
    return (unit * size)[:size]


def wild_text(data: Any) -> str:
    kind = data.draw(st.integers(0, 3))
    if kind == 0:
        return str(_pick(data, ODD_STRINGS))
    if kind == 1:
        return str(data.draw(TEXT))
    if kind == 2:
        return _sized_text(data, LENGTHS)
    return _sized_text(data, HUGE_LENGTHS)


def _random_bytes(data: Any, lengths: list[int]) -> bytes:
    size = _pick(data, lengths)
    return random.Random(data.draw(st.integers(0, 2**32))).randbytes(size)


def wild_bytes(data: Any) -> bytes:
    kind = data.draw(st.integers(0, 2))
    if kind == 0:
        return bytes(data.draw(st.binary(max_size=80)))
    if kind == 1:
        return _random_bytes(data, [0, 1, 16, 65, 66, 4096, 4097, 6144, 6145])
    return _random_bytes(data, [65536, 300_000])


def wild_int32(data: Any) -> int:
    if _chance(data, 60):
        return int(_pick(data, INT32_EDGES))
    return int(data.draw(st.integers(-(2**31), 2**31 - 1)))


def wild_uint64(data: Any) -> int:
    if _chance(data, 60):
        return int(_pick(data, UINT64_EDGES))
    return int(data.draw(st.integers(0, 2**64 - 1)))


def wild_enum(data: Any, enum: d.EnumDescriptor) -> int:
    return int(_pick(data, [v.number for v in enum.values] + UNKNOWN_ENUMS))


def wild_map(data: Any) -> dict[str, str]:
    kind = data.draw(st.integers(0, 3))
    if kind == 0:
        return dict(data.draw(st.dictionaries(TEXT, TEXT, max_size=6)))
    if kind == 1:
        return {wild_text(data): wild_text(data) for _ in range(data.draw(st.integers(0, 3)))}
    if kind == 2:
        count = _pick(data, [63, 64, 65, 300])
        return {f"k{n}": "v" for n in range(count)}
    return {"big": _sized_text(data, [4000, 8180, 8192, 9000, 60000])}


def wild_key_ref(data: Any, w: World) -> str:
    """A key reference that is almost right, too long, a wrong ARN, or odd text."""
    key_id = _pick(data, w.keys)
    wrong = str(_pick(data, [w.region, "eu-west-9", ""]))
    near_misses = [
        lambda: str(uuid.UUID(int=data.draw(st.integers(0, 2**128 - 1)), version=4)),
        lambda: key_id.upper(),
        lambda: "{" + key_id + "}",
        lambda: f" {key_id}",
        lambda: key_id.replace("-", ""),
        lambda: f"key/{key_id}",
        lambda: w.arn(key_id) + "x",
        lambda: _pick(data, [*w.deleted_aliases, "alias/never-existed"]),
        lambda: _pick(data, [*w.aliases, "alias/none"]) + "/",
        lambda: "alias/aws/ebs",
    ]
    # At and past the 2048-character limit, also in multi-byte characters (up to 8 KiB
    # of UTF-8): errors must stay well-formed however long the input was.
    long_ones = [
        lambda: str(_pick(data, ["a", "é", "€", "\U0010ffff", "\x00", "%"])) * 2048,
        lambda: "alias/" + str(_pick(data, ["a", "é", "€", "\U0001f600"])) * 2042,
        lambda: w.arn(key_id) + "/" + _sized_text(data, [1900, 2048, 2049]),
        lambda: _sized_text(data, [2048, 2049, 10_000]),
    ]
    wrong_arns = [
        lambda: f"arn:aws:kms:{wrong}:{w.account}:key/{key_id}",
        lambda: f"arn:aws:kms:{w.region}:000000000000:key/{key_id}",
        lambda: f"arn:aws-cn:kms:{w.region}:{w.account}:key/{key_id}",
        lambda: f"arn:aws:kms:{w.region}:{w.account}:{key_id}",
        lambda: f"arn:aws:kms:{w.region}:{w.account}:key/",
        lambda: f"arn:aws:kms:{w.region}:{w.account}:alias/",
        lambda: w.alias_arn(_pick(data, [*w.aliases, "alias/missing"])),
        lambda: "arn:aws:kms:::",
    ]
    odd = [lambda: wild_text(data)]
    kind = _pick(data, [near_misses, long_ones, wrong_arns, odd])
    return str(_pick(data, kind)())


def some_grant(data: Any, w: World) -> Grant:
    """A grant the fuzz created (one that no longer exists when every one is gone: the
    draw must not depend on the pool, see _pick)."""
    gone = Grant(w.seed_keys[0], "f" * 64, encode_token("f" * 64, 1))
    return _pick(data, w.grants or [gone])  # type: ignore[no-any-return]


def good_key_ref(data: Any, w: World, keys: list[str] | None = None, aliases: bool = True) -> str:
    pool = keys or w.keys
    key_id = _pick(data, pool)
    forms = [key_id, w.arn(key_id)]
    if aliases:
        forms += [a for a, target in w.aliases.items() if target == key_id]
        forms += [w.alias_arn(a) for a, target in w.aliases.items() if target == key_id]
    return str(_pick(data, forms))


def tamper(data: Any, w: World, blob: bytes) -> bytes:
    """`blob` damaged in one of several ways. Every kind draws the same way whatever the
    blob's length (see _pick); positions wrap around it."""
    raw = bytearray(blob)
    kind = data.draw(st.integers(0, 7))
    position = data.draw(st.integers(0, 2**16))
    other_key = uuid.UUID(_pick(data, [w.sentinel, *w.keys]))
    if kind == 0 and raw:  # flip one bit
        raw[position % len(raw)] ^= 1 << (position % 8)
    elif kind == 1:  # truncate
        raw = raw[: position % (len(raw) + 1)]
    elif kind == 2:  # append junk
        raw += random.Random(position).randbytes(1 + position % 64)
    elif kind == 3 and raw:  # another format version
        raw[0] = position % 256
    elif kind == 4 and len(raw) >= 21:  # another key material version
        version = [0, 2, 3, 100, 2**31, 2**32 - 1][position % 6]
        raw[17:21] = version.to_bytes(4, "big")
    elif kind == 5 and len(raw) >= 17:  # another (existing) key
        raw[1:17] = other_key.bytes
    elif kind == 6 and len(raw) >= 17:  # the nil key id
        raw[1:17] = bytes(16)
    elif kind == 7:  # repeated up to the size limits and beyond
        raw = raw * (2 + position % 200)
    return bytes(raw)


# ---------------------------------------------------------------------------------------
# Good and wild values for one field, by field name first and type second.


def good_value(data: Any, w: World, rpc: str, f: d.FieldDescriptor) -> Any:
    name = f.name
    if name in KEY_REF_FIELDS:
        if rpc == "ListAliases" and _chance(data, 40):
            return ""
        if rpc in ("CreateAlias", "UpdateAlias"):
            return good_key_ref(data, w, aliases=False)
        if rpc == "EnableKey":
            return good_key_ref(data, w, w.keys_in(res.KEY_STATE_DISABLED))
        if rpc == "CancelKeyDeletion":
            return good_key_ref(data, w, w.keys_in(res.KEY_STATE_PENDING_DELETION))
        if rpc in ("DisableKey", "ScheduleKeyDeletion"):
            # Good requests spend only keys the fuzz created; the seed keys stay usable.
            states = (ENABLED, res.KEY_STATE_DISABLED)
            expendable = [k for k in w.keys_in(*states) if k in w.created]
            return good_key_ref(data, w, expendable or [str(uuid.uuid4())], aliases=False)
        return good_key_ref(data, w, w.keys_in(ENABLED) or w.seed_keys)
    if name == "alias_name":
        if rpc == "CreateAlias" or not w.aliases:
            return f"alias/fuzz-{next(w.counter)}-{data.draw(st.integers(0, 1023))}"
        return _pick(data, list(w.aliases))
    if name == "plaintext":
        if _chance(data, 80):
            return bytes(data.draw(st.binary(min_size=1, max_size=200)))
        return _random_bytes(data, [1, 16, 1000, 4096])
    if name == "ciphertext_blob":
        return _pick(data, w.ciphertexts).blob
    if name in CONTEXT_FIELDS:
        keys = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12)
        return dict(data.draw(st.dictionaries(keys, TEXT, max_size=3)))
    if name == "marker":
        return _pick(data, ["", *(m for m, _ in w.markers.get(rpc, []))])
    if name == "limit":
        return int(data.draw(st.integers(0, 5)))
    if name == "request_id":
        return UNSET if _chance(data, 30) else str(uuid.uuid4())
    if name == "description":
        return str(data.draw(TEXT))
    if name == "pending_window_in_days":
        return int(_pick(data, [0, 7, 8, 29, 30]))
    if name == "rotation_period_in_days":
        return int(_pick(data, [0, 90, 91, 365, 2560]))
    if name == "number_of_bytes":
        return int(data.draw(st.integers(1, 1024)))
    if name == "tags":
        count = data.draw(st.integers(1, 3))
        tags = {
            str(_pick(data, [*w.tag_keys, f"fuzz-{n}"])): str(data.draw(TEXT)) for n in range(count)
        }
        return [res.Tag(tag_key=k, tag_value=v) for k, v in tags.items()]
    if name == "tag_keys":
        return [str(_pick(data, w.tag_keys)) for _ in range(data.draw(st.integers(1, 3)))]
    if name in ("encryption_algorithm", "source_encryption_algorithm"):
        return int(_pick(data, [0, res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT]))
    if name == "destination_encryption_algorithm":
        return int(_pick(data, [0, res.ENCRYPTION_ALGORITHM_SPEC_SYMMETRIC_DEFAULT]))
    if name == "key_spec" and rpc == "CreateKey":
        return int(_pick(data, [0, res.KEY_SPEC_SYMMETRIC_DEFAULT]))
    if name == "key_spec":
        return int(_pick(data, [res.DATA_KEY_SPEC_AES_256, res.DATA_KEY_SPEC_AES_128]))
    if name in ("key_usage", "origin"):
        return int(_pick(data, [0, 1]))
    if name == "include_key_material":
        return int(_pick(data, [0, 1, 2]))
    if name == "min_commit_index":
        return int(_pick(data, [0, 0, 1]))
    if name == "policy" and (rpc == "PutKeyPolicy" or _chance(data, 30)):
        return good_policy(w.account, str(_pick(data, PRINCIPALS)))
    if name == "policy_name":
        return str(_pick(data, ["", "default"]))
    if name == "grantee_principal" or (name == "retiring_principal" and rpc != "CreateGrant"):
        return str(_pick(data, PRINCIPALS))
    if name == "retiring_principal":
        return UNSET if _chance(data, 50) else str(_pick(data, PRINCIPALS))
    if name == "operations":
        count = data.draw(st.integers(1, 4))
        return list(dict.fromkeys(_pick(data, SYMMETRIC_GRANT_OPERATIONS) for _ in range(count)))
    if name == "constraints":
        if _chance(data, 60):
            return UNSET
        pairs = {"tenant": f"fuzz-{data.draw(st.integers(0, 3))}"}
        if _chance(data, 50):
            return res.GrantConstraints(encryption_context_equals=pairs)
        return res.GrantConstraints(encryption_context_subset=pairs)
    if name == "name":
        return UNSET if _chance(data, 50) else f"fuzz-grant-{data.draw(st.integers(0, 3))}"
    if name == "grant_id":
        return some_grant(data, w).grant_id
    if name == "grant_token":
        return some_grant(data, w).token
    if name == "grant_tokens" and _chance(data, 30):
        return [some_grant(data, w).token]
    # Everything else (dry runs, recipients, custom key stores, multi-Region, deprecated
    # synonyms) is left unset in a good request.
    return UNSET


def wild_value(data: Any, w: World, rpc: str, f: d.FieldDescriptor, depth: int) -> Any:
    name = f.name
    is_map = f.type == f.TYPE_MESSAGE and f.message_type.GetOptions().map_entry
    if name in KEY_REF_FIELDS:
        return wild_key_ref(data, w)
    if name == "alias_name":
        choices: list[Callable[[], str]] = [
            lambda: _pick(data, [*w.aliases, *w.deleted_aliases, "alias/aws/x", "alias/aws"]),
            lambda: "alias/" + wild_text(data),
            lambda: "alias/" + _sized_text(data, [249, 250, 251, 1000]),
            lambda: "ALIAS/x",
            lambda: "alias/a b",
            lambda: w.alias_arn(_pick(data, [*w.aliases, "alias/fuzz-seed-0"])),
            lambda: wild_text(data),
        ]
        return _pick(data, choices)()
    if name == "ciphertext_blob":
        source = _pick(data, w.ciphertexts).blob
        return tamper(data, w, source) if _chance(data, 70) else wild_bytes(data)
    if name == "marker":
        own = [m for m, _ in w.markers.get(rpc, [])]
        foreign = [m for r, ms in w.markers.items() if r != rpc for m, _ in ms]
        crafted = [
            base64.urlsafe_b64encode(raw).decode()
            for raw in (
                b"m1\x00keys\x00",
                b"m1\x00keys\x00\xff\xfe",
                b"m2\x00keys\x00zzzz",
                b"m1\x00aliases/\x00alias/zzz",
                b"m1\x00tags/" + str(_pick(data, w.keys)).encode() + b"\x00~~~",
                b"m1\x00rotations/x\x00" + b"9" * 10,
                b"m1\x00keys",
                b"m1\x00keys\x00a\x00b",
                b"",
            )
        ]
        return _pick(data, [*own, *foreign, *crafted, "!!!!", "====", wild_text(data)])
    if name == "request_id":
        reused = _pick(data, [*w.request_ids, ""])  # by this RPC or by another
        fresh = wild_text(data)
        return reused if _chance(data, 50) and reused else fresh
    if name == "tags":
        count = _pick(data, [0, 1, 2, 3, 50, 51, 60])
        base = [*w.tag_keys, "aws:x", "AWS:x", "", "k" * 129, " ", "\x00"]
        keys = [
            str(_pick(data, base)) if _chance(data, 50) else wild_text(data)
            for _ in range(min(count, 4))
        ]
        keys += [f"bulk-{n}" for n in range(count - len(keys))]
        values = [str(_pick(data, ["", "v" * 256, "v" * 257])) for _ in keys]
        if _chance(data, 30):
            values = [wild_text(data) for _ in keys]
        return [res.Tag(tag_key=k, tag_value=v) for k, v in zip(keys, values, strict=True)]
    if is_map:
        return wild_map(data)
    if f.type == f.TYPE_MESSAGE:
        if depth >= 2:
            return UNSET
        return build(data, w, rpc, f.message_type, None, depth + 1)
    if f.is_repeated:
        count = _pick(data, [0, 1, 2, 10, 11, 50])
        return [scalar_wild(data, f) for _ in range(count)]
    return scalar_wild(data, f)


def scalar_wild(data: Any, f: d.FieldDescriptor) -> Any:
    if f.type == f.TYPE_STRING:
        return wild_text(data)
    if f.type == f.TYPE_BYTES:
        return wild_bytes(data)
    if f.type == f.TYPE_BOOL:
        return bool(data.draw(st.booleans()))
    if f.type == f.TYPE_ENUM:
        return wild_enum(data, f.enum_type)
    if f.type in (f.TYPE_INT32, f.TYPE_SINT32, f.TYPE_SFIXED32):
        return wild_int32(data)
    if f.type in (f.TYPE_UINT64, f.TYPE_FIXED64):
        return wild_uint64(data)
    if f.type in (f.TYPE_INT64, f.TYPE_SINT64, f.TYPE_SFIXED64):
        return int(data.draw(st.integers(-(2**63), 2**63 - 1)))
    if f.type in (f.TYPE_UINT32, f.TYPE_FIXED32):
        return int(data.draw(st.integers(0, 2**32 - 1)))
    raise AssertionError(f"no wild value for field {f.full_name} of type {f.type}")


def assign(message: Message, f: d.FieldDescriptor, value: Any) -> None:
    """Sets any kind of field: scalar, enum, message, map, repeated."""
    target = getattr(message, f.name)
    if f.type == f.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
        target.update(value)
    elif f.is_repeated:
        if f.type == f.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif f.type == f.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, f.name, value)


def field_modes(data: Any, descriptor: d.Descriptor, mode: str) -> dict[str, str]:
    """Which fields of a request get good values and which wild ones."""
    names = [f.name for f in descriptor.fields]
    if mode in ("good", "wild"):
        return dict.fromkeys(names, mode)
    if mode == "one-wild":
        chosen = {_pick(data, names) for _ in range(data.draw(st.integers(1, 2)))}
        return {n: "wild" if n in chosen else "good" for n in names}
    return {n: _pick(data, ["good", "wild"]) for n in names}


def build(
    data: Any,
    w: World,
    rpc: str,
    descriptor: d.Descriptor,
    modes: dict[str, str] | None = None,
    depth: int = 0,
) -> Message:
    """A message of `descriptor` with each field drawn as `modes` says (all wild if None)."""
    message: Message = _message_class(descriptor)()
    for f in descriptor.fields:
        if modes is not None and modes[f.name] == "good":
            value = good_value(data, w, rpc, f)
        elif _chance(data, 25):
            value = UNSET  # leaving a field out is wild too
        else:
            value = wild_value(data, w, rpc, f, depth)
        if value is not UNSET:
            assign(message, f, value)
    return message


def _message_class(descriptor: d.Descriptor) -> type[Message]:
    module = pb if descriptor.file.name.endswith("kms_service.proto") else res
    cls: type[Message] = getattr(module, descriptor.name)
    return cls


def make_good(data: Any, w: World, rpc: str, request: Any, modes: dict[str, str]) -> None:
    """Couples the good fields of a request that must agree with one another."""
    good = {name for name, mode in modes.items() if mode == "good"}
    if rpc in ("Decrypt", "ReEncrypt"):
        record: Ciphertext = _pick(data, w.ciphertexts)
        named = _pick(data, ["", record.key_id, w.arn(record.key_id)])
        context_field = "encryption_context" if rpc == "Decrypt" else "source_encryption_context"
        key_field = "key_id" if rpc == "Decrypt" else "source_key_id"
        if "ciphertext_blob" in good:
            request.ciphertext_blob = record.blob
        if context_field in good:
            getattr(request, context_field).clear()
            getattr(request, context_field).update(record.context)
        if key_field in good:
            setattr(request, key_field, named)
    elif rpc in ("GenerateDataKey", "GenerateDataKeyWithoutPlaintext"):
        by_spec = _chance(data, 70)
        if {"key_spec", "number_of_bytes"} <= good:
            request.ClearField("number_of_bytes" if by_spec else "key_spec")
    elif rpc in ("RetireGrant", "RevokeGrant", "ListGrants"):
        # A grant is named by its key and id (or, for RetireGrant, by its token alone).
        grant = some_grant(data, w)
        if rpc == "RetireGrant" and "grant_token" in good and _chance(data, 50):
            request.grant_token = grant.token
            request.ClearField("key_id")
            request.ClearField("grant_id")
        elif rpc == "ListGrants" and _chance(data, 60):
            request.ClearField("grant_id")
            request.ClearField("grantee_principal")
        else:
            if rpc == "RetireGrant":
                request.ClearField("grant_token")
            if "key_id" in good:
                request.key_id = grant.key_id
            if "grant_id" in good:
                request.grant_id = grant.grant_id
        if rpc == "ListGrants" and {"marker", "key_id"} <= good and request.marker:
            request.key_id = next(k for m, k in w.markers[rpc] if m == request.marker)
            request.ClearField("grant_id")
            request.ClearField("grantee_principal")
    elif rpc == "ListRetirableGrants" and {"marker", "retiring_principal"} <= good:
        if request.marker:
            request.retiring_principal = next(k for m, k in w.markers[rpc] if m == request.marker)
    elif rpc in LISTINGS - {"ListKeys"} and {"marker", "key_id"} <= good and request.marker:
        # A marker is bound to its listing, which for these includes the key.
        request.key_id = next(k for m, k in w.markers[rpc] if m == request.marker)


# ---------------------------------------------------------------------------------------
# One call and what it teaches the World.


def _short(value: Any) -> str:
    """A value for a report: long strings and bytes cut, with their sizes."""
    if isinstance(value, Message):
        return "{" + _describe(value) + "}"
    if isinstance(value, str | bytes) and len(value) > 40:
        size = f"{len(value)} bytes"
        if isinstance(value, str):
            size = f"{len(value)} characters, {len(value.encode())} UTF-8 bytes"
        return f"{value[:16]!r}... ({size})"
    if isinstance(value, str | bytes | int | float | bool):
        return repr(value)
    if hasattr(value, "items"):
        shown = [f"{_short(k)}: {_short(v)}" for k, v in list(value.items())[:4]]
        more = f", ... ({len(value)} entries)" if len(value) > 4 else ""
        return "{" + ", ".join(shown) + more + "}"
    items = list(value)
    more = f", ... ({len(items)} items)" if len(items) > 4 else ""
    return "[" + ", ".join(_short(v) for v in items[:4]) + more + "]"


def _describe(request: Message) -> str:
    return ", ".join(f"{f.name}={_short(v)}" for f, v in request.ListFields())


def classify(size: int, error: grpc.RpcError) -> tuple[str, str | None]:
    """The outcome of a failed call (its aws_exception) and what is wrong with it, if
    anything: a code no client mistake should give, or missing or bad error details."""
    call: Any = error
    code = call.code()
    said = f"{code.name} {call.details()!r}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and size > MAX_MESSAGE_BYTES:
        return "(message too large for gRPC)", None  # refused by gRPC before kmsd sees it
    if code not in ALLOWED_CODES:
        return code.name, said
    try:
        status = rpc_status.from_call(call)
    except ValueError as bad:
        return code.name, f"{said} with an inconsistent grpc-status-details-bin: {bad}"
    if status is None:
        return code.name, f"{said} without google.rpc.Status details"
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    if len(infos) != 1:
        return code.name, f"{said} with {len(infos)} ErrorInfo details, not 1"
    info = infos[0]
    aws_exception = info.metadata["aws_exception"]
    if info.domain != DOMAIN or not info.reason or not aws_exception:
        return code.name, f"{said} with a bad ErrorInfo: {info}"
    return aws_exception, None


def learn(w: World, rpc: str, request: Any, response: Any) -> None:
    """Feeds what a successful call returned back into the pools."""
    if getattr(request, "request_id", ""):
        w.request_ids.append(request.request_id)
    if rpc == "CreateKey":
        key_id = response.key_metadata.key_id
        w.created.add(key_id)
        w.add_key(key_id, response.key_metadata.key_state)
    elif rpc in ("EnableKey", "DisableKey", "ScheduleKeyDeletion", "CancelKeyDeletion"):
        meta = w.stub.DescribeKey(pb.DescribeKeyRequest(key_id=request.key_id)).key_metadata
        state = meta.key_state
        if meta.key_id in w.seed_keys and state != ENABLED:
            # A wild request hit a seed key: put it back so good requests keep working.
            if state == res.KEY_STATE_PENDING_DELETION:
                w.stub.CancelKeyDeletion(pb.CancelKeyDeletionRequest(key_id=meta.key_id))
            w.stub.EnableKey(pb.EnableKeyRequest(key_id=meta.key_id))
            state = ENABLED
        w.add_key(meta.key_id, state)
    elif rpc == "CreateAlias" or rpc == "UpdateAlias":
        target = w.stub.DescribeKey(pb.DescribeKeyRequest(key_id=request.alias_name))
        w.aliases[request.alias_name] = target.key_metadata.key_id
    elif rpc == "DeleteAlias":
        w.aliases.pop(request.alias_name, None)
        w.deleted_aliases.append(request.alias_name)
    elif rpc == "Encrypt":
        key_id = response.key_id.rpartition("/")[2]
        context = dict(request.encryption_context)
        w.ciphertexts.append(
            Ciphertext(response.ciphertext_blob, context, key_id, request.plaintext)
        )
    elif rpc in ("GenerateDataKey", "GenerateDataKeyWithoutPlaintext"):
        key_id = response.key_id.rpartition("/")[2]
        plaintext = response.plaintext if rpc == "GenerateDataKey" else None
        context = dict(request.encryption_context)
        w.ciphertexts.append(Ciphertext(response.ciphertext_blob, context, key_id, plaintext))
        if plaintext:
            w.add_secret(plaintext)
    elif rpc == "ReEncrypt":
        key_id = response.key_id.rpartition("/")[2]
        source = next((c for c in w.ciphertexts if c.blob == request.ciphertext_blob), None)
        context = dict(request.destination_encryption_context)
        plaintext = source.plaintext if source else None
        w.ciphertexts.append(Ciphertext(response.ciphertext_blob, context, key_id, plaintext))
    elif rpc in ("Decrypt", "GenerateRandom"):
        w.add_secret(response.plaintext)
    elif rpc == "TagResource":
        w.tag_keys.extend(t.tag_key for t in request.tags if t.tag_key not in w.tag_keys)
    elif rpc == "CreateGrant":
        key_id = w.stub.DescribeKey(pb.DescribeKeyRequest(key_id=request.key_id)).key_metadata
        w.grants.append(Grant(key_id.key_id, response.grant_id, response.grant_token))
    elif rpc in ("RetireGrant", "RevokeGrant"):
        gone = request.grant_id or next(
            (g.grant_id for g in w.grants if g.token == request.grant_token), ""
        )
        w.grants = [g for g in w.grants if g.grant_id != gone]
        while len(w.grants) < 4:  # keep grants to retire and revoke
            key_id = w.seed_keys[len(w.grants) % 2]
            made = w.stub.CreateGrant(
                pb.CreateGrantRequest(
                    key_id=key_id,
                    grantee_principal=PRINCIPALS[1],
                    retiring_principal=PRINCIPALS[0],
                    operations=[res.GRANT_OPERATION_DECRYPT],
                )
            )
            w.grants.append(Grant(key_id, made.grant_id, made.grant_token))
    elif rpc == "ListRetirableGrants" and response.next_marker:
        w.markers.setdefault(rpc, []).append((response.next_marker, request.retiring_principal))
    elif rpc in LISTINGS and response.next_marker and not getattr(request, "grant_id", ""):
        if getattr(request, "grantee_principal", ""):
            return  # a marker of a filtered listing: not reused
        w.markers.setdefault(rpc, []).append((response.next_marker, getattr(request, "key_id", "")))


def call(w: World, rpc: str, request: Message) -> str | None:
    """Sends `request`; learns from a success; returns the defect the call showed, if any."""
    outcomes = w.outcomes.setdefault(rpc, Counter())
    try:
        response = getattr(w.stub, rpc)(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        outcome, defect = classify(request.ByteSize(), error)
        outcomes[outcome] += 1
        return defect
    outcomes["OK"] += 1
    learn(w, rpc, request, response)
    return None


def minimize(w: World, rpc: str, request: Message, defect: str) -> Message:
    """A smaller request showing the same defect: fields cleared, lists cut to one item,
    strings and bytes cut to 16, one at a time, for as long as the defect stays."""
    best = request
    for f, _ in request.ListFields():
        trial = type(best)()
        trial.CopyFrom(best)
        trial.ClearField(f.name)
        if call(w, rpc, trial) == defect:
            best = trial
    for f, value in best.ListFields():
        trial = type(best)()
        trial.CopyFrom(best)
        is_map = f.type == f.TYPE_MESSAGE and f.message_type.GetOptions().map_entry
        if is_map and len(value) > 1:
            first = next(iter(value))
            trial.ClearField(f.name)
            getattr(trial, f.name)[first] = value[first]
        elif f.is_repeated and len(value) > 1:
            del getattr(trial, f.name)[1:]
        elif f.type in (f.TYPE_STRING, f.TYPE_BYTES) and len(value) > 16:
            setattr(trial, f.name, value[:16])
        else:
            continue
        if call(w, rpc, trial) == defect:
            best = trial
    return best


# good: every field good, so most calls succeed and move the state on; one-wild: one or
# two wild fields in an otherwise good request, to get past the first validation.
MODES = ["good"] * 3 + ["one-wild"] * 4 + ["mixed"] * 2 + ["wild"]
MAX_MINIMIZED = 6  # per RPC, to bound the time a badly broken RPC takes


@pytest.mark.parametrize("rpc", RPCS)
def test_fuzz_rpc(world: World, rpc: str) -> None:
    """EXAMPLES_PER_RPC random requests; every defect found is minimized and reported."""
    w = world
    descriptor = SERVICE.methods_by_name[rpc].input_type
    defects: dict[tuple[str, str], int] = Counter()

    @FUZZ_SETTINGS
    @given(data=st.data())
    def fuzz(data: Any) -> None:
        mode = _pick(data, MODES, label="mode")
        modes = field_modes(data, descriptor, mode)
        request: Any = build(data, w, rpc, descriptor, modes)
        if mode != "wild":
            make_good(data, w, rpc, request, modes)
        if rpc == "Encrypt":
            w.add_secret(request.plaintext)
        defect = call(w, rpc, request)
        if defect is None:
            return
        if len(defects) < MAX_MINIMIZED:
            request = minimize(w, rpc, request, defect)
        defects[(defect, f"{rpc}({_describe(request)})")] += 1

    rpc_seed = FUZZ_SEED + zlib.crc32(rpc.encode())
    print(f"{rpc}: Hypothesis seed {rpc_seed} (KMSD_FUZZ_SEED={FUZZ_SEED})")
    seed(rpc_seed)(fuzz)()
    if defects:
        pytest.fail(
            f"{rpc} (seed {rpc_seed}): server defects:"
            + "".join(
                f"\n  {request}\n    -> {defect[:600]}  [x{count}]"
                for (defect, request), count in defects.items()
            ),
            pytrace=False,
        )


# ---------------------------------------------------------------------------------------
# Below the protobuf API: request bytes no protobuf library would serialize, such as
# invalid UTF-8 in a string field, which other languages' clients can send.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def wire_cases(descriptor: d.Descriptor, depth: int = 0) -> list[tuple[str, bytes]]:
    """Malformed encodings of a request, from its DESCRIPTOR: bad UTF-8 in every string
    field, also inside map entries and nested messages, and corrupt framing."""
    cases = []
    for f in descriptor.fields:
        if f.type == f.TYPE_STRING:
            cases.append((f"{f.name}: invalid UTF-8", _length_delimited(f.number, b"ok\xff\xfe")))
            surrogate = b"\xed\xa0\x80"  # U+D800 encoded as if it were a character
            cases.append((f"{f.name}: encoded surrogate", _length_delimited(f.number, surrogate)))
        elif f.type == f.TYPE_MESSAGE and depth == 0:
            for label, inner in wire_cases(f.message_type, depth + 1):
                if "UTF-8" in label or "surrogate" in label:
                    cases.append((f"{f.name}.{label}", _length_delimited(f.number, inner)))
    if depth == 0:
        cases += [
            ("truncated varint", b"\x08\xff"),
            ("length beyond the end", b"\x0a\x7fab"),
            ("field number 0", b"\x00\x01"),
            ("end-group without start-group", b"\x0c"),
            ("unknown fields only", _varint(999 << 3) + b"\x01" + _length_delimited(5000, b"x")),
        ]
    return cases


def test_malformed_request_bytes(kmsd: KmsdProcess, world: World) -> None:
    """Undecodable requests to every RPC are client errors (INVALID_ARGUMENT with an
    ErrorInfo), never UNKNOWN; a few random byte strings per RPC too."""
    channel = kmsd.channel()
    # defect (with the message type's name taken out) -> RPC -> what was sent
    defects: dict[str, dict[str, list[str]]] = {}

    def send(rpc: str, label: str, raw: bytes) -> None:
        method = channel.unary_unary(f"/{SERVICE.full_name}/{rpc}")  # bytes in, bytes out
        outcomes = world.outcomes.setdefault(rpc, Counter())
        try:
            reply = method(raw, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            outcome, defect = classify(len(raw), error)
            outcomes[outcome] += 1
            if defect is not None:
                kind = defect.replace(f"{SERVICE.methods_by_name[rpc].input_type.full_name}", "*")
                defects.setdefault(kind[:300], {}).setdefault(rpc, []).append(label)
            return
        outcomes["OK"] += 1
        if rpc == "CreateKey":  # a key the checks after the fuzz must expect
            key_id = pb.CreateKeyResponse.FromString(reply).key_metadata.key_id
            world.created.add(key_id)
            world.add_key(key_id)

    def random_bytes(rpc: str) -> Callable[[], None]:
        @seed(FUZZ_SEED + zlib.crc32(rpc.encode()) + 1)
        @settings(FUZZ_SETTINGS, max_examples=4)
        @given(raw=st.binary(min_size=1, max_size=64))
        def run(raw: bytes) -> None:
            send(rpc, f"random bytes {raw[:12]!r}", raw)

        return run

    try:
        for rpc in RPCS:
            for label, raw in wire_cases(SERVICE.methods_by_name[rpc].input_type):
                send(rpc, label, raw)
            random_bytes(rpc)()
    finally:
        channel.close()
    if defects:
        report = []
        for defect, by_rpc in defects.items():
            report.append(f"  {defect}\n    in {len(by_rpc)} RPCs: {', '.join(by_rpc)}")
            rpc, sent = next(iter(by_rpc.items()))
            report.append(f"    e.g. {rpc} <- {'; '.join(sent[:8])}")
        pytest.fail("server defects:\n" + "\n".join(report), pytrace=False)


# ---------------------------------------------------------------------------------------
# After the fuzz: the server is up, consistent, and survives a restart unchanged.


def test_fuzz_reached_every_rpc(world: World) -> None:
    """Guards the fuzzer itself: every RPC was called and succeeded at least once."""
    summary = {rpc: dict(world.outcomes.get(rpc, {})) for rpc in RPCS}
    print("fuzz outcomes per RPC:", summary)
    never_ok = [rpc for rpc in RPCS if not world.outcomes.get(rpc, Counter())["OK"]]
    assert not never_ok, f"RPCs that never succeeded: {never_ok}; outcomes: {summary}"
    assert world.created, "the fuzz created no key"


def test_server_healthy_after_fuzz(kmsd: KmsdProcess) -> None:
    assert kmsd.proc is not None and kmsd.proc.poll() is None, "kmsd exited during the fuzz"
    channel = kmsd.channel()
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE.full_name):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    finally:
        channel.close()


def _all_keys(stub: Any) -> list[str]:
    entries = _list_all(_listing(stub, "ListKeys", pb.ListKeysRequest), "keys", 7)
    ids = [entry.key_id for entry in entries]
    assert len(ids) == len(set(ids)), "ListKeys returned a key twice"
    return ids


def test_list_keys_has_every_created_key(kmsd: KmsdProcess, world: World) -> None:
    listed = set(_all_keys(kmsd.stub()))
    missing = world.created - listed
    assert not missing, f"keys CreateKey returned but ListKeys does not list: {missing}"
    expected = world.created | set(world.seed_keys) | {world.sentinel}
    assert listed == expected, f"unexpected keys listed: {listed - expected}"


def test_round_trips_after_fuzz(kmsd: KmsdProcess, world: World) -> None:
    stub = kmsd.stub()
    for key_id in (world.sentinel, stub.CreateKey(pb.CreateKeyRequest()).key_metadata.key_id):
        blob = stub.Encrypt(
            pb.EncryptRequest(
                key_id=key_id, plaintext=b"after the fuzz", encryption_context={"a": "b"}
            )
        ).ciphertext_blob
        back = stub.Decrypt(pb.DecryptRequest(ciphertext_blob=blob, encryption_context={"a": "b"}))
        assert back.plaintext == b"after the fuzz"
        assert back.key_id == world.arn(key_id)
        if key_id != world.sentinel:
            world.created.add(key_id)
    # Every ciphertext the fuzz made under a key that is still enabled still decrypts.
    checked = 0
    for record in world.ciphertexts:
        state = stub.DescribeKey(pb.DescribeKeyRequest(key_id=record.key_id)).key_metadata.key_state
        if state != ENABLED:
            continue
        out = stub.Decrypt(
            pb.DecryptRequest(ciphertext_blob=record.blob, encryption_context=record.context)
        )
        assert out.key_id == world.arn(record.key_id)
        if record.plaintext is not None:
            assert out.plaintext == record.plaintext
        checked += 1
    assert checked > 0


def _snapshot(stub: Any) -> dict[str, Any]:
    """Everything the API shows about the server's state."""
    snapshot: dict[str, Any] = {}
    for key_id in sorted(_all_keys(stub)):
        meta = stub.DescribeKey(pb.DescribeKeyRequest(key_id=key_id), timeout=CALL_TIMEOUT)
        tags = _list_all(
            _listing(stub, "ListResourceTags", pb.ListResourceTagsRequest), "tags", 3, key_id=key_id
        )
        rotations = _list_all(
            _listing(stub, "ListKeyRotations", pb.ListKeyRotationsRequest),
            "rotations",
            2,
            key_id=key_id,
            include_key_material=pb.INCLUDE_KEY_MATERIAL_ALL_KEY_MATERIAL,
        )
        status = stub.GetKeyRotationStatus(pb.GetKeyRotationStatusRequest(key_id=key_id))
        snapshot[key_id] = (
            meta.key_metadata.SerializeToString(deterministic=True),
            [t.SerializeToString(deterministic=True) for t in tags],
            [r.SerializeToString(deterministic=True) for r in rotations],
            status.SerializeToString(deterministic=True),
        )
    aliases = _list_all(_listing(stub, "ListAliases", pb.ListAliasesRequest), "aliases", 5)
    snapshot["aliases"] = [a.SerializeToString(deterministic=True) for a in aliases]
    return snapshot


def test_restart_rebuilds_identical_state(kmsd: KmsdProcess, world: World) -> None:
    blob = (
        kmsd.stub()
        .Encrypt(pb.EncryptRequest(key_id=world.sentinel, plaintext=b"across a restart"))
        .ciphertext_blob
    )
    before = _snapshot(kmsd.stub())
    assert kmsd.stop() == 0, "kmsd did not exit cleanly on SIGTERM"
    kmsd.restart()
    after = _snapshot(kmsd.stub())
    assert set(after) == set(before), "the set of keys changed across the restart"
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"state that differs after the restart: {changed}"
    out = kmsd.stub().Decrypt(pb.DecryptRequest(ciphertext_blob=blob))
    assert out.plaintext == b"across a restart"


def _encodings(secret: bytes) -> list[bytes]:
    return [
        secret,
        secret.hex().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
        repr(secret)[2:-1].encode(),
    ]


def test_log_has_no_plaintext_and_no_traceback(kmsd: KmsdProcess, world: World) -> None:
    log = kmsd.log_path.read_bytes()
    assert log, "kmsd wrote no log at all"
    assert len(world.secrets) >= 10, "too few plaintexts tracked to mean anything"
    problems = []
    # Searching the whole log is stricter than line by line: it also finds a value
    # split across lines.
    leaked = [s[:24] for s in world.secrets if any(form in log for form in _encodings(s))]
    if leaked:
        problems.append(f"{len(leaked)} plaintexts appear in the log: {leaked[:5]}")
    lines = log.decode(errors="replace").splitlines()
    tracebacks = [n for n, line in enumerate(lines) if "Traceback" in line]
    if tracebacks:
        # The log line before each traceback says what failed; count them by kind.
        kinds = Counter(lines[n - 1].split(" ", 2)[-1][:160] for n in tracebacks if n)
        problems.append(
            f"{len(tracebacks)} tracebacks in the log, after:\n"
            + "\n".join(f"  {count} x {kind}" for kind, count in kinds.most_common(30))
            + "\nthe first:\n"
            + "\n".join(lines[max(0, tracebacks[0] - 1) : tracebacks[0] + 20])
        )
    if problems:
        pytest.fail(f"{kmsd.log_path}:\n" + "\n".join(problems), pytrace=False)
