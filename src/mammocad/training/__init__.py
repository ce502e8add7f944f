"""Training: losses, task definitions and the training loop."""
