"""Benchmarks shipped with the package so that `polyray bench` works from an install."""
