"""What `medscale train` and `medscale eval` do, beside the command line that parses them (`medscale.cli`).

The demo (`medscale.demo`) and the tests call these too: there is one training path and one
evaluation path, whoever starts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from medscale.config import RunConfig

__all__ = ["train", "evaluate"]


def train(cfg: RunConfig) -> int:
    """Train a run: outside a launcher with ``dist.nproc > 1``, through the deepspeed launcher on this
    node (`medscale.train.launch.relaunch`); else as this process's rank. Returns the exit code
    (0 done, 75 stopped by a signal after saving a checkpoint, the launcher's code otherwise).

    Raises:
        UserError: a bad manifest, a run directory in use, a taken port (before any rank starts).
    """
    from medscale.dist import launched
    from medscale.formats.manifest import load_manifest

    if not launched():
        load_manifest(cfg.data.shards)  # a bad manifest: one line here, before any rank or engine starts
    if not launched() and cfg.dist.nproc > 1:
        from medscale.train.launch import relaunch

        return relaunch(cfg, ["train"])
    from medscale.train.preemption import StopRequest

    # Before DeepSpeed is imported (seconds): a warning signal that arrives while this rank starts up is
    # then a clean stop at the first step, not death by the signal's default action.
    stop = StopRequest(cfg.checkpoint.every_minutes).install()
    from medscale.dist import shutdown
    from medscale.train.loop import run

    try:
        return run(cfg, stop)
    finally:
        stop.uninstall()  # an in-process caller (the demo) gets its own handlers back
        shutdown()  # before interpreter exit, or gloo may abort a rank that has finished (see shutdown)


def evaluate(run: str | Path, overrides: Sequence[str] = (), split: str | None = None,
             output: str | Path | None = None) -> tuple[dict[str, Any], Path | None]:
    """`medscale eval`: a finished run's weights on a split, on every rank of the launcher (or one).

    The model comes from the run's weights and their preprocessing record (the EMA when there is
    one and ``eval.use_ema``), built and evaluated by the run's own objective; the shards and the
    evaluation options from the run's config with `overrides`. Writes ``RUN/eval_<split>.json`` (or
    `output`) on rank 0; returns the result and that path (None on other ranks).
    """
    import torch

    from medscale.checkpoint.weights import load_run_model
    from medscale.config import load_config
    from medscale.data.loader import ShardStream
    from medscale.dist import init_distributed, shutdown
    from medscale.eval.results import save_result
    from medscale.formats.manifest import load_manifest
    from medscale.tasks.base import build_task

    run = Path(run)
    cfg = load_config(RunConfig, run / "config.yaml", overrides)
    manifest = load_manifest(cfg.data.shards)  # first: a manifest that is not plain data is refused at once
    dist = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model, _ = load_run_model(run, use_ema=cfg.eval.use_ema)
    model = model.to(device)
    split = split or cfg.data.test_split
    task = build_task(cfg, manifest)
    stream = ShardStream(cfg.data.shards, split, cfg.data, micro_batch=cfg.eval.micro_batch_size,
                         rank=dist.rank, world=dist.world, train=False, seed=cfg.train.seed, manifest=manifest,
                         labels=task.needs_labels)
    result = task.evaluate(model, stream, torch.float32, device)
    result["objective"] = task.name
    path = save_result(result, Path(output or run / f"eval_{split}.json")) if dist.is_main else None
    shutdown()
    return result, path
