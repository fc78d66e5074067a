"""Throughput figures: model FLOPs counted on the meta device for several timm ViTs (checked against the
analytic count of a ViT), MFU, and the table of device peaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medscale.config import ModelConfig


def test_flops_and_mfu():
    from medscale.models.flops import flops_per_sample
    from medscale.train.throughput import Throughput, device_peak_tflops

    from medscale.config import ModelConfig

    # test_vit, 16 px, patch 8: 4 patches + class token, width 64, MLP ratio 3, 6 blocks
    tokens, width, depth = 5, 64, 6
    linear = 3 * width + width + 3 * width + 3 * width  # qkv, proj, fc1, fc2 (per input feature)
    per_block = 2 * tokens * width * linear + 2 * 2 * tokens * tokens * width  # + q.k and attn.v
    embed, head = 2 * 4 * (8 * 8 * 1) * width, 2 * width * 3
    flops = flops_per_sample(ModelConfig(name="test_vit", patch_size=8, num_classes=3), in_chans=1, img_size=16)
    assert flops == depth * per_block + embed + head
    assert device_peak_tflops("bf16") is None  # a CPU: no guessed peak
    assert device_peak_tflops("bf16", configured=2.0) == 2.0
    meter = Throughput(samples_per_micro=8, flops=1e9, peak_tflops=1.0, world=2)
    for _ in meter.batches(range(5)):
        pass
    fig = meter.report()
    assert fig["samples_per_s"] > 0 and 0 <= fig["data_wait_frac"] <= 1 and fig["peak_mem_gb"] > 0
    assert fig["mfu"] == pytest.approx(3 * 1e9 * fig["samples_per_s"] / (2 * 1e12))
    assert Throughput(8, None, None, 1).report()["mfu"] is None


def test_peak_table_for_known_gpus(monkeypatch):
    from medscale.train.throughput import device_peak_tflops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, bf16, fp32 in (("NVIDIA H100 80GB HBM3", 989.0, 494.0), ("NVIDIA H100 PCIe", 756.0, 378.0),
                             ("NVIDIA A100-SXM4-80GB", 312.0, 156.0), ("Some New GPU", None, None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert device_peak_tflops("bf16") == bf16 and device_peak_tflops("fp32") == fp32


def vit_flops(model: nn.Module) -> int:
    """Analytic forward FLOPs of a timm ViT, without its head: 2 per weight and token in every Linear of
    the blocks, 4 * tokens^2 * width per block for q.k and attn.v, the patch projection, and, for an
    attention-pool head, its key/value projection of every token (its query is one latent token)."""
    patches = model.patch_embed.num_patches
    tokens = patches + model.num_prefix_tokens  # class, distillation and register tokens
    linear = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, nn.Linear))
    flops = 2 * tokens * linear + len(model.blocks) * 4 * tokens**2 * model.embed_dim
    flops += 2 * patches * model.patch_embed.proj.weight.numel()
    if getattr(model, "attn_pool", None) is not None:
        flops += 2 * tokens * model.attn_pool.kv.weight.numel()
    return flops


@pytest.mark.parametrize("name, img_size, in_chans, patch_size", [
    ("test_vit3", 32, 2, 8),  # the demo's model: an attention-pool head
    ("vit_tiny_patch16_224", 64, 1, 0),
    ("vit_small_patch14_reg4_dinov2", 56, 1, 0),  # 4 register tokens
    ("eva02_tiny_patch14_224", 56, 3, 0),  # rotary embeddings, SwiGLU MLP
    ("deit_tiny_distilled_patch16_224", 224, 1, 0),  # distillation token (deit gets no img_size: its native 224)
])
def test_flops_of_timm_vits_match_the_analytic_count(name, img_size, in_chans, patch_size):
    from medscale.models import create_model
    from medscale.models.flops import flops_per_sample

    cfg = ModelConfig(name=name, num_classes=2, patch_size=patch_size)
    flops = flops_per_sample(cfg, in_chans=in_chans, img_size=img_size)
    with torch.device("meta"):
        model = create_model(cfg, img_size=img_size, in_chans=in_chans)
    assert flops is not None
    assert flops == pytest.approx(vit_flops(model), rel=0.02)  # the head and the pool's one-token layers


def test_flops_are_counted_under_the_callers_no_grad():
    """A view of a parameter made under no_grad (test_vit3's attention-pool latent) used to stop the count."""
    from medscale.models.flops import flops_per_sample

    cfg = ModelConfig(name="test_vit3", num_classes=2, patch_size=8)
    with torch.no_grad():
        inside = flops_per_sample(cfg, in_chans=2, img_size=32)
    assert inside is not None and inside == flops_per_sample(cfg, in_chans=2, img_size=32)
