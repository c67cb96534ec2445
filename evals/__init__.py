"""Benchmarks, one module each: pope, chair, shr. Installed as ``hallu.evals``."""
