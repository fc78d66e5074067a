"""`medscale export` of real DeepSpeed runs on 2 ranks (torchrun): from model.pt and from a checkpoint, with
ONNX; plain timm, ONNX Runtime and `medscale eval` agree with the run's own evaluation model. And a
crafted pickle planted in a real checkpoint is refused, by the resume and by the export, unrun.
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
import yaml

from conftest import subprocess_env, write_shards
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
    config = {
        "out_dir": str(out),
        "data": {"shards": str(shards), "image_size": 16, "channels": 1, "num_workers": 0, "shuffle_block": 16},
        "model": {"name": "test_vit", "patch_size": 8, "num_classes": 2},
        "train": {"steps": 4, "micro_batch_size": 4, "warmup_steps": 1, "lr": 1e-3, "log_every": 2,
                  "precision": precision, "ema_decay": 0.6},
        "dist": {"deepspeed_config": str(ROOT / "ds_configs" / ds_config)},
        "eval": {"micro_batch_size": 4, "bootstrap": 20, "aggregate": "patient"},
        "checkpoint": {"every_steps": 2, "keep": 2},
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
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
