"""`medscale export` of real DeepSpeed runs on 2 ranks (torchrun): from model.pt and from a checkpoint, with
ONNX; plain timm, ONNX Runtime and `medscale eval` agree with the run's own evaluation model. And a
crafted pickle planted in a real checkpoint is refused, by the resume and by the export, unrun. The
fp32 masters of ZeRO-1/2 checkpoints written by 1 and 2 ranks, read tensor by tensor, are DeepSpeed's
zero_to_fp32 consolidation bit for bit; those of a bf16 ZeRO-1 run (BF16_Optimizer) are its model.pt's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import subprocess_env, tiny_run, write_shards
from medscale.checkpoint.export import export_run
from medscale.dist import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("export") / "shards"
    write_shards(root, {"train": [16, 16], "val": [4], "test": [12]}, size=16)
    return root


def _train(tmp: Path, shards: Path, ds_config: str, precision: str) -> Path:
    """A finished 2-rank run with EMA (4 steps, checkpoints at 2 and 4)."""
    out = tmp / f"{Path(ds_config).stem}_{precision}"
    path = tiny_run(tmp / f"{out.name}.yaml", shards, out_dir=str(out), data={"num_workers": 0},
                    train={"steps": 4, "lr": 1e-3, "log_every": 2, "precision": precision, "ema_decay": 0.6},
                    dist={"deepspeed_config": ds_config}, eval={"bootstrap": 20, "aggregate": "patient"},
                    checkpoint={"every_steps": 2, "keep": 2})
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "medscale.cli",
           "train", "--config", str(path)]
    r = subprocess.run(cmd, cwd=tmp, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    return out


def _medscale(*args: str, code: int = 0) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "medscale.cli", *args], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == code, (r.stdout + r.stderr)[-5000:]
    return r


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == torch.float32 and torch.equal(v, b[k]), k


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, shards):
    return _train(tmp_path_factory.mktemp("runs"), shards, "cpu_zero3.json", "bf16")


def test_zero3_export_matches_the_run_in_timm_onnx_and_eval(zero3_run, tmp_path):
    import onnxruntime as ort
    import timm

    from medscale.checkpoint.weights import load_run_model

    run = zero3_run
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert tag == "step00000004"
    final, ckpt = tmp_path / "final", tmp_path / "ckpt"
    printed = _medscale("export", str(run), "--out", str(final), "--onnx").stdout
    assert "ema weights of model.pt" in printed and "max |onnxruntime - torch|" in printed
    assert "ema weights of checkpoint step00000004" in _medscale("export", str(run), "--checkpoint", tag, "--out",
                                                                 str(ckpt), "--onnx").stdout
    _medscale("export", str(run), "--no-ema", "--out", str(tmp_path / "final_trained"))
    _medscale("export", str(run), "--checkpoint", tag, "--no-ema", "--out", str(tmp_path / "ckpt_trained"))

    # The same fp32 tensors whichever way: model.pt (gathered from the live ZeRO-3 engine) and the
    # checkpoint (DeepSpeed's lazy consolidation of the partitions; the EMA from parts.pt).
    saved = torch.load(run / "model.pt", weights_only=True)
    _same(_weights(final), saved["model_ema"])
    _same(_weights(ckpt), saved["model_ema"])
    _same(_weights(tmp_path / "final_trained"), saved["model"])
    _same(_weights(tmp_path / "ckpt_trained"), saved["model"])
    assert any(not torch.equal(saved["model"][k], v) for k, v in saved["model_ema"].items())

    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    for out, use_ema in ((final, True), (ckpt, True), (tmp_path / "ckpt_trained", False)):
        config = json.loads((out / "config.json").read_text())
        assert config["timm"] == {"model_name": "test_vit",
                                  "kwargs": {"num_classes": 2, "in_chans": 1, "img_size": 16, "patch_size": 8},
                                  "pretrained_cfg_overlay": {"num_classes": 2, "input_size": [1, 16, 16]}}
        assert config["preprocess"]["class_names"] == ["normal", "lesion"] and config["input_size"] == [1, 16, 16]
        spec = config["timm"]
        plain = timm.create_model(spec["model_name"], pretrained=True, pretrained_cfg_overlay=dict(
            file=str(out / "model.safetensors"), num_classes=2, input_size=(1, 16, 16)), **spec["kwargs"]).eval()
        reference, _ = load_run_model(run, use_ema=use_ema)
        with torch.no_grad():
            want = reference(x)
            torch.testing.assert_close(plain(x), want, rtol=0, atol=1e-5)
        if "onnx" in config:
            got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
                None, {"image": x.numpy()})[0]
            assert np.abs(got - want.numpy()).max() <= 1e-4 and config["onnx"]["max_abs_diff"] <= 1e-4

    # `medscale eval` of the run, and of a new run directory whose model.pt holds only the exported
    # safetensors and config.json's preprocessing record: the same metrics, to the last digit.
    fresh = tmp_path / "from_export"
    fresh.mkdir()
    shutil.copy(run / "config.yaml", fresh / "config.yaml")
    record = json.loads((final / "config.json").read_text())["preprocess"]
    (fresh / "preprocess.json").write_text(json.dumps(record))
    torch.save({"model": _weights(final), "preprocess": record}, fresh / "model.pt")
    _medscale("eval", "--run", str(run), "--output", str(tmp_path / "eval_run.json"))
    _medscale("eval", "--run", str(fresh), "--output", str(tmp_path / "eval_export.json"))
    before = json.loads((tmp_path / "eval_run.json").read_text())
    after = json.loads((tmp_path / "eval_export.json").read_text())
    assert before == after and before["n_samples"] == 12
    # (training's own eval.json ran the bf16 engine; medscale eval runs the fp32 weights, so it may differ)


class _Payload:
    """Unpickling it writes `marker`: what a crafted file could do with any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_planted_pickle_is_refused_by_resume_and_export(zero3_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    tag = (run / "checkpoints" / "latest").read_text().strip()
    target = run / "checkpoints" / tag / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    marker = tmp_path / "marker"
    torch.save({"module": {}, "ds_version": "0.19.8", "x": _Payload(marker)}, target)
    config = tmp_path / "config.yaml"
    config.write_text((run / "config.yaml").read_text().replace(str(zero3_run), str(run)))

    # The rerun on 2 ranks resumes from the newest checkpoint: every rank refuses it before DeepSpeed opens it.
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "medscale.cli",
           "train", "--config", str(config)]
    r = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.count(f"medscale train: error: refusing to load {target}: it holds global builtins.exec") == 2
    # On 1 rank the resume converts the 2-rank checkpoint (DeepSpeed's ds_to_universal): refused before that too.
    r = _medscale("train", "--config", str(config), code=2)
    assert f"refusing to load {target}: it holds global builtins.exec" in r.stderr and "Traceback" not in r.stderr
    assert not list((run / "checkpoints").glob("*universal*"))
    r = _medscale("export", str(run), "--checkpoint", tag, "--out", str(tmp_path / "x"), code=2)
    assert f"refusing to load {target}: it holds global builtins.exec" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()


