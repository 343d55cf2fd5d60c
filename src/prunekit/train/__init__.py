"""Training with masks on: sparsity schedules, distillation and fine-tuning, trainer callbacks,
and iterative structured pruning (prune, fine-tune, repeat)."""
