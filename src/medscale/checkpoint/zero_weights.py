"""fp32 master weights of a DeepSpeed checkpoint, read one tensor at a time (for `medscale export`).

With ``--checkpoint TAG`` they are consolidated from
``RUN/checkpoints/TAG``: the EMA from its ``parts.pt``, or the fp32 master weights from DeepSpeed's
files, memory-mapped and one tensor at a time: the model-state file and the fp32 partitions are
read, the optimizer moments in the same files never touched. At ZeRO-3 that is DeepSpeed's public
``get_fp32_state_dict_from_zero_checkpoint(..., lazy_mode=True)``, which gathers each tensor from its
partitions when it is written. At ZeRO-1/2 the same function first concatenates each parameter
group's partitions into one fp32 copy (``torch.cat`` in ``_zero2_merge_trainable_params``), so the
export would hold the weights twice (a peak of 2.02x their bytes, bench/checkpoint.py): medscale
reads those files itself instead (ZeRO-1/2 files of a DeepSpeed without the slice map still go
through that function). Each rank's optimizer file holds its partition of every flat group
(``single_partition_of_fp32_groups``, saved without its trailing padding) and the optimizer's own
map of where each parameter's slice sits in it (``param_slice_mappings``); a tensor is the
concatenation of its slices in rank order, made when it is written (a view of the mapped file when
one rank holds it whole). The map is checked against the layout DeepSpeed's function reads by (the
model states' ``param_shapes`` in order, with ``param_alignment_paddings`` and ``group_paddings``);
where they disagree (``round_robin_gradients``, which the map does not follow) the layout wins, so
the tensors are always that function's, bit for bit. ZeRO-2's frozen parameters come from the model
states, as there. bf16 at ZeRO-1 runs DeepSpeed's ``BF16_Optimizer``, whose files that function
refuses ("is not a zero checkpoint"); they hold the same two keys (partitions saved with their
padding) and go through the same reader. Every ``.pt`` of the checkpoint is verified first
(`medscale.checkpoint.safety`), because DeepSpeed unpickles them with ``weights_only=False``;
medscale's own reads are ``torch.load(weights_only=True, mmap=True)`` (`safe_load`).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from medscale.checkpoint.safetensors_io import LazyTensor
from medscale.checkpoint.safety import safe_load
from medscale.errors import InputError

__all__ = ["model_states_file", "master_weights"]

log = logging.getLogger("medscale.checkpoint.export")


def model_states_file(path: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (path / name).exists():
            return path / name
    raise InputError(f"checkpoint {path} holds no DeepSpeed model states (mp_rank_00_model_states.pt)")


def master_weights(root: Path, tag: str, path: Path, states: Mapping[str, Any]) -> Mapping[str, LazyTensor]:
    """Lazily gathered fp32 master weights of a DeepSpeed checkpoint, by parameter name."""
    ds = states.get("ds_config") or {}
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    low_precision = any((ds.get(k) or {}).get("enabled") is True for k in ("bf16", "fp16"))
    if stage == 0:
        if low_precision:
            raise InputError(f"checkpoint {path} is ZeRO stage 0 with 16-bit weights: DeepSpeed keeps its fp32 master "
                             "copy there without parameter names. Export RUN/model.pt (no --checkpoint), or the EMA")
        return {k: v for k, v in states["module"].items()}  # without ZeRO and in fp32 the module is the master
    optim = sorted(path.glob("*_optim_states.pt"), key=_rank_of)
    if not optim:
        raise InputError(f"checkpoint {path} (ZeRO stage {stage}) holds no *_optim_states.pt files")
    first = safe_load(optim[0])["optimizer_state_dict"]  # memory-mapped: the moments are not read
    from deepspeed.checkpoint.constants import PARAM_SLICE_MAPPINGS, SINGLE_PARTITION_OF_FP32_GROUPS, ZERO_STAGE

    zero_stage = int(first[ZERO_STAGE]) if ZERO_STAGE in first else None
    if zero_stage is not None and zero_stage >= 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)
    if SINGLE_PARTITION_OF_FP32_GROUPS in first and PARAM_SLICE_MAPPINGS in first:
        return _sliced_master_weights(path, optim, states, first)
    if zero_stage is not None:  # a ZeRO-1/2 state without a slice map (an older DeepSpeed's)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, lazy_mode=True)
    raise InputError(f"checkpoint {path}: {optim[0].name} is neither a ZeRO nor a bf16-optimizer state; "
                     "cannot find its fp32 master weights")


class _Fragments:
    """One parameter put together from its slices of each rank's flat fp32 partition."""

    def __init__(self, name: str, pieces: list[torch.Tensor], shape: Iterable[int], dtype: torch.dtype):
        self.name, self.pieces, self.shape, self.dtype = name, pieces, torch.Size(shape), dtype

    def contiguous(self) -> torch.Tensor:
        if not self.pieces:
            flat = torch.empty(0, dtype=self.dtype)
        else:  # one piece: a view of the memory-mapped partition, no copy
            flat = torch.cat(self.pieces) if len(self.pieces) != 1 else self.pieces[0]
        if flat.numel() != self.shape.numel():
            raise InputError(f"the optimizer state holds {flat.numel()} values of {self.name}, its shape "
                             f"{tuple(self.shape)} needs {self.shape.numel()}")
        return flat.view(self.shape)