def test_zero1_bf16_optimizer_checkpoint_exports_its_fp32_masters(tmp_path, shards):
    """bf16 at ZeRO-1 runs DeepSpeed's BF16_Optimizer, whose files zero_to_fp32 refuses: the export puts each
    tensor together from the two ranks' partitions by the optimizer's own slice map."""
    run = _train(tmp_path, shards, "cpu_zero1.json", "bf16")
    opt = sorted((run / "checkpoints" / "step00000004").glob("*optim_states.pt"))
    assert [p.name for p in opt] == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    with pytest.raises(ValueError, match="is not a zero checkpoint"):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), "step00000004", lazy_mode=True)
    _medscale("export", str(run), "--checkpoint", "latest", "--no-ema", "--out", str(tmp_path / "trained"))
    _medscale("export", str(run), "--checkpoint", "latest", "--out", str(tmp_path / "ema"))
    saved = torch.load(run / "model.pt", weights_only=True)
    _same(_weights(tmp_path / "trained"), saved["model"])
    _same(_weights(tmp_path / "ema"), saved["model_ema"])


# -------------------------------------------------------------------------------------------------
# fp32 ZeRO-1/2: each tensor from the slice map, bit for bit DeepSpeed's zero_to_fp32
# -------------------------------------------------------------------------------------------------

# One process per rank builds an fp32 engine for each variant in turn (one process start for all of them),
# takes two steps on data of its own and saves through medscale's Checkpointer.
ZERO12_RANK = r"""
import json, sys, torch
from pathlib import Path
from medscale.checkpoint.checkpointer import Checkpointer, TrainState
from medscale.config import CheckpointConfig, RunConfig, from_dict, to_dict
from medscale.dist import init_distributed, shutdown
from medscale.models import create_model
from medscale.train.engine import build_engine, resolve_ds_config

variants, out = json.loads(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
dist = init_distributed(timeout_minutes=2)
for name, v in variants.items():
    ds = json.loads(Path(f"ds_configs/cpu_zero{v['stage']}.json").read_text())
    ds["zero_optimization"].update(v.get("zero", {}))
    ds_path = out / f"{name}_ds.json"
    if dist.is_main:
        ds_path.write_text(json.dumps(ds))
    torch.distributed.barrier()
    cfg = from_dict(RunConfig, {"out_dir": str(out / name),
                                "model": {"name": "test_vit", "patch_size": 8, "num_classes": 3},
                                "train": {"micro_batch_size": 2, "precision": "fp32", "lr": 3e-3, "warmup_steps": 1,
                                          "steps": 2, "ema_decay": 0.0}})
    torch.manual_seed(0)
    model = create_model(cfg.model, img_size=16, in_chans=1)
    for frozen in v.get("frozen", []):
        model.get_parameter(frozen).requires_grad_(False)
    engine = build_engine(model, cfg, dist.world, resolve_ds_config(cfg, dist.world, ds_path))
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(2 * dist.world, 1, 16, 16, generator=g)[2 * dist.rank:2 * dist.rank + 2]
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    ck = Checkpointer(CheckpointConfig(every_steps=1), out / name, dist, last_step=2, config=to_dict(cfg))
    ck.save(engine, 2, {"train": TrainState(step=2)})
    del engine
shutdown()
"""

