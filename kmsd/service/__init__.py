"""The KMS operations, independent of gRPC: validate, build commands, propose, read."""
