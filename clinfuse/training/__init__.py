"""Training stage: losses for class imbalance, sampling, the trainer loop, checkpoints, distributed."""
