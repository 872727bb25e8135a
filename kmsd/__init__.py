"""kmsd: a self-hosted Key Management Service modelled on AWS KMS, served over gRPC."""

__version__ = "0.1.0"
