"""Checkpoints (complete or ignored, a dict of stateful parts) and the final weights of a run
(fp32 master weights from DeepSpeed's checkpoint, with their preprocessing record)."""
