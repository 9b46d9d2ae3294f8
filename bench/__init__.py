"""Benchmarks of the DSP data path (`make bench`); not part of `make test`."""
