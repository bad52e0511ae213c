"""Benchmarks of this project against its peers (run as scripts or ``python -m benchmarks.NAME``); shared code in ``harness``."""