ZERO12_VARIANTS = {
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    # per-parameter alignment padding inside the flat groups, and a frozen parameter (ZeRO-2 saves it whole)
    "zero2_aligned_frozen": {"stage": 2, "zero": {"parameter_alignment": True}, "frozen": ["pos_embed"]},
    # the flat groups in round-robin order, which the slice map does not follow: read by param_shapes
    "zero1_round_robin": {"stage": 1, "zero": {"round_robin_gradients": True}},
}


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def zero12_runs(request, tmp_path_factory):
    world, out, port = request.param, tmp_path_factory.mktemp(f"zero12_{request.param}"), free_port()
    procs = [subprocess.Popen([sys.executable, "-c", ZERO12_RANK, json.dumps(ZERO12_VARIANTS), str(out)], cwd=ROOT,
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(subprocess_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(world)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [log[-3000:] for log in logs]
    return world, out


@pytest.mark.parametrize("variant", list(ZERO12_VARIANTS))
def test_zero12_fp32_export_reads_the_slice_map_bit_for_bit_like_zero_to_fp32(zero12_runs, variant, tmp_path,
                                                                                monkeypatch, caplog):
    """fp32 ZeRO-1/2, written by 1 and 2 ranks: the export's tensors, put together one at a time from the
    optimizer files' partitions, are DeepSpeed's get_fp32_state_dict_from_zero_checkpoint (which concatenates
    each group's partitions first) bit for bit, and so is model.safetensors."""
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    from medscale.checkpoint import zero_weights
    from medscale.checkpoint.safety import safe_load

    world, out = zero12_runs
    run, tag = out / variant, "step00000002"
    ckpt = run / "checkpoints" / tag
    optim = sorted(p.name for p in ckpt.glob("*optim_states.pt"))
    assert optim == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    want = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag)  # the reference

    def refused(*args, **kwargs):
        raise AssertionError("ZeRO-1/2 went through get_fp32_state_dict_from_zero_checkpoint")

    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint", refused)
    states = safe_load(zero_weights.model_states_file(ckpt))
    with caplog.at_level("WARNING", logger="medscale.checkpoint.export"):
        masters = zero_weights.master_weights(run / "checkpoints", tag, ckpt, states)
    reordered = variant == "zero1_round_robin" and world == 2  # round robin over 1 rank keeps the order
    assert ("disagrees with the order of param_shapes" in caplog.text) == reordered
    buffers = set(states["buffer_names"])
    assert masters.keys() == want.keys() - buffers
    assert all(isinstance(masters[k], zero_weights._Fragments) for group in states["param_shapes"] for k in group)
    split = 0
    for name, lazy in masters.items():
        got = lazy.contiguous()
        assert got.dtype == want[name].dtype == torch.float32 and got.shape == want[name].shape, name
        assert torch.equal(got.view(torch.int32), want[name].view(torch.int32)), name  # the same bits
        split += isinstance(lazy, zero_weights._Fragments) and len(lazy.pieces) > 1
    assert split >= (world > 1)  # at 2 ranks a tensor is cut between the partitions
    if variant == "zero2_aligned_frozen":
        assert "pos_embed" in states["frozen_param_fragments"] and "pos_embed" in masters

    # The whole export: model.safetensors holds the reference's tensors (the module's names, its buffers).
    result = export_run(run, tmp_path / "e", checkpoint="latest", use_ema=False)
    assert result.source == {"run": str(run), "file": None, "checkpoint": tag, "step": 2, "weights": "trained"}
    exported = _weights(tmp_path / "e")
    assert exported.keys() == states["module"].keys()
    for name, value in exported.items():
        assert torch.equal(value, want[name].float()), name
        # in fp32 the engine's module holds its masters' values too (DeepSpeed saved it in the model states)
        assert torch.equal(value, states["module"][name]), name
