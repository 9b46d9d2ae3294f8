"""Distributed Service Proxy (DSP) for DVS clusters, a Python re-implementation of the C
dsp_proxy."""

__version__ = "0.2.0"
