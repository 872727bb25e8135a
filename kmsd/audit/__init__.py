"""The audit trail: one hash-chained JSON-lines record per request (docs/audit.md).

`record` builds and encodes records, `writer` appends them with group commit and
rotation, `verify` checks files offline (its logic lives in `kms_client.audit_verify`,
shared with `kmsctl audit verify`).
"""
