"""The `medscale` command: prep, train, eval, export, report, inspect, demo.

Configs are resolved and checked here, before any worker or rank is started, so a typo or a
bad value fails in a second with a message naming the key instead of minutes into a job.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

from medscale.config import ConfigError, RunConfig, load_config
from medscale.errors import UserError
from medscale.prep.config import PrepConfig
from medscale.resources import resolve_resource

__all__ = ["main"]

log = logging.getLogger("medscale")


def _split_overrides(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `key=value` overrides from positional paths (a path may exist and contain '=')."""
    paths, overrides = [], []
    for item in items:
        (overrides if "=" in item and not Path(item).exists() else paths).append(item)
    return paths, overrides


# ---------------------------------------------------------------------------------------------
# prep
# ---------------------------------------------------------------------------------------------


def cmd_prep(args: argparse.Namespace) -> int:
    from medscale.prep.deid import load_pseudonym_key
    from medscale.prep.job import PrepJob
    from medscale.prep.merge import merge
    from medscale.prep.pipeline import check_prep, run_prep
    from medscale.prep.plan import prepare_output
    from medscale.report.console import print_manifest_summary

    if args.debug:
        os.environ["MEDSCALE_DEBUG"] = "1"  # worker processes inherit it
    from medscale.prep.dicom import quiet_decoder_logs

    quiet_decoder_logs(bool(os.environ.get("MEDSCALE_DEBUG")))
    out = Path(args.out)
    log_dir = Path(args.log_dir) if args.log_dir else None
    if args.merge:
        print_manifest_summary(merge(out, log_dir=log_dir))
        return 0
    inputs, overrides = _split_overrides(args.inputs)
    if not inputs:
        raise ConfigError("medscale prep needs at least one INPUT (directory, file, or .txt file list)")
    cfg = load_config(PrepConfig, args.recipe, overrides)
    labels = args.labels or (str(_recipe_relative(args.recipe, cfg.labels_csv)) if cfg.labels_csv else None)
    if cfg.redact_rules:
        rules = _recipe_relative(args.recipe, cfg.redact_rules)
        if not rules.is_file():
            raise ConfigError(f"redact_rules file {rules} does not exist")
        cfg.redact_rules = str(rules)
    if not 0 <= args.task_index < args.num_tasks:
        raise ConfigError(f"--task-index {args.task_index} must be in [0, --num-tasks {args.num_tasks})")
    for flag, value in (("--workers", args.workers), ("--chunk-files", args.chunk_files)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    key = load_pseudonym_key(args.key_file, allow_random=args.random_key)
    job = PrepJob(inputs=inputs, out=out, cfg=cfg, key=key, labels_csv=labels, workers=args.workers,
                  task_index=args.task_index, num_tasks=args.num_tasks, chunk_files=args.chunk_files,
                  log_dir=log_dir)
    t0 = time.perf_counter()
    # Array tasks share one output directory: each resumes what is there.
    resume = args.resume or args.num_tasks > 1
    prepare_output(out, resume=resume, overwrite=args.overwrite, log_dir=log_dir, dry_run=True)  # refusals first
    checked = check_prep(job)  # before --out is touched: a prep that fails now leaves it as it was
    prepare_output(out, resume=resume, overwrite=args.overwrite, log_dir=log_dir)
    manifest = run_prep(job, checked)
    if manifest is None:
        print(f"task {args.task_index}/{args.num_tasks} done in {time.perf_counter() - t0:.1f}s; "
              f"run `medscale prep --merge --out {out}` when all tasks are done")
    else:
        print_manifest_summary(manifest, seconds=time.perf_counter() - t0)
    return 0


def _recipe_relative(recipe: str | None, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or recipe is None else Path(recipe).parent / p


# ---------------------------------------------------------------------------------------------
# train / eval
# ---------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(RunConfig, args.config, args.overrides)
    if args.get:
        for key in args.get:  # for batch scripts: the resolved value of a key, one per line
            print(_resolved(cfg, key))
        return 0
    from medscale.commands import train

    return train(cfg)


def _resolved(cfg: RunConfig, key: str) -> str:
    from medscale.config import to_dict

    value: object = to_dict(cfg)
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"--get {key}: no such config key")
        value = value[part]
    if isinstance(value, (dict, list)):
        import json

        return json.dumps(value)
    return str(value)


def cmd_eval(args: argparse.Namespace) -> int:
    from medscale.commands import evaluate
    from medscale.report.console import print_eval

    result, path = evaluate(args.run, args.overrides, split=args.split, output=args.output)
    if path is not None:  # rank 0
        print_eval(result, title=f"{result['split']} ({path})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from medscale.checkpoint.export import export_run
    from medscale.checkpoint.onnx import ONNX_TOLERANCE, OnnxParityError

    try:
        r = export_run(args.run, args.out, checkpoint=args.checkpoint, use_ema=args.ema, onnx=args.onnx,
                       part="encoder" if args.encoder_only else args.part)
    except OnnxParityError as e:  # not the user's input, yet one line says it all
        print(f"medscale export: error: {e}", file=sys.stderr)
        return 1
    origin = f"checkpoint {r.source['checkpoint']}" if r.source["checkpoint"] else r.source["file"]
    part = f" ({r.source['part']} only: load it with model.weights= in a fine-tuning config)" if "part" in r.source else ""
    print(f"{r.weights}: {r.tensors} tensors, {r.bytes / 1e6:.1f} MB, {r.source['weights']} weights of {origin}{part}")
    print(f"{r.config}: timm architecture, arguments and preprocessing")
    if r.onnx is not None:
        print(f"{r.onnx}: max |onnxruntime - torch| = {r.onnx_max_abs_diff:.3g} (tolerance {ONNX_TOLERANCE:g})")
    for note in r.notes:
        print(note)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from medscale.report.html import write_report

    path = write_report(args.run, args.out)
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------
# inspect / demo
# ---------------------------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    from medscale.report.console import inspect_shards

    return inspect_shards(args.shards, verify=args.verify, dump=args.dump, dump_dir=args.dump_dir)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.pretrain:
        from medscale.demo import run_pretrain_demo

        if args.config:
            raise ConfigError("medscale demo --pretrain uses configs/demo_mae.yaml and configs/demo.yaml; "
                              "drop --config (KEY=VALUE overrides apply to all three runs)")
        return run_pretrain_demo(out=Path(args.out), overrides=args.overrides,
                                 patients=200 if args.patients is None else args.patients,
                                 images_per_patient=args.images_per_patient, workers=args.workers,
                                 labelled_fraction=args.labelled_fraction, pretrain_steps=args.pretrain_steps,
                                 finetune_steps=args.finetune_steps)
    from medscale.demo import run_demo

    args.patients = 120 if args.patients is None else args.patients
    return run_demo(out=Path(args.out), config=args.config, overrides=args.overrides,
                    patients=args.patients, images_per_patient=args.images_per_patient, workers=args.workers)


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medscale",
        description="Train vision transformers on medical-imaging corpora: prep -> train -> eval.",
        epilog="Run `medscale COMMAND --help` for each command. Configs take dotted overrides: train.lr=3e-4",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pp = sub.add_parser("prep", help="DICOM/photo corpus -> de-identified, patient-split WebDataset shards",
                        description="Turn raw DICOM files and JPEG/PNG photos into de-identified, patient-split "
                        "tar shards with manifest.json and wids indexes; the reject log (rejects.jsonl, which names "
                        "source files) goes to --log-dir, never into --out. key=value items, before or "
                        "after the options, override the recipe (e.g. encoding=png splits='{train: 0.9, test: 0.1}').")
    pp.add_argument("inputs", nargs="*", metavar="INPUT", help="directories, files, .txt file lists, or key=value overrides")
    pp.add_argument("--out", required=True, help="output directory for shards and manifest")
    pp.add_argument("--log-dir", help="operator logs that name source files (rejects.jsonl); default OUT.logs "
                    "beside --out, never inside it: keep it when you share the shards")
    pp.add_argument("--debug", action="store_true", help="show DICOM decoders' own messages and tracebacks")
    pp.add_argument("--labels", help="labels CSV (overrides the recipe's labels_csv)")
    pp.add_argument("--recipe", help="recipe YAML, or a packaged one such as data_prep/demo.yaml; "
                    "default: PrepConfig defaults")
    pp.add_argument("--workers", type=int, default=1, help="worker processes on this node (default 1)")
    pp.add_argument("--key-file", help="pseudonym key file (or set the env var MEDSCALE_PSEUDONYM_KEY)")
    pp.add_argument("--random-key", action="store_true", help="one-off random pseudonym key (pseudonyms will not match other runs)")
    pp.add_argument("--resume", action="store_true", help="continue an interrupted prep in --out")
    pp.add_argument("--overwrite", action="store_true", help="delete --out and start again")
    pp.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0) or 0),
                    help="this task's index in a Slurm array (default $SLURM_ARRAY_TASK_ID or 0)")
    pp.add_argument("--num-tasks", type=int, default=1, help="tasks in the array; run --merge after all finish")
    pp.add_argument("--chunk-files", type=int, default=1000, help="inputs per chunk, the unit of parallel work and resume")
    pp.add_argument("--merge", action="store_true", help="only build manifest.json from finished tasks in --out")
    pp.set_defaults(func=cmd_prep)

    pt = sub.add_parser("train", help="train a timm model with DeepSpeed on prepped shards",
                        description="Train with DeepSpeed. Outside a launcher, dist.nproc>1 starts the deepspeed "
                        "launcher on this node; under deepspeed, torchrun or srun it joins the existing ranks. The "
                        "newest complete checkpoint in out_dir is resumed (checkpoint.resume). out_dir holds run.lock "
                        "while the run trains: a second train on it exits 2 naming the holder; if this process is "
                        "killed, even with SIGKILL, its launcher and ranks die with it.",
                        epilog="SIGUSR1, SIGUSR2, SIGTERM or SIGINT stop the run cleanly: all ranks save one checkpoint "
                        "at the next step, RUN_DIR/stopped.json says where, and the exit code is 75 (EX_TEMPFAIL: run "
                        "the same command again to continue). Exit codes: 0 done, 75 stopped by a signal, 2 a "
                        "configuration or input error, 1 anything else. See docs/training.md for signals under each "
                        "launcher.")
    pt.add_argument("--config", required=True, help="run config YAML, or a packaged one such as configs/demo.yaml")
    pt.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-4")
    pt.add_argument("--get", action="append", metavar="KEY",
                    help="print the resolved value of a config key (e.g. out_dir) and exit; repeatable")
    pt.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # some launchers pass it
    pt.set_defaults(func=cmd_train)

    pe = sub.add_parser("eval", help="evaluate a finished run on a split (AUROC, AUPRC, CIs)",
                        description="Evaluate RUN/model.pt on a split of the run's shards; writes RUN/eval_SPLIT.json.")
    pe.add_argument("--run", required=True, help="run directory written by medscale train")
    pe.add_argument("--split", help="manifest split (default: data.test_split)")
    pe.add_argument("--output", help="where to write the metrics JSON")
    pe.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. eval.bootstrap=1000")
    pe.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # some launchers pass it
    pe.set_defaults(func=cmd_eval)

    px = sub.add_parser("export", help="a run's weights as model.safetensors + config.json for plain timm (and ONNX)",
                        description="Write DIR/model.safetensors and DIR/config.json (timm architecture, arguments, "
                        "input size, preprocessing). Default: RUN/model.pt's EMA weights when the run has them; "
                        "--checkpoint consolidates the fp32 weights of RUN/checkpoints/TAG instead.")
    px.add_argument("run", metavar="RUN_DIR", help="run directory written by medscale train")
    px.add_argument("--out", required=True, metavar="DIR", help="output directory")
    px.add_argument("--checkpoint", metavar="TAG", help="a checkpoint under RUN_DIR/checkpoints (or 'latest')")
    px.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                    help="the EMA weights (default when the run kept an EMA) or, with --no-ema, the trained ones")
    px.add_argument("--onnx", action="store_true",
                    help="also write model.onnx (dynamic batch) and check it with ONNX Runtime (tolerance 1e-4)")
    px.add_argument("--encoder-only", action="store_true",
                    help="an MAE pretraining run (train.objective=mae): write its ViT encoder alone, under the plain "
                    "timm model's key names, for model.weights= in a fine-tuning config")
    px.add_argument("--part", help="a part of the model that the run's objective exports on its own (--encoder-only "
                    "is --part encoder); default: the objective's own choice")
    px.set_defaults(func=cmd_export)

    pw = sub.add_parser("report", help="figures and one self-contained HTML page of a run",
                        description="Draw RUN_DIR's training curves, evaluation metrics, ROC/PR curves, calibration, "
                        "confusion matrix and sample images as PNGs, and write DIR/report.html with every figure "
                        "embedded.")
    pw.add_argument("run", metavar="RUN_DIR", help="run directory written by medscale train")
    pw.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/report)")
    pw.set_defaults(func=cmd_report)

    pi = sub.add_parser("inspect", help="summarise shards, verify checksums, dump sample PNGs",
                        description="Print the manifest summary of a prep output; --verify checks every shard's "
                        "sha256; --dump N writes N samples as 8-bit PNG previews.")
    pi.add_argument("shards", help="prep output directory (with manifest.json)")
    pi.add_argument("--verify", action="store_true", help="recompute and check every shard's sha256")
    pi.add_argument("--dump", type=int, default=0, metavar="N", help="write N samples as PNG previews")
    pi.add_argument("--dump-dir", default="inspect_png", help="where --dump writes (default inspect_png)")
    pi.set_defaults(func=cmd_inspect)

    pd = sub.add_parser("demo", help="end-to-end demo: synthetic CT -> prep -> DeepSpeed training -> eval",
                        description="Write a synthetic DICOM CT corpus with fake patient identities, prep it into "
                        "patient-split shards, train a small ViT with DeepSpeed ZeRO-2 on 2 local ranks, and evaluate "
                        "on held-out patients (DIR/run/eval.json).")
    pd.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    pd.add_argument("--config", default=None, help="run config (default: configs/demo.yaml or the packaged copy)")
    pd.add_argument("--patients", type=int, default=None, help="synthetic patients (default 120; --pretrain: 200)")
    pd.add_argument("--images-per-patient", type=int, default=5, help="slices per patient (default 5)")
    pd.add_argument("--workers", type=int, default=2, help="prep worker processes (default 2)")
    pd.add_argument("--pretrain", action="store_true",
                    help="masked-autoencoder pretraining with the labels hidden, then fine-tuning on a labelled "
                    "fraction of the training patients against training from scratch on it (same steps); both "
                    "AUROCs with 95%% CIs on held-out patients go to DIR/pretrain_summary.json")
    pd.add_argument("--labelled-fraction", type=float, default=0.1,
                    help="--pretrain: fraction of the training patients whose labels fine-tuning sees (default 0.1)")
    pd.add_argument("--pretrain-steps", type=int, default=None,
                    help="--pretrain: MAE steps (default: configs/demo_mae.yaml's)")
    pd.add_argument("--finetune-steps", type=int, default=None,
                    help="--pretrain: steps of each fine-tuning run (default: configs/demo.yaml's)")
    pd.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run config overrides, e.g. train.steps=50")
    pd.set_defaults(func=cmd_demo)
    return p


