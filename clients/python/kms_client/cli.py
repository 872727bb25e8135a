"""kmsctl: one subcommand per kms.v1 RPC, in kebab-case (create-key, encrypt, list-aliases...).

This module owns the command line: parsing arguments into `KmsClient` calls,
reading plaintext and ciphertext inputs, and printing responses either as
aligned ``Key: value`` lines (AWS names for enums, ISO-8601 times, base64 for
bytes) or, with ``--json``, as the response proto in JSON. Exit status: 0 on
success, 1 when the call (or local I/O) fails, 2 for usage errors.

Examples:

    kmsctl create-key --description payments --tag team=billing
    kmsctl --endpoint 10.0.0.1:7400 --endpoint 10.0.0.2:7400 list-keys --all
    kmsctl --ca ca.crt --cert alice.crt --key alice.key list-keys   # or KMSD_CA/CERT/KEY
    kmsctl encrypt --key-id alias/payments --plaintext hello --context tenant=a
    kmsctl decrypt --ciphertext-blob <base64> --context tenant=a --out -
    kmsctl put-key-policy --key-id alias/payments --policy policy.json
    kmsctl create-grant --key-id alias/payments --grantee-principal spiffe://x/app \\
        --operation Encrypt --operation Decrypt --constraint-equals tenant=a
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import TYPE_CHECKING, TypeVar, cast

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import resources_pb2 as res

from kms_client import audit_cli, cluster_cli
from kms_client._enums import aws_name, aws_names, enum_value
from kms_client._version import __version__
from kms_client.client import DEFAULT_ENDPOINT, KmsClient
from kms_client.errors import KmsClientError
from kms_client.tls import ENV_CA, ENV_CERT, ENV_KEY, TlsFiles

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

ENV_ENDPOINT = "KMSD_ENDPOINT"
ENV_NO_TLS = "KMSD_NO_TLS"

_M = TypeVar("_M", bound=Message)
_V = TypeVar("_V", bound=int)


class _UsageError(Exception):
    """A bad argument found after parsing (exit status 2, like argparse's own)."""


# ---------------------------------------------------------------------- argument types


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _enum_arg(wrapper: _EnumTypeWrapper[_V]) -> Callable[[str], _V]:
    def parse(text: str) -> _V:
        try:
            return enum_value(wrapper, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = wrapper.DESCRIPTOR.name  # argparse names the type in its error messages
    return parse


def _choices(wrapper: _EnumTypeWrapper[_V]) -> str:
    return ", ".join(aws_names(wrapper.DESCRIPTOR))


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as fh:
        return fh.read()


def _plaintext(args: argparse.Namespace) -> bytes:
    if args.plaintext is not None:
        return str(args.plaintext).encode()
    return _read_input(args.plaintext_file)


def _ciphertext(args: argparse.Namespace) -> bytes:
    if args.ciphertext_blob is not None:
        try:
            return base64.b64decode(args.ciphertext_blob, validate=True)
        except binascii.Error:
            raise _UsageError("--ciphertext-blob is not valid base64") from None
    return _read_input(args.ciphertext_file)


def _context(pairs: list[tuple[str, str]] | None) -> dict[str, str]:
    return dict(pairs or [])


# ---------------------------------------------------------------------- output


def _label(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _scalar(fd: FieldDescriptor, value: object) -> str:
    if fd.type == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        return aws_name(fd.enum_type, cast(int, value))
    if fd.type == FieldDescriptor.TYPE_BYTES:
        assert isinstance(value, bytes)
        return base64.b64encode(value).decode()
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    return str(value)


def _is_timestamp(descriptor: Descriptor | None) -> bool:
    return descriptor is not None and descriptor.full_name == "google.protobuf.Timestamp"


def _rows(message: Message) -> list[tuple[str, str]]:
    """Flattens a response message into (label, text) rows, skipping unset values."""
    rows: list[tuple[str, str]] = []
    for fd in _fields(message):
        value = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            if value:
                rows.append((_label(fd.name), ", ".join(f"{k}={v}" for k, v in value.items())))
        elif fd.is_repeated:
            if fd.message_type is None and len(value):
                rows.append((_label(fd.name), ", ".join(_scalar(fd, v) for v in value)))
        elif fd.message_type is not None:
            if not message.HasField(fd.name):
                continue
            if _is_timestamp(fd.message_type):
                assert isinstance(value, timestamp_pb2.Timestamp)
                when = value.ToDatetime(tzinfo=UTC).isoformat()
                rows.append((_label(fd.name), when))
            else:
                # Nested resources (KeyMetadata) read best flattened, as AWS CLI text output.
                rows.extend(_rows(value))
        elif fd.type == FieldDescriptor.TYPE_BOOL or value:
            rows.append((_label(fd.name), _scalar(fd, value)))
    return rows


def _fields(message: Message) -> list[FieldDescriptor]:
    # The stubs type descriptors as a union with upb's; both have the same API.
    return [cast(FieldDescriptor, fd) for fd in message.DESCRIPTOR.fields]


def _aligned(rows: list[tuple[str, str]]) -> str:
    width = max((len(label) for label, _ in rows), default=0) + 1
    return "\n".join(f"{label + ':':<{width}} {text}" for label, text in rows)


def render_human(message: Message) -> str:
    """The human-readable form of a response: ``Key: value`` lines, one block per list entry."""
    entry_fields = [
        fd
        for fd in _fields(message)
        if fd.is_repeated
        and fd.message_type is not None
        and not fd.message_type.GetOptions().map_entry
    ]
    blocks: list[str] = []
    if entry_fields:
        for fd in entry_fields:
            blocks.extend(_aligned(_rows(entry)) for entry in getattr(message, fd.name))
        # Paging state matters only when a page is cut short.
        if getattr(message, "truncated", False):
            blocks.append(_aligned([("NextMarker", str(getattr(message, "next_marker", "")))]))
    else:
        rows = _rows(message)
        if rows:
            blocks.append(_aligned(rows))
    return "\n\n".join(blocks)


def render_json(message: Message) -> str:
    """The JSON form of a response (proto field names; bytes as base64)."""
    return json_format.MessageToJson(message, preserving_proto_field_name=True)


# ---------------------------------------------------------------------- commands


@dataclass(frozen=True)
class _Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[KmsClient, argparse.Namespace], Message]
    #: Bytes fields that may be written raw to a file instead of printed: option -> field.
    raw_outputs: dict[str, str] = field(default_factory=dict)


def _key_id(p: argparse.ArgumentParser, required: bool = True, what: str = "the KMS key") -> None:
    p.add_argument(
        "--key-id",
        required=required,
        default="",
        help=f"{what}: key id, key ARN, alias name or alias ARN",
    )


def _request_id(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--request-id",
        default=None,
        help="idempotency key (default: a fresh UUID; '' disables deduplication and retries)",
    )


def _min_commit_index(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-commit-index",
        type=int,
        default=0,
        help="read-your-writes: a commit_index returned by an earlier write",
    )


def _grant_tokens(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grant-token", dest="grant_tokens", action="append", default=[], metavar="TOKEN"
    )


def _dry_run(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check permission and key state only (succeeds as DryRunOperationException)",
    )


def _context_arg(
    p: argparse.ArgumentParser, flag: str = "--context", dest: str = "context"
) -> None:
    p.add_argument(
        flag,
        dest=dest,
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="encryption context pair (repeatable)",
    )


def _paging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=0, help="page size (server default if 0)")
    p.add_argument("--marker", default="", help="next_marker of the previous page")
    p.add_argument("--all", action="store_true", help="follow markers and print every page")
    _min_commit_index(p)


def _plaintext_input(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--plaintext", metavar="TEXT", help="plaintext as UTF-8 text")
    group.add_argument("--plaintext-file", metavar="PATH", help="plaintext file ('-' for stdin)")


def _ciphertext_input(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--ciphertext-blob", metavar="B64", help="ciphertext, base64")
    group.add_argument(
        "--ciphertext-file", metavar="PATH", help="ciphertext, raw bytes ('-' for stdin)"
    )


def _algorithm(p: argparse.ArgumentParser, flag: str = "--encryption-algorithm") -> None:
    p.add_argument(
        flag,
        type=_enum_arg(res.EncryptionAlgorithmSpec),
        default=None,
        help=f"one of: {_choices(res.EncryptionAlgorithmSpec)}",
    )


def _dry_run_modifiers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dry-run-modifier",
        dest="dry_run_modifiers",
        action="append",
        default=[],
        type=_enum_arg(pb.DryRunModifier),
        help=f"one of: {_choices(pb.DryRunModifier)}",
    )


def _data_key_spec(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--key-spec",
        type=_enum_arg(res.DataKeySpec),
        default=None,
        help=f"one of: {_choices(res.DataKeySpec)} (default AES_256)",
    )
    group.add_argument("--number-of-bytes", type=int, default=0, help="data key length, 1-1024")


def _follow(args: argparse.Namespace, fetch: Callable[[str], _M], entries: str) -> _M:
    """Fetches one page, or with --all every page merged into one response."""
    page = fetch(args.marker)
    if not args.all:
        return page
    merged = type(page)()
    merged.CopyFrom(page)
    while True:
        # Every paged response has truncated/next_marker; _M only knows Message.
        next_marker = str(getattr(page, "next_marker", ""))
        if not (getattr(page, "truncated", False) and next_marker):
            break
        page = fetch(next_marker)
        getattr(merged, entries).extend(getattr(page, entries))
    merged.ClearField("next_marker")
    merged.ClearField("truncated")
    return merged


def _configure_create_key(p: argparse.ArgumentParser) -> None:
    p.add_argument("--description", default="")
    policy = p.add_mutually_exclusive_group()
    policy.add_argument("--policy", default="", help="key policy JSON")
    policy.add_argument("--policy-file", metavar="PATH", help="key policy JSON file")
    p.add_argument(
        "--key-usage", type=_enum_arg(res.KeyUsage), help=f"one of: {_choices(res.KeyUsage)}"
    )
    p.add_argument(
        "--key-spec", type=_enum_arg(res.KeySpec), help=f"one of: {_choices(res.KeySpec)}"
    )
    p.add_argument("--origin", type=_enum_arg(res.Origin), help=f"one of: {_choices(res.Origin)}")
    p.add_argument("--tag", dest="tags", action="append", type=_key_value, metavar="KEY=VALUE")
    p.add_argument("--custom-key-store-id", default="")
    p.add_argument("--xks-key-id", default="")
    p.add_argument("--multi-region", action="store_true")
    p.add_argument("--bypass-policy-lockout-safety-check", action="store_true")
    _request_id(p)


def _run_create_key(c: KmsClient, a: argparse.Namespace) -> Message:
    policy = a.policy
    if a.policy_file:
        policy = _read_input(a.policy_file).decode()
    return c.create_key(
        a.description,
        policy=policy,
        key_usage=a.key_usage,
        key_spec=a.key_spec,
        origin=a.origin,
        tags=dict(a.tags or []),
        custom_key_store_id=a.custom_key_store_id,
        xks_key_id=a.xks_key_id,
        multi_region=a.multi_region,
        bypass_policy_lockout_safety_check=a.bypass_policy_lockout_safety_check,
        request_id=a.request_id,
    )


def _configure_key_only(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    _request_id(p)


def _configure_describe(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    _grant_tokens(p)
    _min_commit_index(p)


def _configure_update_description(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument("--description", required=True, help="new description ('' clears it)")
    _request_id(p)


def _configure_schedule_deletion(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument("--pending-window-in-days", type=int, default=0, help="7-30 (default 30)")
    _request_id(p)


def _configure_encrypt(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    _plaintext_input(p)
    _context_arg(p)
    _grant_tokens(p)
    _algorithm(p)
    _dry_run(p)
    _min_commit_index(p)
    p.add_argument("--out", metavar="PATH", help="write the raw ciphertext here ('-': stdout)")


def _run_encrypt(c: KmsClient, a: argparse.Namespace) -> Message:
    return c.encrypt(
        a.key_id,
        _plaintext(a),
        _context(a.context),
        grant_tokens=a.grant_tokens,
        encryption_algorithm=a.encryption_algorithm,
        dry_run=a.dry_run,
        min_commit_index=a.min_commit_index,
    )


def _configure_decrypt(p: argparse.ArgumentParser) -> None:
    _ciphertext_input(p)
    _context_arg(p)
    _key_id(p, required=False, what="the key expected to have encrypted the ciphertext")
    _grant_tokens(p)
    _algorithm(p)
    _dry_run(p)
    _dry_run_modifiers(p)
    _min_commit_index(p)
    p.add_argument("--out", metavar="PATH", help="write the raw plaintext here ('-': stdout)")


def _run_decrypt(c: KmsClient, a: argparse.Namespace) -> Message:
    return c.decrypt(
        _ciphertext(a),
        _context(a.context),
        key_id=a.key_id,
        grant_tokens=a.grant_tokens,
        encryption_algorithm=a.encryption_algorithm,
        dry_run=a.dry_run,
        dry_run_modifiers=a.dry_run_modifiers,
        min_commit_index=a.min_commit_index,
    )


def _configure_re_encrypt(p: argparse.ArgumentParser) -> None:
    _ciphertext_input(p)
    _context_arg(p, "--source-context", "source_context")
    p.add_argument("--source-key-id", default="", help="the key expected to have encrypted it")
    p.add_argument("--destination-key-id", required=True, help="the key to encrypt under")
    _context_arg(p, "--destination-context", "destination_context")
    _algorithm(p, "--source-encryption-algorithm")
    _algorithm(p, "--destination-encryption-algorithm")
    _grant_tokens(p)
    _dry_run(p)
    _dry_run_modifiers(p)
    _min_commit_index(p)
    p.add_argument("--out", metavar="PATH", help="write the raw new ciphertext here ('-': stdout)")


def _run_re_encrypt(c: KmsClient, a: argparse.Namespace) -> Message:
    return c.re_encrypt(
        _ciphertext(a),
        a.destination_key_id,
        source_encryption_context=_context(a.source_context),
        source_key_id=a.source_key_id,
        destination_encryption_context=_context(a.destination_context),
        source_encryption_algorithm=a.source_encryption_algorithm,
        destination_encryption_algorithm=a.destination_encryption_algorithm,
        grant_tokens=a.grant_tokens,
        dry_run=a.dry_run,
        dry_run_modifiers=a.dry_run_modifiers,
        min_commit_index=a.min_commit_index,
    )


def _configure_generate_data_key(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    _data_key_spec(p)
    _context_arg(p)
    _grant_tokens(p)
    _dry_run(p)
    _min_commit_index(p)
    p.add_argument("--out", metavar="PATH", help="write the raw wrapped data key here")
    p.add_argument("--plaintext-out", metavar="PATH", help="write the raw plaintext data key here")


def _run_generate_data_key(c: KmsClient, a: argparse.Namespace) -> Message:
    return c.generate_data_key(
        a.key_id,
        _context(a.context),
        key_spec=a.key_spec,
        number_of_bytes=a.number_of_bytes,
        grant_tokens=a.grant_tokens,
        dry_run=a.dry_run,
        min_commit_index=a.min_commit_index,
    )


def _configure_generate_data_key_wp(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    _data_key_spec(p)
    _context_arg(p)
    _grant_tokens(p)
    _dry_run(p)
    _min_commit_index(p)
    p.add_argument("--out", metavar="PATH", help="write the raw wrapped data key here")


def _run_generate_data_key_wp(c: KmsClient, a: argparse.Namespace) -> Message:
    return c.generate_data_key_without_plaintext(
        a.key_id,
        _context(a.context),
        key_spec=a.key_spec,
        number_of_bytes=a.number_of_bytes,
        grant_tokens=a.grant_tokens,
        dry_run=a.dry_run,
        min_commit_index=a.min_commit_index,
    )


def _configure_generate_random(p: argparse.ArgumentParser) -> None:
    p.add_argument("--number-of-bytes", type=int, required=True, help="1-1024")
    p.add_argument("--custom-key-store-id", default="")
    p.add_argument("--out", metavar="PATH", help="write the raw random bytes here ('-': stdout)")


def _configure_alias(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alias-name", required=True, help="alias/<name>")
    p.add_argument("--target-key-id", required=True, help="key id or key ARN")
    _request_id(p)


def _configure_delete_alias(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alias-name", required=True, help="alias/<name>")
    _request_id(p)


def _configure_list_keys(p: argparse.ArgumentParser) -> None:
    _paging(p)


def _run_list_keys(c: KmsClient, a: argparse.Namespace) -> Message:
    return _follow(
        a,
        lambda m: c.list_keys(limit=a.limit, marker=m, min_commit_index=a.min_commit_index),
        "keys",
    )


def _configure_list_aliases(p: argparse.ArgumentParser) -> None:
    _key_id(p, required=False, what="only the aliases of this key")
    _paging(p)


def _run_list_aliases(c: KmsClient, a: argparse.Namespace) -> Message:
    return _follow(
        a,
        lambda m: c.list_aliases(
            key_id=a.key_id, limit=a.limit, marker=m, min_commit_index=a.min_commit_index
        ),
        "aliases",
    )


def _configure_enable_rotation(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument("--rotation-period-in-days", type=int, default=0, help="90-2560 (default 365)")
    _request_id(p)


def _configure_key_read(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    _min_commit_index(p)


def _configure_list_rotations(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument(
        "--include-key-material",
        type=_enum_arg(pb.IncludeKeyMaterial),
        default=None,
        help=f"one of: {_choices(pb.IncludeKeyMaterial)}",
    )
    _paging(p)


def _run_list_rotations(c: KmsClient, a: argparse.Namespace) -> Message:
    return _follow(
        a,
        lambda m: c.list_key_rotations(
            a.key_id,
            include_key_material=a.include_key_material,
            limit=a.limit,
            marker=m,
            min_commit_index=a.min_commit_index,
        ),
        "rotations",
    )


def _configure_tag(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument(
        "--tag", dest="tags", action="append", required=True, type=_key_value, metavar="KEY=VALUE"
    )
    _request_id(p)


def _configure_untag(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument("--tag-key", dest="tag_keys", action="append", required=True, metavar="KEY")
    _request_id(p)


def _configure_list_tags(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    _paging(p)


def _run_list_tags(c: KmsClient, a: argparse.Namespace) -> Message:
    return _follow(
        a,
        lambda m: c.list_resource_tags(
            a.key_id, limit=a.limit, marker=m, min_commit_index=a.min_commit_index
        ),
        "tags",
    )


def _policy_text(value: str) -> str:
    """--policy: '-' (stdin), a file, or the JSON document itself."""
    if value == "-" or not value.lstrip().startswith("{"):
        return _read_input(value).decode()
    return value


def _configure_put_key_policy(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument(
        "--policy",
        required=True,
        metavar="FILE|-|JSON",
        help="the key policy: a file, '-' for stdin, or the JSON document itself",
    )
    p.add_argument("--policy-name", default="default", help="always 'default' (AWS)")
    p.add_argument(
        "--bypass-policy-lockout-safety-check",
        action="store_true",
        help="allow a policy that would stop you from changing it again",
    )
    _request_id(p)


def _run_put_key_policy(c: KmsClient, a: argparse.Namespace) -> Message:
    return c.put_key_policy(
        a.key_id,
        _policy_text(a.policy),
        policy_name=a.policy_name,
        bypass_policy_lockout_safety_check=a.bypass_policy_lockout_safety_check,
        request_id=a.request_id,
    )


def _configure_get_key_policy(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument("--policy-name", default="default", help="always 'default' (AWS)")
    _min_commit_index(p)


def _configure_list_key_policies(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    _paging(p)


def _run_list_key_policies(c: KmsClient, a: argparse.Namespace) -> Message:
    return _follow(
        a,
        lambda m: c.list_key_policies(
            a.key_id, limit=a.limit, marker=m, min_commit_index=a.min_commit_index
        ),
        "policy_names",
    )


def _configure_create_grant(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument(
        "--grantee-principal", required=True, help="who gets the permissions (TLS principal)"
    )
    p.add_argument(
        "--operation",
        dest="operations",
        action="append",
        required=True,
        type=_enum_arg(res.GrantOperation),
        help=f"repeatable; one of: {_choices(res.GrantOperation)}",
    )
    p.add_argument("--retiring-principal", default="", help="who may retire the grant")
    p.add_argument(
        "--constraint-equals",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="only with exactly this encryption context (repeatable)",
    )
    p.add_argument(
        "--constraint-subset",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="only with an encryption context holding these pairs (repeatable)",
    )
    p.add_argument("--name", default="", help="a friendly name for the grant")
    _grant_tokens(p)
    _dry_run(p)
    _request_id(p)


def _run_create_grant(c: KmsClient, a: argparse.Namespace) -> Message:
    return c.create_grant(
        a.key_id,
        a.grantee_principal,
        a.operations,
        retiring_principal=a.retiring_principal,
        encryption_context_equals=_context(a.constraint_equals),
        encryption_context_subset=_context(a.constraint_subset),
        grant_tokens=a.grant_tokens,
        name=a.name,
        dry_run=a.dry_run,
        request_id=a.request_id,
    )


def _configure_list_grants(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument("--grant-id", default="", help="only this grant")
    p.add_argument("--grantee-principal", default="", help="only this grantee's grants")
    _paging(p)


def _run_list_grants(c: KmsClient, a: argparse.Namespace) -> Message:
    return _follow(
        a,
        lambda m: c.list_grants(
            a.key_id,
            grant_id=a.grant_id,
            grantee_principal=a.grantee_principal,
            limit=a.limit,
            marker=m,
            min_commit_index=a.min_commit_index,
        ),
        "grants",
    )


def _configure_list_retirable_grants(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retiring-principal", required=True, help="whose retirable grants")
    _paging(p)


def _run_list_retirable_grants(c: KmsClient, a: argparse.Namespace) -> Message:
    return _follow(
        a,
        lambda m: c.list_retirable_grants(
            a.retiring_principal, limit=a.limit, marker=m, min_commit_index=a.min_commit_index
        ),
        "grants",
    )


def _configure_retire_grant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grant-token", default="", help="the token CreateGrant returned")
    _key_id(p, required=False, what="with --grant-id instead of --grant-token: the grant's key")
    p.add_argument("--grant-id", default="", help="with --key-id: the grant")
    _dry_run(p)
    _request_id(p)


def _run_retire_grant(c: KmsClient, a: argparse.Namespace) -> Message:
    if not a.grant_token and not (a.key_id and a.grant_id):
        raise _UsageError("give --grant-token, or --key-id and --grant-id")
    return c.retire_grant(
        grant_token=a.grant_token,
        key_id=a.key_id,
        grant_id=a.grant_id,
        dry_run=a.dry_run,
        request_id=a.request_id,
    )


def _configure_revoke_grant(p: argparse.ArgumentParser) -> None:
    _key_id(p)
    p.add_argument("--grant-id", required=True, help="the grant to revoke")
    _dry_run(p)
    _request_id(p)


COMMANDS: tuple[_Command, ...] = (
    _Command("create-key", "create a symmetric KMS key", _configure_create_key, _run_create_key),
    _Command(
        "describe-key",
        "show a key's metadata",
        _configure_describe,
        lambda c, a: c.describe_key(
            a.key_id, grant_tokens=a.grant_tokens, min_commit_index=a.min_commit_index
        ),
    ),
    _Command("list-keys", "list keys", _configure_list_keys, _run_list_keys),
    _Command(
        "update-key-description",
        "replace a key's description",
        _configure_update_description,
        lambda c, a: c.update_key_description(a.key_id, a.description, request_id=a.request_id),
    ),
    _Command(
        "enable-key",
        "enable a key",
        _configure_key_only,
        lambda c, a: c.enable_key(a.key_id, request_id=a.request_id),
    ),
    _Command(
        "disable-key",
        "disable a key",
        _configure_key_only,
        lambda c, a: c.disable_key(a.key_id, request_id=a.request_id),
    ),
    _Command(
        "schedule-key-deletion",
        "schedule a key's deletion after 7-30 days",
        _configure_schedule_deletion,
        lambda c, a: c.schedule_key_deletion(
            a.key_id, pending_window_in_days=a.pending_window_in_days, request_id=a.request_id
        ),
    ),
    _Command(
        "cancel-key-deletion",
        "cancel a scheduled deletion (the key becomes Disabled)",
        _configure_key_only,
        lambda c, a: c.cancel_key_deletion(a.key_id, request_id=a.request_id),
    ),
    _Command(
        "encrypt",
        "encrypt up to 4096 bytes",
        _configure_encrypt,
        _run_encrypt,
        {"out": "ciphertext_blob"},
    ),
    _Command(
        "decrypt", "decrypt a ciphertext", _configure_decrypt, _run_decrypt, {"out": "plaintext"}
    ),
    _Command(
        "re-encrypt",
        "re-encrypt a ciphertext under another key inside kmsd",
        _configure_re_encrypt,
        _run_re_encrypt,
        {"out": "ciphertext_blob"},
    ),
    _Command(
        "generate-data-key",
        "make a data key, in plaintext and wrapped",
        _configure_generate_data_key,
        _run_generate_data_key,
        {"out": "ciphertext_blob", "plaintext_out": "plaintext"},
    ),
    _Command(
        "generate-data-key-without-plaintext",
        "make a data key, wrapped only",
        _configure_generate_data_key_wp,
        _run_generate_data_key_wp,
        {"out": "ciphertext_blob"},
    ),
    _Command(
        "generate-random",
        "random bytes",
        _configure_generate_random,
        lambda c, a: c.generate_random(
            a.number_of_bytes, custom_key_store_id=a.custom_key_store_id
        ),
        {"out": "plaintext"},
    ),
    _Command(
        "create-alias",
        "create an alias for a key",
        _configure_alias,
        lambda c, a: c.create_alias(a.alias_name, a.target_key_id, request_id=a.request_id),
    ),
    _Command(
        "update-alias",
        "point an alias at another key",
        _configure_alias,
        lambda c, a: c.update_alias(a.alias_name, a.target_key_id, request_id=a.request_id),
    ),
    _Command(
        "delete-alias",
        "delete an alias",
        _configure_delete_alias,
        lambda c, a: c.delete_alias(a.alias_name, request_id=a.request_id),
    ),
    _Command("list-aliases", "list aliases", _configure_list_aliases, _run_list_aliases),
    _Command(
        "enable-key-rotation",
        "turn automatic rotation on",
        _configure_enable_rotation,
        lambda c, a: c.enable_key_rotation(
            a.key_id, rotation_period_in_days=a.rotation_period_in_days, request_id=a.request_id
        ),
    ),
    _Command(
        "disable-key-rotation",
        "turn automatic rotation off",
        _configure_key_only,
        lambda c, a: c.disable_key_rotation(a.key_id, request_id=a.request_id),
    ),
    _Command(
        "get-key-rotation-status",
        "show a key's rotation settings",
        _configure_key_read,
        lambda c, a: c.get_key_rotation_status(a.key_id, min_commit_index=a.min_commit_index),
    ),
    _Command(
        "rotate-key-on-demand",
        "rotate a key's material now",
        _configure_key_only,
        lambda c, a: c.rotate_key_on_demand(a.key_id, request_id=a.request_id),
    ),
    _Command(
        "list-key-rotations",
        "list a key's completed rotations",
        _configure_list_rotations,
        _run_list_rotations,
    ),
    _Command(
        "tag-resource",
        "add or update tags on a key",
        _configure_tag,
        lambda c, a: c.tag_resource(a.key_id, dict(a.tags), request_id=a.request_id),
    ),
    _Command(
        "untag-resource",
        "remove tags from a key",
        _configure_untag,
        lambda c, a: c.untag_resource(a.key_id, a.tag_keys, request_id=a.request_id),
    ),
    _Command("list-resource-tags", "list a key's tags", _configure_list_tags, _run_list_tags),
    _Command(
        "put-key-policy",
        "replace a key's policy",
        _configure_put_key_policy,
        _run_put_key_policy,
    ),
    _Command(
        "get-key-policy",
        "show a key's policy",
        _configure_get_key_policy,
        lambda c, a: c.get_key_policy(
            a.key_id, policy_name=a.policy_name, min_commit_index=a.min_commit_index
        ),
    ),
    _Command(
        "list-key-policies",
        "list a key's policy names",
        _configure_list_key_policies,
        _run_list_key_policies,
    ),
    _Command(
        "create-grant",
        "give a principal permissions on a key",
        _configure_create_grant,
        _run_create_grant,
    ),
    _Command("list-grants", "list a key's grants", _configure_list_grants, _run_list_grants),
    _Command(
        "list-retirable-grants",
        "list the grants a principal may retire",
        _configure_list_retirable_grants,
        _run_list_retirable_grants,
    ),
    _Command(
        "retire-grant",
        "delete a grant you are done with",
        _configure_retire_grant,
        _run_retire_grant,
    ),
    _Command(
        "revoke-grant",
        "delete a grant (key administrators)",
        _configure_revoke_grant,
        lambda c, a: c.revoke_grant(
            a.key_id, a.grant_id, dry_run=a.dry_run, request_id=a.request_id
        ),
    ),
)


# ---------------------------------------------------------------------- main


def _add_global_options(p: argparse.ArgumentParser, *, top_level: bool) -> None:
    # Defined on the top parser and again on every subcommand, so that
    # `kmsctl encrypt ... --json` works as well as `kmsctl --json encrypt ...`;
    # the subcommand copies default to SUPPRESS so they never mask the top level.
    def default(value: object) -> object:
        return value if top_level else argparse.SUPPRESS

    p.add_argument(
        "--endpoint",
        action="append",
        default=default(None),
        metavar="HOST:PORT",
        help=f"a kmsd node (repeatable or comma-separated; default ${ENV_ENDPOINT}, "
        f"else {DEFAULT_ENDPOINT})",
    )
    p.add_argument(
        "--json", action="store_true", default=default(False), help="print the response as JSON"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=default(10.0),
        help="seconds per attempt (default 10)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=default(8),
        help="attempts per call when the cluster is unavailable (default 8)",
    )
    # Mutual TLS: these, else $KMSD_CA/$KMSD_CERT/$KMSD_KEY; plaintext only if asked for.
    p.add_argument(
        "--ca",
        "--tls-ca",
        dest="tls_ca",
        default=default(None),
        metavar="PATH",
        help=f"TLS: the CA bundle of the kmsd nodes (PEM; default ${ENV_CA})",
    )
    p.add_argument(
        "--cert",
        "--tls-cert",
        dest="tls_cert",
        default=default(None),
        metavar="PATH",
        help=f"TLS: your client certificate chain (PEM; default ${ENV_CERT})",
    )
    p.add_argument(
        "--key",
        "--tls-key",
        dest="tls_key",
        default=default(None),
        metavar="PATH",
        help=f"TLS: your client private key (PEM; default ${ENV_KEY})",
    )
    p.add_argument(
        "--no-tls",
        action="store_true",
        default=default(False),
        help=f"plaintext, for a loopback `kmsd dev --plaintext` only (default ${ENV_NO_TLS}=1)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The kmsctl argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="kmsctl",
        allow_abbrev=False,
        description="Command-line client of kmsd, one subcommand per AWS KMS operation.",
    )
    parser.add_argument("--version", action="version", version=f"kmsctl {__version__}")
    _add_global_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(
            command.name, help=command.help, description=command.help, allow_abbrev=False
        )
        _add_global_options(p, top_level=False)
        command.configure(p)
        p.set_defaults(_command=command)
    cluster = cluster_cli.configure(sub)
    _add_global_options(cluster, top_level=False)
    audit_cli.configure(sub)  # offline: no endpoint or TLS options
    return parser


def _endpoints(args: argparse.Namespace) -> list[str]:
    given: list[str] = args.endpoint or [os.environ.get(ENV_ENDPOINT, "") or DEFAULT_ENDPOINT]
    return [e.strip() for item in given for e in item.split(",") if e.strip()]


def transport(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, bool]:
    """(credentials, plaintext) from --ca/--cert/--key/--no-tls, else the environment.
    Raises ValueError naming what is missing."""
    given = args.tls_ca or args.tls_cert or args.tls_key
    if args.no_tls or (not given and os.environ.get(ENV_NO_TLS, "") in ("1", "true", "yes")):
        if given:
            raise ValueError("--no-tls and --ca/--cert/--key exclude each other")
        return None, True
    ca = args.tls_ca or os.environ.get(ENV_CA) or None
    cert = args.tls_cert or (None if given else os.environ.get(ENV_CERT) or None)
    key = args.tls_key or (None if given else os.environ.get(ENV_KEY) or None)
    if ca is None and (cert or key):
        raise ValueError(f"--ca (or ${ENV_CA}) is needed with a client certificate")
    if ca is None:
        raise ValueError(
            f"kmsd speaks mutual TLS: give --ca, --cert and --key (or ${ENV_CA}, "
            f"${ENV_CERT}, ${ENV_KEY}; `kmsd dev` prints them), or --no-tls for a "
            "loopback `kmsd dev --plaintext`"
        )
    if (cert is None) != (key is None):
        raise ValueError("--cert and --key go together")
    return TlsFiles(ca, cert, key).credentials(), False


def _write_raw(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    # Outputs may be plaintext or data keys: create them readable by the owner only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _emit(command: _Command, args: argparse.Namespace, response: Message) -> None:
    shown = type(response)()
    shown.CopyFrom(response)
    to_stdout_raw = False
    for option, field_name in command.raw_outputs.items():
        path = getattr(args, option, None)
        if path:
            _write_raw(path, getattr(response, field_name))
            shown.ClearField(field_name)
            to_stdout_raw = to_stdout_raw or path == "-"
    if to_stdout_raw:
        # Raw bytes went to stdout; anything more there would corrupt them.
        return
    text = render_json(shown) if args.json else render_human(shown)
    if text:
        print(text)


def _print_error(err: KmsClientError) -> None:
    print(f"error: {err.name}: {err.message}", file=sys.stderr)
    for field_path, description in err.field_violations:
        line = f"{field_path}: {description}"
        # kmsd's message for a single violation is usually this very line.
        if line != err.message:
            print(f"  {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs kmsctl with `argv` (default: sys.argv[1:]) and returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if args.command == "audit":
        return audit_cli.run(args)
    if args.command == "cluster":
        try:
            credentials, plaintext = transport(args)
            return cluster_cli.run(
                args, _endpoints(args), args.timeout, credentials=credentials, plaintext=plaintext
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    command: _Command = args._command
    try:
        credentials, plaintext = transport(args)
        with KmsClient(
            _endpoints(args),
            timeout=args.timeout,
            credentials=credentials,
            plaintext=plaintext,
            max_attempts=args.max_attempts,
        ) as client:
            response = command.run(client, args)
        _emit(command, args, response)
    except _UsageError as exc:
        print(f"kmsctl {command.name}: error: {exc}", file=sys.stderr)
        return 2
    except KmsClientError as err:
        _print_error(err)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        # Local argument checks in KmsClient (e.g. an empty endpoint list).
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
