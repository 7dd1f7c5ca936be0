"""Tasks: what model, losses, metrics and data each task wires together."""