def _resolve_resources(args: argparse.Namespace) -> None:
    """Point --config and --recipe at the user's file, or else at the packaged copy of that name."""
    for attr, kind in (("config", "configs"), ("recipe", "data_prep")):
        if getattr(args, attr, None):
            setattr(args, attr, str(resolve_resource(getattr(args, attr), kind, f"--{attr}")))


def _pin_build_environment() -> None:
    """One ninja and one extension cache for every medscale process of this environment.

    DeepSpeed JIT-builds an op at start-up into torch's extension cache. Processes that find
    different ninja versions on PATH (a job under srun with the venv on PATH, a launcher run without
    it) take each other's build as stale and rebuild it, 25-70 s at every start (measured on this
    project's CI machine). So the interpreter's own bin directory goes first on PATH, and inside a
    virtual environment the cache lives in it, unless TORCH_EXTENSIONS_DIR is set.
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")


# The positional list of each command that takes KEY=VALUE overrides (and, for prep, its inputs).
_TRAILING = {"prep": "inputs", "train": "overrides", "eval": "overrides", "demo": "overrides"}


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse with KEY=VALUE overrides (and prep's inputs) accepted anywhere, before or after the options.

    argparse fills a positional list once, from the items before the first option; the items after
    it come back unrecognised, and are added to that list here. An unknown option is still an error.
    """
    args, extra = parser.parse_known_args(argv)
    if extra:
        dest = _TRAILING.get(args.command)
        options = [x for x in extra if x.startswith("-")]
        if dest is None or options:
            parser.error(f"unrecognized arguments: {' '.join(options or extra)}")
        setattr(args, dest, [*getattr(args, dest), *extra])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done, 2 bad config or input (one line), 1 anything else.

    Only a `UserError` counts as bad input: any other exception is a bug or an environment failure,
    so it keeps its traceback rather than passing for a typo. MEDSCALE_DEBUG=1 adds the traceback
    to user errors too.
    """
    args = _parse(build_parser(), argv)
    _pin_build_environment()
    from medscale.logs import setup_logging

    setup_logging()  # once per process, the rank taken from the launcher's variables
    try:
        _resolve_resources(args)
        return args.func(args)
    except UserError as e:
        if os.environ.get("MEDSCALE_DEBUG"):
            traceback.print_exc()
        print(f"medscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print(f"medscale {args.command}: failed with an unexpected error (traceback above)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
