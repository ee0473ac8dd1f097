"""Training: packed rows and the answer-only loss, checkpoints, learning-rate schedules, progress and metrics."""
