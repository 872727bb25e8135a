"""The `kmsd` command's entry point: gRPC's process-wide settings, made before gRPC loads.

gRPC reads its experiment flags from the environment once, when it is imported, so
they cannot come from kmsd's config file (read after every module is loaded). This
module imports nothing that imports gRPC; `main` sets them, then loads `kmsd.cli`.
`python -m kmsd` and the `kmsd` console script both start here, and so do the node
processes `kmsd dev` starts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

#: gRPC's Python layer polls a completion queue from its own thread; in recent gRPC
#: releases the sockets behind it are served by "EventEngine", from a thread pool that
#: hands completed reads and writes on to that queue: one more wake-up per message.
#: These flags select the I/O manager gRPC used before, still shipped: on a 2-core
#: machine a unary round trip between two processes took ≈ 20 % less time and CPU, and
#: a lone replicated CreateKey 8–19 % less (docs/performance.md, "gRPC's I/O manager").
GRPC_EXPERIMENTS = (
    "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"
)


def prefer_grpc_settings(environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets kmsd's gRPC experiment flags unless the operator chose their own: any value
    of `GRPC_EXPERIMENTS`, the empty one included (gRPC's own defaults), is kept."""
    environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)


def main(argv: list[str] | None = None) -> int:
    # Too late once gRPC is loaded (kmsd run from a program that imported it first):
    # the flags then only reach the node processes this one starts.
    prefer_grpc_settings()
    from kmsd.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
