"""Benchmarks of dalle_fast: harness.py (shared), one module per kernel family, pytest wrappers test_bench_*.py."""
