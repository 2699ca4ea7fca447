"""Benchmarks of the OpenELM server: checkpoints, a serving benchmark, and the tutorial baseline.

See BENCHMARKS.md at the repository root for how to run them and the numbers they gave.
"""
