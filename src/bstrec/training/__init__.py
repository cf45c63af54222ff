"""Training: pre-built tensors, one plain training loop, checkpoints."""
