"""Benchmarks: the workbench's training path against a plain PEFT + Trainer script (see README.md)."""
