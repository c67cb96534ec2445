"""`hallu rollout` (placeholder until the engine lands)."""
