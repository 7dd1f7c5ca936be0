"""Tasks: one module per task (``segmentation``, ``registration``), each wiring a model, a loss, metrics and
data for the generic :class:`medfast.train.Trainer` (see :class:`medfast.train.Task`). ``config.task`` names
the module; it is imported on first use."""
