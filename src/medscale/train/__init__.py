"""Training: the loop (`loop.py`), the DeepSpeed engine, optimizer groups, numerics guard, EMA, losses,
throughput, tracking, stop signals (`preemption`), the local launch (`launch`) and one writer per run
directory (`runlock`). What the model learns is the objective's business (`medscale.tasks`).

Nothing is imported here, so ``import medscale.train.tracking`` does not pull in DeepSpeed.
"""
