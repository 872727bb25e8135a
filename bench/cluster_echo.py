"""The cluster benchmark's `--echo-ceiling` target: a gRPC server that does no work at all.

`python -m bench.cluster_echo --port N` serves `kms.v1.KeyManagementService` on
127.0.0.1 with the stack kmsd uses (a grpc.aio server with kmsd's server options,
async handlers) and only CreateKey implemented: it answers every call with a fixed,
empty `CreateKeyResponse()` without looking at the request (the other methods answer
UNIMPLEMENTED). Driven by the same load generator as kmsd, it measures the ceiling
that kmsd's server stack alone puts on kmsd, whatever kmsd does per call. It prints
`echo server: serving on 127.0.0.1:<port>` once it serves and stops on SIGINT/SIGTERM.

With `--threads N` it serves the same with gRPC's threaded (synchronous) server and N
worker threads instead: the other Python gRPC server, which answers more calls per
second of CPU on this machine (the baselines' faster one), so that the two together
bound what any Python gRPC server in one process answers here.

`EchoServer` is the benchmark's handle on it: one such process, started and always
stopped through `bench.cluster_procs.Children`, with the same `endpoints` and `pids`
as a `KmsdCluster`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from kms.v1 import kms_service_pb2 as pb
from kms.v1 import kms_service_pb2_grpc as pb_grpc

from bench.bare_service import build_server, serve_until_signalled
from bench.cluster_procs import Child, Children, free_ports
from kmsd.api.server import SERVER_OPTIONS

__all__ = ["EchoServer", "build_echo_server", "main"]

START_TIMEOUT = 30.0
_RESPONSE = pb.CreateKeyResponse()

Ctx = grpc.aio.ServicerContext[object, object]


class EchoServicer(pb_grpc.KeyManagementServiceServicer):
    """CreateKey answers a fixed empty response; nothing else is implemented."""

    async def CreateKey(self, request: pb.CreateKeyRequest, context: Ctx) -> pb.CreateKeyResponse:
        return _RESPONSE


class ThreadedEchoServicer(pb_grpc.KeyManagementServiceServicer):
    """The same, for gRPC's threaded server."""

    def CreateKey(self, request: pb.CreateKeyRequest, context: object) -> pb.CreateKeyResponse:
        return _RESPONSE


def _serve_threaded(port: int, threads: int) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=SERVER_OPTIONS)
    pb_grpc.add_KeyManagementServiceServicer_to_server(ThreadedEchoServicer(), server)  # type: ignore[abstract]
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(f"echo server: serving on 127.0.0.1:{bound}", flush=True)
    stop.wait()
    server.stop(grace=1).wait()


def build_echo_server(listen: str) -> tuple[grpc.aio.Server, int]:
    """A not yet started server bound to `listen`, with kmsd's server options."""
    # The other methods keep the generated UNIMPLEMENTED bodies (abstract only in the stubs).
    return build_server(EchoServicer(), listen)  # type: ignore[abstract]


async def _serve(port: int) -> None:
    await serve_until_signalled(*build_echo_server(f"127.0.0.1:{port}"), "echo server")


class EchoServer:
    """One echo server process on a free loopback port; its log is `root/echo.log`.
    With `threads`, the threaded server with that many workers."""

    def __init__(self, root: Path, children: Children, threads: int = 0) -> None:
        self.root = root
        self.children = children
        self.threads = threads
        self.port = 0
        self.child: Child | None = None

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self.port}"]

    @property
    def pids(self) -> list[int]:
        return [self.child.pid] if self.child is not None and self.child.running else []

    def start(self) -> EchoServer:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.port,) = free_ports(1)
        argv = [sys.executable, "-m", "bench.cluster_echo", "--port", str(self.port)]
        if self.threads:
            argv += ["--threads", str(self.threads)]
        child = self.children.add(Child("echo server", argv, self.root / "echo.log").start())
        self.child = child
        self._wait_ready(child, time.monotonic() + START_TIMEOUT)
        return self

    def _wait_ready(self, child: Child, deadline: float) -> None:
        """Until one CreateKey is answered; fails early if the process exits."""
        while time.monotonic() < deadline:
            if not child.running:
                raise RuntimeError(
                    f"the echo server exited; see {child.log_path}:\n{child.log_tail()}"
                )
            try:
                with grpc.insecure_channel(self.endpoints[0]) as channel:
                    stub = pb_grpc.KeyManagementServiceStub(channel)
                    stub.CreateKey(pb.CreateKeyRequest(), timeout=1.0)
                return
            except grpc.RpcError:
                time.sleep(0.05)  # polling pace while the process starts
        raise RuntimeError(f"the echo server was not ready in time; see {child.log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster_echo",
        description="A kms.v1.KeyManagementService answering CreateKey with an empty"
        " response and doing nothing else (bench.cluster --echo-ceiling).",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="serve with gRPC's threaded server and this many workers (0: grpc.aio)",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        _serve_threaded(args.port, args.threads)
    else:
        asyncio.run(_serve(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