def _sliced_master_weights(path: Path, optim: list[Path], states: Mapping[str, Any],
                           first: Mapping[str, Any]) -> dict[str, LazyTensor]:
    """The fp32 masters of DeepSpeed's ZeRO-1/2 optimizer and of its BF16_Optimizer (bf16 at ZeRO-1),
    tensor by tensor. Each rank's file holds its partition of every flat parameter group
    (``single_partition_of_fp32_groups``) and, per parameter, where its slice sits in it
    (``param_slice_mappings``: start and numel in the partition). A parameter is the concatenation
    of its slices in rank order, materialised only when the writer asks for it.

    The slice map is checked against the layout DeepSpeed's ``zero_to_fp32`` reconstructs from
    (the model states' ``param_shapes`` in order, each followed by its ``param_alignment_paddings``,
    the group split into equal partitions of ``numel + group_paddings`` values: ZeRO-1/2 saves each
    partition without its trailing padding, the bf16 optimizer with it). Where they disagree the
    layout is used, so the tensors are always the ones ``get_fp32_state_dict_from_zero_checkpoint``
    returns. ZeRO-2's frozen parameters come from the model states (``frozen_param_fragments``), as
    there."""
    from deepspeed.checkpoint.constants import (FROZEN_PARAM_FRAGMENTS, GROUP_PADDINGS, PARAM_ALIGNMENT_PADDINGS,
                                                PARAM_SLICE_MAPPINGS, PARTITION_COUNT, SINGLE_PARTITION_OF_FP32_GROUPS,
                                                ZERO_STAGE)

    world = len(optim)
    ranks = [_rank_of(f) for f in optim]
    if ranks != list(range(world)):
        raise InputError(f"checkpoint {path}: optimizer files of ranks {ranks}, expected 0..{world - 1}")
    param_shapes = states.get("param_shapes")
    if not param_shapes:
        raise InputError(f"checkpoint {path}: the model states hold no param_shapes")
    osds = [first] + [safe_load(f)["optimizer_state_dict"] for f in optim[1:]]  # memory-mapped
    unpadded = ZERO_STAGE in first  # ZeRO-1/2 drops each partition's trailing padding; BF16_Optimizer keeps it
    alignment = first.get(PARAM_ALIGNMENT_PADDINGS)
    for f, osd in zip(optim, osds):
        counts = osd[PARTITION_COUNT]
        counts = {int(c) for c in counts} if isinstance(counts, (list, tuple)) else {int(counts)}
        if counts != {world}:  # (an expert group partitioned over fewer ranks would show here too)
            raise InputError(f"checkpoint {path} holds {world} optimizer files, {f.name} says "
                             f"{' or '.join(map(str, sorted(counts)))} ranks wrote it")
        if not len(osd[SINGLE_PARTITION_OF_FP32_GROUPS]) == len(osd[PARAM_SLICE_MAPPINGS]) == len(param_shapes):
            raise InputError(f"checkpoint {path}: {f.name} holds {len(osd[SINGLE_PARTITION_OF_FP32_GROUPS])} "
                             f"parameter groups, the model states {len(param_shapes)}")

    pieces: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, torch.Size] = {}
    dtypes: dict[str, torch.dtype] = {}
    for g, group in enumerate(param_shapes):
        flats = [osd[SINGLE_PARTITION_OF_FP32_GROUPS][g] for osd in osds]
        sizes = {flat.numel() + (int(osd[GROUP_PADDINGS][g]) if unpadded else 0) for flat, osd in zip(flats, osds)}
        if len(sizes) != 1:
            raise InputError(f"checkpoint {path}: the ranks' partitions of parameter group {g} differ in size {sizes}")
        size = sizes.pop()
        paddings = alignment[g] if alignment is not None else [0] * len(group)
        if len(paddings) != len(group):
            raise InputError(f"checkpoint {path}: {len(paddings)} alignment paddings for the {len(group)} "
                             f"parameters of group {g}")
        need = sum(math.prod(shape) for shape in group.values()) + sum(int(p) for p in paddings)
        if need > size * world:
            raise InputError(f"checkpoint {path}: parameter group {g} needs {need} values, the {world} partitions "
                             f"hold {size * world}")
        # The layout: where each parameter's slices sit in which rank's partition.
        layout: list[dict[str, tuple[int, int]]] = [{} for _ in range(world)]
        offset = 0
        for (name, shape), padding in zip(group.items(), paddings):
            numel = math.prod(shape)
            for r in range(offset // size, -(-(offset + numel) // size)) if numel else ():
                begin, end = max(offset, r * size), min(offset + numel, (r + 1) * size)
                layout[r][name] = (begin - r * size, end - begin)
            shapes[name], dtypes[name] = torch.Size(shape), flats[0].dtype
            offset += numel + int(padding)
        mapped = [{name: (int(w.start), int(w.numel)) for name, w in osd[PARAM_SLICE_MAPPINGS][g].items()}
                  for osd in osds]
        if mapped == layout:
            layout = mapped  # the same slices, read by the optimizer's own map
        else:
            log.warning("checkpoint %s: the optimizer's slice map of parameter group %d disagrees with the order of "
                        "param_shapes (round_robin_gradients?): reading the parameters by param_shapes, as "
                        "DeepSpeed's zero_to_fp32 does", path, g)
        for r, (flat, where) in enumerate(zip(flats, layout)):
            for name, (start, numel) in where.items():
                if start + numel > flat.numel():
                    raise InputError(f"checkpoint {path}: rank {r} holds {flat.numel()} values of parameter group "
                                     f"{g}, {name} needs {start + numel}")
                pieces.setdefault(name, []).append(flat.narrow(0, start, numel))
    state: dict[str, LazyTensor] = {name: _Fragments(name, pieces.get(name, []), shape, dtypes[name])
                                    for name, shape in shapes.items()}
    for name, value in (states.get(FROZEN_PARAM_FRAGMENTS) or {}).items():
        state.setdefault(name, value)  # ZeRO-2 saves the parameters outside the optimizer (frozen) whole
    return state


def _rank_of(path: Path) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(m.group(1)) if m else -1
