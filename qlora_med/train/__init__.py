"""Running curriculum stages: what trains, the trainer, checkpoints, OOM fallback, auto batch, multi-process, reports."""
