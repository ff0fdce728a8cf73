"""Training: engines (how a step runs), the engine-agnostic loop, schedules, metrics, checkpoints."""
