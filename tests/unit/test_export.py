"""`medscale export` of a tiny run written in-process by the real `save_weights`: safetensors that plain
timm loads with the call config.json documents, the preprocessing record beside them, and ONNX
checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from medscale.checkpoint import export, zero_weights
from medscale.checkpoint.export import export_run, load_exported
from medscale.checkpoint.onnx import OnnxParityError, export_onnx
from medscale.checkpoint.safetensors_io import write_safetensors
from medscale.checkpoint.safety import safe_load, verify_checkpoint_files
from medscale.checkpoint.weights import load_run_model, record_from_config, save_weights
from medscale.cli import main
from medscale.config import RunConfig, from_dict
from medscale.dist import DistInfo
from medscale.errors import InputError, InputNotFound
from medscale.models import create_model
from medscale.train.ema import ModelEma

CLASSES = ["normal", "lesion", "mass"]


def _run(tmp: Path, ema: bool = True) -> Path:
    """A finished run as `medscale train` leaves it: model.pt (+ EMA) and preprocess.json."""
    cfg = from_dict(RunConfig, {
        "model": {"name": "test_vit", "patch_size": 8, "num_classes": 3},
        "data": {"image_size": 16, "channels": 2, "windows": [[40, 400], [-600, 1500]], "normalize": "window"},
        "train": {"label_kind": "multiclass", "ema_decay": 0.5 if ema else 0.0},
        "eval": {"threshold": 0.3},
    })
    torch.manual_seed(0)
    model = create_model(cfg.model, img_size=16, in_chans=2)
    average = ModelEma(model, 0.5) if ema else None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # trained weights and their EMA differ
    if average is not None:
        average.update()
    run = tmp / ("run" if ema else "run_no_ema")
    run.mkdir()
    save_weights(SimpleNamespace(module=model), average, cfg, record_from_config(cfg, CLASSES), run, DistInfo(0, 1, 0))
    return run


@pytest.fixture
def run(tmp_path):
    return _run(tmp_path)


def _logits(model: torch.nn.Module, batch: int = 4) -> torch.Tensor:
    x = torch.randn(batch, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


def test_export_writes_ema_safetensors_that_plain_timm_loads(run, tmp_path, monkeypatch):
    out = tmp_path / "export"
    result = export_run(run, out)
    saved = torch.load(run / "model.pt", weights_only=True)
    weights = load_file(out / "model.safetensors")
    assert result.source["weights"] == "ema" and weights.keys() == saved["model_ema"].keys()
    for k, v in saved["model_ema"].items():
        assert weights[k].dtype == torch.float32 and torch.equal(weights[k], v), k

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["input_size"] == [2, 16, 16]
    assert config["timm"]["kwargs"] == {"num_classes": 3, "in_chans": 2, "img_size": 16, "patch_size": 8}
    pre = config["preprocess"]
    assert pre["windows"] == [[40, 400], [-600, 1500]] and pre["normalize"] == "window"
    assert pre["class_names"] == CLASSES and pre["threshold"] == 0.3

    # The documented call, verbatim, from the export directory: plain timm, nothing of medscale.
    monkeypatch.chdir(out)
    model = eval(config["load_with_timm"], {"timm": timm}).eval()
    reference, _ = load_run_model(run)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=1e-5)
    assert torch.equal(_logits(load_exported(out)), _logits(reference))


def test_the_overlay_keeps_the_head(run, tmp_path):
    """Without num_classes in pretrained_cfg_overlay timm drops the trained head for a fresh one (what
    the overlay in config.json exists for)."""
    out = tmp_path / "export"
    export_run(run, out)
    spec = json.loads((out / "config.json").read_text())["timm"]
    bare = timm.create_model(spec["model_name"], pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")), **spec["kwargs"])
    head = load_file(out / "model.safetensors")["head.weight"]
    assert not torch.equal(bare.head.weight.detach(), head)
    assert torch.equal(load_exported(out).head.weight.detach(), head)


def test_no_ema_exports_the_trained_weights_and_missing_sources_are_user_errors(run, tmp_path):
    export_run(run, tmp_path / "trained", use_ema=False)
    saved = torch.load(run / "model.pt", weights_only=True)["model"]
    weights = load_file(tmp_path / "trained" / "model.safetensors")
    assert all(torch.equal(weights[k], v) for k, v in saved.items())

    plain = _run(tmp_path, ema=False)
    assert export_run(plain, tmp_path / "plain").source["weights"] == "trained"
    with pytest.raises(InputError, match="holds no EMA"):
        export_run(plain, tmp_path / "x", use_ema=True)
    with pytest.raises(InputNotFound, match="model.pt not found"):
        export_run(tmp_path / "trained", tmp_path / "x")
    with pytest.raises(InputNotFound, match="step00000009 does not exist"):
        export_run(run, tmp_path / "x", checkpoint="step00000009")


def test_write_safetensors_streams_lazy_tensors(tmp_path):
    class Lazy:  # what DeepSpeed's GatheredTensor offers: shape, dtype, contiguous()
        def __init__(self, t):
            self.t, self.shape, self.dtype, self.calls = t, t.shape, t.dtype, 0

        def contiguous(self):
            self.calls += 1
            return self.t.contiguous()

    tensors = {"w": torch.randn(3, 5), "half": torch.randn(4, dtype=torch.bfloat16), "steps": torch.tensor(7),
               "idx": torch.arange(6, dtype=torch.int64).view(2, 3), "mask": torch.tensor([True, False]),
               "t": torch.randn(5, 3).t()}  # not contiguous
    lazy = {k: Lazy(v) for k, v in tensors.items()}
    nbytes = write_safetensors(tmp_path / "x.safetensors", lazy, {"k": "v"})
    assert all(v.calls == 1 for v in lazy.values())  # each materialised once
    back = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        want = v.float() if v.is_floating_point() else v
        assert back[k].dtype == want.dtype and torch.equal(back[k], want), k
    assert nbytes == sum(v.numel() * back[k].element_size() for k, v in tensors.items())
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"k": "v"}
    assert not (tmp_path / "x.safetensors.tmp").exists()


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(run, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "export"
    result = export_run(run, out, onnx=True)
    assert result.onnx == out / "model.onnx" and result.onnx_max_abs_diff <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["onnx"]["max_abs_diff"] == result.onnx_max_abs_diff and config["onnx"]["tolerance"] == 1e-4
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 2, 16, 16)
    want = load_exported(out)(x).detach().numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - want).max() <= 1e-4

    # A later export without --onnx removes the ONNX file that no longer matches.
    assert export_run(run, out, use_ema=False).notes and not (out / "model.onnx").exists()


def test_onnx_parity_failure_removes_the_file_and_the_command_fails(run, tmp_path, monkeypatch, capsys):
    model = load_run_model(run)[0]
    with pytest.raises(OnnxParityError, match="differ from PyTorch's by up to"):
        export_onnx(model, tmp_path / "m.onnx", channels=2, image_size=16, tolerance=-1.0)
    assert not (tmp_path / "m.onnx").exists()

    monkeypatch.setattr(export, "ONNX_TOLERANCE", -1.0)  # no export can meet it
    assert main(["export", str(run), "--out", str(tmp_path / "e"), "--onnx"]) == 1
    err = capsys.readouterr().err
    assert "medscale export: error: ONNX Runtime's logits differ" in err and "Traceback" not in err


def test_cli_export(run, tmp_path, capsys):
    assert main(["export", str(run), "--out", str(tmp_path / "e"), "--no-ema"]) == 0
    assert "trained weights of model.pt" in capsys.readouterr().out
    assert main(["export", str(run), "--out", str(tmp_path / "e"), "--checkpoint", "step00000004"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medscale export: error: checkpoint") and "no checkpoints" in err and "Traceback" not in err


def _zero12_checkpoint(path: Path, groups: list[dict[str, tuple[int, ...]]], world: int, *, stage: int = 2,
                       param_alignment: int = 1, frozen: dict[str, torch.Tensor] | None = None,
                       ) -> dict[str, torch.Tensor]:
    """Files of a ZeRO-1/2 checkpoint of `world` ranks laid out as DeepSpeed 0.19's stage_1_and_2.py lays them
    out: each group flattened (a parameter followed by its alignment padding, the last one without), padded to
    a multiple of 2 x world, cut into equal partitions, each saved without its trailing padding; the slice map
    of each rank's parameters. Returns the parameters written."""
    from collections import OrderedDict

    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    g = torch.Generator().manual_seed(0)
    values: dict[str, torch.Tensor] = {}
    osds: list[dict] = [{"single_partition_of_fp32_groups": [], "group_paddings": [], "param_slice_mappings": [],
                         "param_alignment_paddings": [], "partition_count": [world] * len(groups),
                         "zero_stage": ZeroStageEnum(stage), "ds_version": "0.19.8",
                         "optimizer_state_dict": {"state": {}, "param_groups": []}} for _ in range(world)]
    for group in groups:
        pieces, paddings, offsets = [], [], {}
        for i, (name, shape) in enumerate(group.items()):
            values[name] = torch.randn(shape, generator=g)
            offsets[name] = sum(p.numel() for p in pieces)
            pieces.append(values[name].reshape(-1))
            paddings.append(0 if i == len(group) - 1 else -sum(p.numel() for p in pieces) % param_alignment)
            pieces.append(torch.zeros(paddings[-1]))
        used = sum(p.numel() for p in pieces)
        flat = torch.cat(pieces + [torch.zeros(-used % (2 * world))])
        size = flat.numel() // world
        for r, osd in enumerate(osds):
            pad = min(size, max(0, (r + 1) * size - used))
            osd["single_partition_of_fp32_groups"].append(flat[r * size:(r + 1) * size - pad].clone())
            osd["group_paddings"].append(pad)
            osd["param_alignment_paddings"].append(paddings)
            mapping = OrderedDict()
            for name, begin in offsets.items():
                end = begin + values[name].numel()
                lo, hi = max(begin, r * size), min(end, (r + 1) * size)
                if lo < hi:
                    mapping[name] = fragment_address(numel=hi - lo, start=lo - r * size)
            osd["param_slice_mappings"].append(mapping)
    path.mkdir(parents=True)
    for r, osd in enumerate(osds):
        torch.save({"optimizer_state_dict": osd}, path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    frozen = frozen or {}
    torch.save({"module": {**values, **frozen, "steps": torch.tensor(3)}, "buffer_names": ["steps"],
                "param_shapes": [OrderedDict((n, torch.Size(s)) for n, s in group.items()) for group in groups],
                "frozen_param_shapes": OrderedDict((n, v.shape) for n, v in frozen.items()) if stage == 2 else None,
                "frozen_param_fragments": OrderedDict(frozen) if stage == 2 else None,
                "shared_params": {}, "ds_version": "0.19.8", "ds_config": {"zero_optimization": {"stage": stage}}},
               path / "mp_rank_00_model_states.pt")
    return {**values, **(frozen if stage == 2 else {})}


@pytest.mark.parametrize("world,stage,alignment", [(1, 2, 1), (2, 1, 1), (3, 2, 4), (5, 1, 4)])
def test_zero12_masters_come_from_the_slice_map_bit_for_bit_like_zero_to_fp32(tmp_path, world, stage, alignment,
                                                                              monkeypatch):
    """The ZeRO-1/2 reader puts each tensor together from the ranks' partitions, one at a time: the same bits
    as DeepSpeed's get_fp32_state_dict_from_zero_checkpoint, which concatenates each group's partitions first.
    Tensors cut across 2 and 3 partitions, alignment padding between them, a last rank holding only padding
    (5 ranks), a frozen parameter (ZeRO-2 keeps it in the model states)."""
    import deepspeed.utils.zero_to_fp32 as zero_to_fp32

    groups = [{"w1": (7, 3), "w2": (5,), "w3": (2, 2, 3)}, {"b1": (3,), "b2": (9,)}]
    ckpt = tmp_path / "checkpoints" / "step2"
    values = _zero12_checkpoint(ckpt, groups, world, stage=stage, param_alignment=alignment,
                                frozen={"frozen": torch.arange(4.0)})
    verify_checkpoint_files(ckpt)
    want = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), "step2")
    monkeypatch.setattr(zero_to_fp32, "get_fp32_state_dict_from_zero_checkpoint", None)  # not used at ZeRO-1/2
    states = safe_load(ckpt / "mp_rank_00_model_states.pt")
    got = zero_weights.master_weights(tmp_path / "checkpoints", "step2", ckpt, states)
    assert got.keys() == want.keys() - {"steps"} == values.keys()
    for name, lazy in got.items():
        t = lazy.contiguous()
        assert t.shape == want[name].shape and torch.equal(t.view(torch.int32), want[name].view(torch.int32)), name
        assert torch.equal(t, values[name]), name
    if world > 1:
        assert max(len(v.pieces) for v in got.values() if isinstance(v, zero_weights._Fragments)) == min(world, 3)


