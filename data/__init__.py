"""Data-set builders (shapes, ...) and shipped assets with their provenance. Installed as ``hallu.data``."""
