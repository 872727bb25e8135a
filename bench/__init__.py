"""Benchmarks of kmsd, each runnable as `python -m bench.<name>`; see bench/README.md.

The data-plane benchmark (`bench.data_plane`, `bench.bare_service`, `bench._process`)
is described, with its figures, in docs/performance.md.
"""