def test_zero12_reader_refuses_inconsistent_files(tmp_path):
    groups = [{"w1": (7, 3), "w2": (5,)}]
    ckpt = tmp_path / "step2"
    _zero12_checkpoint(ckpt, groups, 2)
    states = safe_load(ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt").rename(ckpt / "zero_pp_rank_2_mp_rank_00_optim_states.pt")
    with pytest.raises(InputError, match=r"optimizer files of ranks \[0, 2\]"):
        zero_weights.master_weights(tmp_path, "step2", ckpt, states)
    (ckpt / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(InputError, match="holds 1 optimizer files, zero_pp_rank_0_mp_rank_00_optim_states.pt says 2"):
        zero_weights.master_weights(tmp_path, "step2", ckpt, states)
    _zero12_checkpoint(tmp_path / "two_groups", [groups[0], {"b": (3,)}], 1)
    with pytest.raises(InputError, match="holds 2 parameter groups, the model states 1"):
        zero_weights.master_weights(tmp_path, "two_groups", tmp_path / "two_groups", states)


def test_names_read_from_an_export_or_a_run_never_reach_a_hub_or_a_path(run, tmp_path):
    """config.json and checkpoints/latest are files, not instructions: a hub name, a file-loading
    argument or a tag outside the run's checkpoints is refused before anything is opened."""
    out = tmp_path / "exp"
    export_run(run, out)
    spec = json.loads((out / "config.json").read_text())["timm"]
    for bad, what in (({"model_name": "hf-hub:timm/vit_tiny_patch16_224"}, "model_name"),
                      ({"kwargs": {**spec["kwargs"], "checkpoint_path": str(run / "model.pt")}}, "checkpoint_path"),
                      ({"kwargs": {**spec["kwargs"], "pretrained_cfg": {"url": "https://example.invalid/w.pth"}}},
                       "pretrained_cfg")):
        with pytest.raises(InputError, match=f"{what}.*is refused"):
            load_exported(out, spec={**spec, **bad})
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    with pytest.raises(InputError, match="checkpoints/latest names '../../elsewhere'.*is refused"):
        export_run(run, tmp_path / "x", checkpoint="latest")


def test_a_classifier_has_no_part_to_export_alone(run, tmp_path):
    """`--part` names a part of the model that the run's objective exports on its own; a classifier has none."""
    with pytest.raises(InputError, match="exports its whole model; it has no part 'encoder'"):
        export_run(run, tmp_path / "e", part="encoder")
    assert main(["export", str(run), "--out", str(tmp_path / "e"), "--part", "encoder"]) == 2
    assert not (tmp_path / "e").exists()
