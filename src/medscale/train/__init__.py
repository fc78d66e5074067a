"""Training: the loop (`loop.py`), the DeepSpeed engine, optimizer groups, numerics guard, EMA, losses,
throughput, tracking, and the task seam (`tasks.py`) through which an objective plugs into the loop.

Nothing is imported here, so ``import medscale.train.losses`` does not pull in DeepSpeed.
"""
