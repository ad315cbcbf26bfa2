"""Training: optimizer, distribution strategy, checkpointed train loop (library, no flags)."""
