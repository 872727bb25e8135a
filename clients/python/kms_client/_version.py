"""The kmsd-client version, in one place for the package, kmsctl and packaging."""

__version__ = "0.1.0"
