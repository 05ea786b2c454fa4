"""Checking and measuring a build: ``verify`` (every subset against the PyTorch model), ``bench`` and the benchmark
suite behind ``make bench``, and the schedule plots."""
