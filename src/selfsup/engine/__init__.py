"""The training engine: one loop, schedules, checkpoints."""
