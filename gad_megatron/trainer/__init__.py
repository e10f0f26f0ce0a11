"""Training: megatron DDP + optimizer engine (this module), the GAD loop (coming with the trainer issue)."""
