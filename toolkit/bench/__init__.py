"""Benchmarks: inference, training, per request, and load on `toolkit serve`."""
