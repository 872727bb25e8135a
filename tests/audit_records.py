"""Reading a node's audit trail in tests: every record of every file, in order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kms_client.audit_verify import audit_files


def audit_records(directory: Path) -> list[dict[str, Any]]:
    """The records of the audit files in `directory`, oldest first, parsed."""
    return [
        json.loads(line)
        for path in audit_files(directory)
        for line in path.read_bytes().splitlines()
    ]
