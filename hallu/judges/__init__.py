"""Judges for the revise stage and for GPT-judged benchmarks (openai, ...)."""
