"""A checkpoint is refused before DeepSpeed unpickles it (weights_only=False) if any file holds more than
tensors and DeepSpeed's own classes; nothing of the refused file runs."""

from __future__ import annotations

import argparse
import collections
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from medscale.checkpoint.checkpointer import Checkpointer, TrainState
from medscale.checkpoint.safety import DEEPSPEED_GLOBALS, safe_load, verify_checkpoint_files
from medscale.config import CheckpointConfig
from medscale.dist import DistInfo
from medscale.errors import InputError


class _Payload:
    """Unpickling this writes a marker file: what a crafted checkpoint would do with any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _plant(path: Path, marker: Path, legacy: bool = False) -> None:
    obj = {"module": {"w": torch.zeros(3)}, "ds_version": "0.19.8", "x": _Payload(marker)}
    if legacy:  # a bare pickle, as torch's legacy format would hold it
        path.write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, path)


@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_pickle_is_refused_naming_file_and_global_and_never_runs(tmp_path, legacy):
    ckpt = tmp_path / "step00000004"
    ckpt.mkdir()
    torch.save({"step": 4, "t": torch.ones(2)}, ckpt / "parts.pt")
    evil, marker = ckpt / "mp_rank_00_model_states.pt", tmp_path / "marker"
    _plant(evil, marker, legacy)
    with pytest.raises(InputError) as e:
        verify_checkpoint_files(ckpt)
    assert str(evil) in str(e.value) and "builtins.exec" in str(e.value)
    assert not marker.exists()
    # The payload is live: what DeepSpeed's own loading (weights_only=False) would have done.
    pickle.loads(evil.read_bytes()) if legacy else torch.load(evil, weights_only=False)
    assert marker.read_text() == "ran"


def test_resume_refuses_before_deepspeed_sees_the_checkpoint(tmp_path):
    class Engine:
        loaded = False

        def save_checkpoint(self, root: str, tag: str, client_state: dict, save_latest: bool) -> None:
            Path(root, tag).mkdir(parents=True, exist_ok=True)
            torch.save({"module": {"w": torch.zeros(3)}}, Path(root, tag, "mp_rank_00_model_states.pt"))

        def load_checkpoint(self, root: str, tag: str) -> tuple[str, dict]:
            Engine.loaded = True  # DeepSpeed: torch.load(weights_only=False) of every file
            return f"{root}/{tag}", {}

        def zero_optimization_stage(self) -> int:
            return 2

    ck = Checkpointer(CheckpointConfig(every_steps=2), tmp_path, DistInfo(0, 1, 0), last_step=4)
    path = ck.save(Engine(), 4, {"train": TrainState(step=4)})
    state = TrainState()
    assert ck.resume(Engine(), {"train": state}) == path and state.step == 4 and Engine.loaded  # a clean one loads

    Engine.loaded = False
    marker = tmp_path / "marker"
    _plant(path / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(InputError, match=r"mp_rank_00_model_states\.pt: it holds global builtins\.exec"):
        ck.resume(Engine(), {"train": TrainState()})
    assert not Engine.loaded and not marker.exists()


def test_deepspeed_classes_load_and_nothing_else_does(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"zero_stage": ZeroStageEnum.gradients, "map": collections.OrderedDict(w=fragment_address(numel=3, start=0)),
             "loss_scaler": LossScaler(1.0), "dynamic": DynamicLossScaler(init_scale=2.0**16, scale_window=1000,
                                                                          min_scale=1, delayed_shift=2,
                                                                          consecutive_hysteresis=False),
             "flat": torch.arange(4.0)}
    ok = tmp_path / "ok"
    ok.mkdir()
    torch.save(state, ok / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert verify_checkpoint_files(ok) == 1
    back: dict[str, Any] = safe_load(ok / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert back["zero_stage"] is ZeroStageEnum.gradients and back["map"]["w"] == fragment_address(numel=3, start=0)
    assert back["dynamic"].cur_scale == 2.0**16 and back["dynamic"].dtype == torch.float16
    assert torch.equal(back["flat"], torch.arange(4.0))
    assert len(DEEPSPEED_GLOBALS) == 4

    # Harmless, but not DeepSpeed's: a checkpoint never holds it, so it is refused all the same.
    torch.save({"args": argparse.Namespace(lr=1e-3)}, ok / "extra.pt")
    with pytest.raises(InputError, match=r"extra\.pt: it holds global argparse\.Namespace"):
        verify_checkpoint_files(ok)
