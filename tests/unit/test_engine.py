"""Unit tests of the engine pieces: DeepSpeed config resolution, parameter groups and LLRD, schedule,
losses, EMA, numerics guards, weights loading, Slurm environment, checkpoint choice.

Nothing here starts a process group; the multi-process runs are in test_engine_zero.py,
test_launch.py and test_train.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medscale.config import ConfigError, RunConfig, from_dict

ROOT = Path(__file__).resolve().parents[2]
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def run_cfg(**train) -> RunConfig:
    return from_dict(RunConfig, {"model": {"name": "test_vit", "patch_size": 8, "num_classes": 3},
                                 "data": {"image_size": 16, "channels": 1},
                                 "train": {"micro_batch_size": 4, **train}})


def tiny_vit(**kw):
    from medscale.config import ModelConfig
    from medscale.models import create_model

    torch.manual_seed(0)
    cfg = ModelConfig(name="test_vit", patch_size=8, num_classes=kw.pop("num_classes", 3), **kw)
    return create_model(cfg, img_size=kw.pop("img_size", 16), in_chans=1)


# -- DeepSpeed configs -------------------------------------------------------------------------------


def _precision_of(path: Path) -> list[str]:
    text = path.stem
    if "fp16" in text:
        return ["fp16"]
    if "bf16" in text:
        return ["bf16"]
    return ["bf16", "fp32"]  # "auto" configs follow train.precision


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.stem)
def test_every_ds_config_resolves_and_deepspeed_accepts_it(path, monkeypatch):
    from deepspeed.runtime.config import DeepSpeedConfig

    from medscale.train.engine import resolve_ds_config

    for precision in _precision_of(path):
        if precision == "fp16":  # GPU-only: check the file as a GPU run would see it
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        accum = 1 if path.stem == "cpu_zero0" else 2  # bf16 without ZeRO refuses accumulation (below)
        cfg = run_cfg(precision=precision, grad_accum=accum)
        ds = resolve_ds_config(cfg, world=1, path=path)
        assert ds["train_batch_size"] == 4 * accum and ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["gradient_accumulation_steps"] == accum and ds["gradient_clipping"] == cfg.train.grad_clip
        assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
        if precision == "bf16" and ds["zero_optimization"].get("stage", 0) > 0:
            assert ds["data_types"]["grad_accum_dtype"] == "fp32"
        if precision == "fp16":
            assert ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
        parsed = DeepSpeedConfig(ds)
        assert parsed.train_batch_size == 4 * accum and parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]
        monkeypatch.undo()


def test_gpu_configs_cover_every_stage_and_offload():
    names = {p.stem for p in DS_CONFIGS}
    for zero in ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"):
        assert {f"{zero}_fp16", f"{zero}_bf16"} <= names
    z2 = json.loads((ROOT / "ds_configs" / "zero2_offload_bf16.json").read_text())["zero_optimization"]
    z3 = json.loads((ROOT / "ds_configs" / "zero3_offload_bf16.json").read_text())["zero_optimization"]
    assert z2["offload_optimizer"]["device"] == "cpu" and z3["offload_param"]["device"] == "cpu"


def test_contradictions_name_both_values(tmp_path):
    from medscale.train.engine import resolve_ds_config

    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"'train_batch_size' is 64 .* \(4 x 1 x 2\) gives 8"):
        resolve_ds_config(run_cfg(), world=2, path=p)
    with pytest.raises(ConfigError, match=r"\[bf16\]: 'enabled' is False but train.precision=bf16 gives True"):
        resolve_ds_config(run_cfg(), world=1, path=ROOT / "ds_configs" / "zero2_fp16.json")
    with pytest.raises(ConfigError, match=r"'gradient_clipping' is 2.0 but train.grad_clip=1.0"):
        p.write_text(json.dumps({"gradient_clipping": 2.0}))
        resolve_ds_config(run_cfg(grad_clip=1.0), world=1, path=p)
    p.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        resolve_ds_config(run_cfg(), world=1, path=p)


def test_fp16_on_cpu_and_unsafe_combinations_are_refused(tmp_path):
    from medscale.train.engine import resolve_ds_config

    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_ds_config(run_cfg(precision="fp16"), world=1, path=ROOT / "ds_configs" / "zero2_fp16.json")
    with pytest.raises(ConfigError, match="bf16 without ZeRO"):
        resolve_ds_config(run_cfg(grad_accum=4), world=1, path=ROOT / "ds_configs" / "cpu_zero0.json")
    with pytest.raises(ConfigError, match="lamb with 2 ranks needs ZeRO stage 0 and fp32"):
        resolve_ds_config(run_cfg(optimizer="lamb"), world=2, path=ROOT / "ds_configs" / "cpu_zero2.json")
    ds = resolve_ds_config(run_cfg(optimizer="lamb", precision="fp32"), world=2, path=ROOT / "ds_configs" / "cpu_zero0.json")
    assert ds["zero_allow_untested_optimizer"] is True
    resolve_ds_config(run_cfg(optimizer="lamb"), world=1, path=ROOT / "ds_configs" / "cpu_zero2.json")


# -- optimizer -----------------------------------------------------------------------------------------


def test_param_groups_exempt_biases_norms_embeddings_tokens():
    from medscale.train.optim import param_groups

    model = tiny_vit()
    groups = param_groups(model, 0.05)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"} <= decay
    assert len(decay | no_decay) == len(list(model.parameters())) and not decay & no_decay
    assert all(g["lr_scale"] == 1.0 for g in groups)


def test_layer_wise_lr_decay_from_head_down():
    from medscale.train.optim import build_optimizer, param_groups

    model = tiny_vit()
    depth = len(model.blocks)
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.5) for n in g["names"]}
    assert scale["head.weight"] == 1.0  # timm's grouping (BEiT): the head is the top layer
    assert scale[f"blocks.{depth - 1}.mlp.fc1.weight"] == scale["norm.weight"] == 0.5
    assert scale["blocks.0.mlp.fc1.weight"] == 0.5 ** depth
    assert scale["patch_embed.proj.weight"] == scale["pos_embed"] == scale["cls_token"] == 0.5 ** (depth + 1)
    opt = build_optimizer(model, run_cfg(lr=1e-3, layer_decay=0.5).train, {})
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-3 * 0.5 ** k for k in range(depth + 2)][::-1])


def test_lamb_gets_one_group_per_tensor():
    from timm.optim import Lamb

    from medscale.train.optim import build_optimizer

    model = tiny_vit()
    opt = build_optimizer(model, run_cfg(optimizer="lamb").train, {})
    assert isinstance(opt, Lamb) and len(opt.param_groups) == len(list(model.parameters()))


def test_warmup_then_cosine_per_step():
    from medscale.train.optim import lr_factor

    cfg = run_cfg(steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    f = [lr_factor(s, cfg) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.01 + 0.99 * 0.5)  # half way through the cosine
    assert f[110] == pytest.approx(0.01) and all(a >= b for a, b in zip(f[10:], f[11:]))


# -- losses --------------------------------------------------------------------------------------------


def test_cross_entropy_with_smoothing_ignores_invalid_samples():
    from medscale.tasks.losses import ClassificationLoss

    logits, target = torch.randn(6, 3), torch.tensor([0, 2, 1, 1, 0, 2])
    valid = torch.tensor([True, True, False, True, True, False])
    loss = ClassificationLoss("multiclass", label_smoothing=0.1)
    assert loss(logits, target) == pytest.approx(F.cross_entropy(logits, target, label_smoothing=0.1).item(), rel=1e-6)
    assert loss(logits, target, valid) == pytest.approx(
        F.cross_entropy(logits[valid], target[valid], label_smoothing=0.1).item(), rel=1e-6)
    assert loss(logits, target, torch.zeros(6, dtype=torch.bool)).item() == 0.0


def test_bce_pos_weight_and_focal():
    from medscale.config import TrainConfig
    from medscale.tasks.losses import ClassificationLoss, build_loss, pos_weight_from_manifest

    logits, target = torch.randn(5, 4), torch.randint(0, 2, (5, 4)).float()
    pw = torch.tensor([1.0, 3.0, 0.5, 10.0])
    bce = ClassificationLoss("multilabel", pos_weight=pw)
    assert bce(logits, target) == pytest.approx(F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw).item(), rel=1e-6)
    # focal: gamma 0 is the plain loss; gamma > 0 down-weights confident, correct predictions most
    ce_logits, ce_target = torch.tensor([[4.0, 0.0], [0.2, 0.0]]), torch.tensor([0, 0])
    plain = ClassificationLoss("multiclass").per_sample(ce_logits, ce_target)
    focal = ClassificationLoss("multiclass", focal_gamma=2.0).per_sample(ce_logits, ce_target)
    assert torch.allclose(ClassificationLoss("multiclass", focal_gamma=0.0).per_sample(ce_logits, ce_target), plain)
    assert (focal / plain)[0] < 0.01 < (focal / plain)[1] < 1
    sig = ClassificationLoss("multilabel", focal_gamma=2.0)(logits, target)
    assert 0 < sig < bce(logits, target) * 10
    manifest = {"classes": ["a", "b"], "splits": {"train": {"samples": 100, "label_counts": {"a": 20, "b": 50}}}}
    assert pos_weight_from_manifest(manifest, "train") == [4.0, 1.0]
    loss = build_loss(TrainConfig(label_kind="multilabel", auto_pos_weight=True), manifest)
    assert loss.pos_weight.tolist() == [4.0, 1.0]
    with pytest.raises(ConfigError, match="no positives"):
        pos_weight_from_manifest({"classes": ["a"], "splits": {"train": {"samples": 3, "label_counts": {"a": 0}}}}, "train")


# -- EMA (single process; ZeRO-3 partitions in test_engine_zero.py) ------------------------------------


def test_ema_update_state_and_swap():
    from medscale.train.ema import ModelEma

    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEma(model, 0.75)
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update()
    state = ema.state_dict()
    assert torch.allclose(state["params"]["weight"], start["weight"] + 1.0) and state["updates"] == 1
    with ema.applied():
        assert torch.allclose(model.weight, start["weight"] + 1.0)
    assert torch.allclose(model.weight, start["weight"] + 4.0)  # trained weights back
    other = ModelEma(torch.nn.Linear(3, 2), 0.75)
    other.load_state_dict(state)
    assert torch.allclose(other.state_dict()["params"]["weight"], state["params"]["weight"])
    merged = ema.model_state_dict(model.state_dict())
    assert torch.allclose(merged["weight"], start["weight"] + 1.0)


def _sgd_run(steps: int, ema, model: torch.nn.Module, seed: int = 0) -> None:
    """`steps` real optimizer steps of a small regression, the EMA updated after each."""
    g = torch.Generator().manual_seed(seed)
    x, w_true = torch.randn(256, 8, generator=g), torch.randn(8, 1, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), x @ w_true).backward()
        opt.step()
        ema.update()


def test_ema_warmup_follows_the_trained_weights_early():
    """With the ChestX-ray14 recipe's decay of 0.9998, 100 steps in, the warmed-up EMA is closer to the
    trained weights than to the initial ones; without the warm-up it is still 98% the initial ones."""
    from medscale.train.ema import ModelEma

    for warmup, closer_to_trained in ((2 / 3, True), (None, False)):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        ema = ModelEma(model, 0.9998, warmup_power=warmup)
        _sgd_run(100, ema, model)
        trained = torch.cat([p.detach().flatten() for p in model.parameters()])
        average = torch.cat([v.flatten() for v in ema.state_dict()["params"].values()])
        to_trained, to_initial = float((average - trained).norm()), float((average - initial).norm())
        assert (to_trained < to_initial) == closer_to_trained, (warmup, to_trained, to_initial)
    # timm's ModelEmaV3 decays: 0 (a copy) first, then 1 - (1 + t)^(-2/3), capped at the decay
    ema = ModelEma(torch.nn.Linear(2, 1), 0.9998, warmup_power=2 / 3)
    decays = []
    for _ in range(3):
        decays.append(ema.current_decay())
        ema.update()
    assert decays == [0.0, pytest.approx(1 - 2 ** (-2 / 3)), pytest.approx(1 - 3 ** (-2 / 3))]
    ema.updates = 10 ** 9
    assert ema.current_decay() == 0.9998


def test_ema_warmup_resumes_where_it_stopped():
    """Saved and resumed with the EMA: 60 + 40 steps with a restart equal 100 uninterrupted ones."""
    from medscale.train.ema import ModelEma

    torch.manual_seed(1)
    whole_model = torch.nn.Linear(8, 1)
    start = {k: v.clone() for k, v in whole_model.state_dict().items()}
    whole = ModelEma(whole_model, 0.999, warmup_power=2 / 3)
    _sgd_run(100, whole, whole_model)

    model = torch.nn.Linear(8, 1)
    model.load_state_dict(start)
    first = ModelEma(model, 0.999, warmup_power=2 / 3)
    _sgd_run(60, first, model)
    saved = first.state_dict()
    assert saved["updates"] == 60 and saved["warmup_power"] == 2 / 3
    second = ModelEma(model, 0.999, warmup_power=2 / 3)
    second.load_state_dict(saved)
    _sgd_run(40, second, model, seed=0)  # the same data: SGD on a fixed batch depends only on the weights
    for k, v in whole.state_dict()["params"].items():
        assert torch.allclose(second.state_dict()["params"][k], v, atol=1e-6), k


# -- numerics guards ------------------------------------------------------------------------------------


class FakeEngine:
    """What NumericsGuard reads from a DeepSpeed engine, with scripted overflows."""

    def __init__(self, fp16=True, overflow=(), fail=None):
        self.global_steps, self.overflow, self.fail = 0, list(overflow), fail
        self.optimizer = SimpleNamespace(loss_scale=2.0 ** 16)
        self._fp16, self._applied = fp16, True

    def fp16_enabled(self):
        return self._fp16

    def step(self):
        if self.fail:
            raise Exception(self.fail)
        over = self.overflow.pop(0) if self.overflow else False
        self._applied = not over
        if over:
            self.optimizer.loss_scale /= 2
        self.global_steps += 1

    def was_step_applied(self):
        return self._applied


def test_nonfinite_losses_skip_then_stop():
    from medscale.train.numerics import NumericsGuard

    guard = NumericsGuard(FakeEngine(), run_cfg(max_nonfinite=3).train, world=1)
    assert guard.check_loss(torch.tensor(0.5)) == 0.5
    assert guard.check_loss(torch.tensor(float("nan"))) is None
    assert guard.check_loss(torch.tensor(float("inf"))) is None
    assert guard.check_loss(torch.tensor(0.4)) == pytest.approx(0.4)  # the run of bad losses is broken
    assert guard.check_loss(torch.tensor(float("nan"))) is None
    assert guard.check_loss(torch.tensor(float("nan"))) is None
    with pytest.raises(FloatingPointError, match="3 non-finite losses in a row.*train.lr"):
        guard.check_loss(torch.tensor(float("nan")))
    assert guard.figures()["nonfinite_skipped"] == 5


def test_fp16_overflows_counted_and_a_collapse_stops_with_advice():
    from medscale.train.numerics import NumericsGuard

    engine = FakeEngine(overflow=[True, True, False, True, True, True])
    guard = NumericsGuard(engine, run_cfg(max_overflow_steps=3).train, world=1)
    for _ in range(5):
        assert guard.optimizer_step()
    assert guard.figures() == {"nonfinite_skipped": 0, "overflow_steps": 4, "loss_scale": 2.0 ** 12}
    with pytest.raises(FloatingPointError, match="loss scale collapsed.*3 steps in a row.*train.precision=bf16"):
        guard.optimizer_step()
    dead = NumericsGuard(FakeEngine(fail="Current loss scale already at minimum - cannot decrease scale anymore. "
                                          "Exiting run."), run_cfg().train, world=1)
    with pytest.raises(FloatingPointError, match="switch to train.precision=bf16"):
        dead.optimizer_step()


# -- models ------------------------------------------------------------------------------------------------


def test_model_options_reach_timm():
    model = tiny_vit(drop_path_rate=0.1, grad_checkpointing=True)
    assert model.patch_embed.proj.in_channels == 1 and model.head.out_features == 3
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1) and model.grad_checkpointing
    from medscale.config import ModelConfig
    from medscale.models import create_model

    with pytest.raises(ValueError, match="not a timm model"):
        create_model(ModelConfig(name="vit_nonexistent"), img_size=16, in_chans=1)


def test_weights_from_other_size_channels_and_classes(tmp_path):
    """A 3-channel, 32 px, 5-class checkpoint loads into a 1-channel, 16 px, 3-class model."""
    import timm
    from safetensors.torch import save_file

    from medscale.models import load_weights

    torch.manual_seed(1)
    src = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, in_chans=3, num_classes=5)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        model = tiny_vit()
        fresh_head = model.head.weight.clone()
        load_weights(model, tmp_path / name)
        assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
        assert model.pos_embed.shape == (1, 1 + 4, 64)  # 4x4 grid resampled to 2x2
        assert torch.allclose(model.patch_embed.proj.weight[:, 0], src.patch_embed.proj.weight.sum(1))
        assert torch.equal(model.head.weight, fresh_head)  # head of another size: reset
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_weights(tiny_vit(), tmp_path / "missing.pt")
    partial = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="blocks.1"):
        load_weights(tiny_vit(), tmp_path / "partial.pt")


# -- Slurm environment -------------------------------------------------------------------------------------


def test_first_host_of_slurm_node_lists():
    from medscale.dist import first_host

    assert first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_host("node7,node8") == "node7"
    assert first_host("a-b[10-11]") == "a-b10"
    assert first_host("localhost") == "localhost"


def test_ranks_from_srun_environment(monkeypatch):
    import os

    from medscale.dist import env_from_slurm, launched

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first so that teardown removes what env_from_slurm writes (a bare delenv of an
        # absent variable records nothing, and RANK=3 would leak into later tests)
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node list is parsed here
    # the batch script itself: SLURM_PROCID=0 of a 4-task job, but not a task of a step
    for k, v in (("SLURM_JOB_ID", "123457"), ("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"),
                 ("SLURM_JOB_NODELIST", "gpu[07-08]")):
        monkeypatch.setenv(k, v)
    env_from_slurm()
    assert "RANK" not in os.environ and not launched()
    # task 3 of a 2-node step started by srun
    for k, v in (("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "3"), ("SLURM_LOCALID", "1"),
                 ("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_STEP_NODELIST", "gpu[07-08]")):
        monkeypatch.setenv(k, v)
    assert launched()
    env_from_slurm()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("3", "4", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and os.environ["MASTER_PORT"] == str(20000 + 123457 % 20000)


# -- evaluation pooling and checkpoint choice ----------------------------------------------------------------


def test_binary_patient_is_positive_if_any_image_is():
    from medscale.tasks.classification import pool as _pool

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    pooled, target, names = _pool(probs, np.array([0, 1, 0, 0]), ["p1", "p1", "p2", "p2"], "multiclass",
                                  "patient", "max")
    assert names == ["p1", "p2"] and target.tolist() == [1, 0]
    assert pooled[:, 1].tolist() == [0.8, 0.4]
    with pytest.raises(ValueError, match="eval.aggregate=patient.*one label per patient"):
        _pool(np.full((2, 3), 1 / 3), np.array([0, 2]), ["p", "p"], "multiclass", "patient", "mean")


def test_resume_takes_newest_complete_checkpoint(tmp_path):
    from medscale.checkpoint.checkpointer import COMPLETE, Checkpointer
    from medscale.dist import DistInfo

    cfg = from_dict(RunConfig, {"checkpoint": {"keep": 2}})
    ck = Checkpointer(cfg.checkpoint, tmp_path, DistInfo(0, 1, 0), last_step=cfg.train.steps)
    for step, complete in ((2, True), (4, True), (6, True), (8, False)):
        d = ck.root / f"step{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / COMPLETE).write_text(json.dumps({"step": step, "world": 1}))
    assert ck.newest().name == "step00000006"  # step 8 was torn by a kill
    ck._prune()
    assert sorted(p.name for p in ck.root.iterdir()) == ["step00000004", "step00000006", "step00000008"]
    assert ck.due(cfg.train.steps) and not ck.due(3)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_run_configs_load_and_agree_with_their_deepspeed_config(path, monkeypatch):
    from medscale.config import load_config
    from medscale.train.engine import resolve_ds_config

    cfg = load_config(RunConfig, path)
    if cfg.train.precision == "fp16":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ds = resolve_ds_config(cfg, world=8, path=ROOT / cfg.dist.deepspeed_config)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 8


def test_deit_takes_the_configured_image_size():
    """deit's distilled ViT forwards **kwargs to VisionTransformer: img_size must still reach it."""
    from medscale.config import ModelConfig
    from medscale.models import create_model

    model = create_model(ModelConfig(name="deit_tiny_distilled_patch16_224", num_classes=3), img_size=64, in_chans=1)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 3)
