"""The training runtime: trainer, DeepSpeed, checkpoint state, collectives, preemption, metrics, tracking."""
