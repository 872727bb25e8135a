"""The replicated key store: durable commands, deterministic apply, snapshots."""

from kmsd.fsm.store import KeyStore

__all__ = ["KeyStore"]
