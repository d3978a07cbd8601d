"""Pre-training (stage 9): the training loop, LR schedule, load balancing, checkpoints, logging."""
