"""Moving Raft messages between nodes: the wire codec, the gRPC transport, an in-memory one."""
