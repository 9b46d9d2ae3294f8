"""Robustness harnesses: frame fuzzer, config fuzzer and chaos run against real DSP clusters."""
