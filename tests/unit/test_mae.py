"""Masked-autoencoder pretraining (`medscale.models.mae`, the ``mae`` task): masks, visible-only
encoding, the masked-patch loss, per-patch normalisation, shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from medscale.config import ConfigError, RunConfig, from_dict
from medscale.models.mae import (MaskedAutoencoder, mask_from_seeds, masked_loss, patch_targets, patchify,
                                 sincos_pos_embed_2d, unpatchify)
from medscale.tasks.base import build_task
from medscale.tasks.mae import MaeTask


def _vit(img_size=(32, 32), in_chans=1, **kw) -> VisionTransformer:
    args = dict(img_size=img_size, patch_size=8, in_chans=in_chans, embed_dim=32, depth=2, num_heads=2,
                num_classes=0, global_pool="")
    return VisionTransformer(**{**args, **kw})


def _mae(img_size=(32, 32), in_chans=1, mask_ratio=0.75, **kw) -> MaskedAutoencoder:
    torch.manual_seed(0)
    return MaskedAutoencoder(_vit(img_size, in_chans, **kw), in_chans=in_chans, mask_ratio=mask_ratio,
                             decoder_dim=16, decoder_depth=1, decoder_heads=2).eval()


SEEDS = torch.tensor([0, 1, 2, 12345, 2**62 + 7, (1 << 63) - 1])


@pytest.mark.parametrize("n, ratio", [(16, 0.75), (64, 0.75), (64, 0.9), (12, 0.5), (196, 0.9), (7, 0.6)])
def test_mask_keeps_exactly_the_configured_fraction_per_sample(n, ratio):
    mask, keep = mask_from_seeds(SEEDS, n, ratio)
    want = round(ratio * n)
    assert mask.shape == (len(SEEDS), n) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [want] * len(SEEDS)
    assert keep.shape == (len(SEEDS), n - want)
    for row in range(len(SEEDS)):  # keep: the visible patches, in increasing order
        assert keep[row].tolist() == torch.nonzero(~mask[row]).flatten().tolist()


def test_mask_is_a_function_of_each_samples_seed_alone():
    mask, _ = mask_from_seeds(SEEDS, 64, 0.75)
    again, _ = mask_from_seeds(SEEDS.flip(0), 64, 0.75)
    assert torch.equal(mask, again.flip(0))  # other batch neighbours, another order: the same masks
    alone, _ = mask_from_seeds(SEEDS[3:4], 64, 0.75)
    assert torch.equal(alone[0], mask[3])
    assert len({tuple(r.tolist()) for r in mask}) == len(SEEDS)  # different seeds, different masks
    # over many seeds every patch is masked about equally often (no position favoured)
    many, _ = mask_from_seeds(torch.arange(4000) * 7919 + 3, 16, 0.75)
    freq = many.float().mean(dim=0)
    assert torch.all((freq - 0.75).abs() < 0.04), freq


def test_encoder_receives_only_the_visible_tokens():
    model = _mae()
    seen = []
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    x = torch.randn(3, 1, 32, 32)
    seeds = torch.tensor([5, 6, 7])
    out = model(x, seeds)
    n_visible = 16 - round(0.75 * 16)
    assert seen == [torch.Size([3, model.num_prefix + n_visible, 32])]
    # the encoder's output does not depend on the masked patches' pixels at all
    mask, keep = mask_from_seeds(seeds, 16, 0.75)
    pixel_mask = unpatchify(mask[..., None].float().expand(-1, -1, 64), (8, 8), (4, 4), 1).bool()
    changed = torch.where(pixel_mask, torch.randn_like(x) * 10, x)
    assert not torch.equal(changed, x)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(changed, keep), model.encode(x, keep))
    assert out.mask.sum().item() == 3 * round(0.75 * 16)


def test_loss_covers_only_masked_patches_of_valid_samples():
    b, n, p = 4, 16, 12
    torch.manual_seed(1)
    pred, target = torch.randn(b, n, p, requires_grad=True), torch.randn(b, n, p)
    mask, _ = mask_from_seeds(torch.arange(b), n, 0.75)
    loss = masked_loss(pred, target, mask)
    want = ((pred - target) ** 2).mean(-1)[mask].mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.all(pred.grad[~mask] == 0) and torch.all(pred.grad[mask].abs().sum(-1) > 0)
    # changing a visible patch's prediction changes nothing
    with torch.no_grad():
        other = pred.detach().clone()
        other[~mask] += 100
        torch.testing.assert_close(masked_loss(other, target, mask), loss.detach())
    # stand-ins (valid=False) count for nothing: the loss is the valid samples' loss alone
    valid = torch.tensor([True, False, True, False])
    got = masked_loss(pred, target, mask, valid)
    torch.testing.assert_close(got, masked_loss(pred[valid], target[valid], mask[valid]))
    assert masked_loss(pred, target, mask, torch.zeros(b, dtype=torch.bool)).item() == 0.0


def test_per_patch_normalisation_is_the_mae_papers():
    """Each patch's values, all channels together, minus their mean, over sqrt(unbiased variance + 1e-6)."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (2, 3, 16, 24)).astype(np.float32)
    patches = patchify(torch.from_numpy(x), (8, 8))
    got = patch_targets(patches, norm_pix=True).numpy()
    for b in range(2):
        for gy in range(2):
            for gx in range(3):
                block = x[b, :, gy * 8:(gy + 1) * 8, gx * 8:(gx + 1) * 8]  # (C, 8, 8)
                flat = block.transpose(1, 2, 0).reshape(-1)  # (row, column, channel), as patchify orders it
                want = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-6)
                np.testing.assert_allclose(got[b, gy * 3 + gx], want, rtol=1e-4, atol=1e-5)
    assert torch.equal(patch_targets(patches, norm_pix=False), patches)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_patchify_orders_tokens_as_the_patch_embedding(in_chans):
    """Patch i of patchify is token i of timm's patch embedding (row-major grid), values (row, col, channel)."""
    vit = _vit((16, 24), in_chans)
    x = torch.randn(2, in_chans, 16, 24)
    patches = patchify(x, (8, 8))
    assert patches.shape == (2, 6, 64 * in_chans)
    w = vit.patch_embed.proj.weight  # (D, C, 8, 8)
    as_linear = patches @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + vit.patch_embed.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(as_linear, vit.patch_embed(x), rtol=1e-4, atol=1e-5)
    assert torch.equal(unpatchify(patches, (8, 8), (2, 3), in_chans), x)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
@pytest.mark.parametrize("tokens", [dict(), dict(class_token=False, reg_tokens=2),
                                    dict(no_embed_class=True, reg_tokens=1), dict(class_token=False)])
def test_shapes_for_channels_grids_and_prefix_tokens(in_chans, size, tokens):
    model = _mae(size, in_chans, **tokens)
    grid = (size[0] // 8, size[1] // 8)
    n = grid[0] * grid[1]
    x = torch.randn(2, in_chans, *size)
    out = model(x, torch.tensor([3, 4]))
    assert out.pred.shape == out.target.shape == (2, n, 64 * in_chans)
    assert out.mask.shape == (2, n) and out.mask.sum(1).tolist() == [round(0.75 * n)] * 2
    recon, hidden = model.reconstruct(x, out)
    assert recon.shape == x.shape and hidden.shape == (2, 1, *size)
    visible = unpatchify((~out.mask)[..., None].float().expand(-1, -1, 64 * in_chans), (8, 8), grid, in_chans).bool()
    assert torch.equal(recon[visible], x[visible]) and torch.equal(~hidden.expand_as(x), visible)
    from medscale.tasks.mae import _triptych

    strip = _triptych(x[0], recon[0], hidden[0, 0])  # one row per channel (one colour row for 3)
    rows = 1 if in_chans == 3 else in_chans
    assert strip.dtype == np.uint8 and strip.shape == (rows * size[0] + 2 * (rows - 1), 3 * size[1] + 4, 3)
    loss = masked_loss(out.pred, out.target, out.mask)
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused, unused  # every parameter trains: ZeRO needs no special case


def test_sincos_positions_fit_any_grid():
    pos = sincos_pos_embed_2d(16, (3, 5))
    assert pos.shape == (15, 16)
    assert len({tuple(r.tolist()) for r in pos}) == 15
    with pytest.raises(ConfigError, match="multiple of 4"):
        sincos_pos_embed_2d(18, (2, 2))


def test_timm_models_and_bf16():
    """The registered timm ViTs medscale's tests use (class token with dynamic size, register token with
    attention pool) train through the task; under bf16 the loss is fp32."""
    for name in ("test_vit", "test_vit3"):
        cfg = from_dict(RunConfig, {"model": {"name": name, "patch_size": 8}, "train": {"objective": "mae"},
                                    "data": {"image_size": 32, "channels": 2},
                                    "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}})
        task = build_task(cfg, {"task": "unlabeled", "classes": [], "shards": []})
        assert isinstance(task, MaeTask) and not task.needs_labels
        model = task.build_model().to(torch.bfloat16)
        batch = {"image": torch.randn(3, 2, 32, 32, dtype=torch.bfloat16), "seed": torch.tensor([1, 2, 3]),
                 "valid": torch.tensor([True, True, False])}
        loss = task.loss(model, batch)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_mae_config_is_strict():
    cfg = from_dict(RunConfig, {"train": {"objective": "mae"}, "mae": {"mask_ratio": 0.9}})
    assert cfg.objective_config.mask_ratio == 0.9 and cfg.objective_config.decoder_depth >= 1
    mae = {"objective": "mae"}
    with pytest.raises(ConfigError, match="mae.mask_ratio"):
        from_dict(RunConfig, {"train": mae, "mae": {"mask_ratio": 1.0}})
    with pytest.raises(ConfigError, match="decoder_heads"):
        from_dict(RunConfig, {"train": mae, "mae": {"decoder_dim": 36, "decoder_heads": 8}})
    with pytest.raises(ConfigError, match="multiple of 4"):
        from_dict(RunConfig, {"train": mae, "mae": {"decoder_dim": 30, "decoder_heads": 2}})
    with pytest.raises(ConfigError, match="unknown config key 'mae.mask_ration'"):
        from_dict(RunConfig, {"train": mae, "mae": {"mask_ration": 0.5}})
    with pytest.raises(ConfigError, match="unknown config key 'mae.mask_ration'"):
        from_dict(RunConfig, {"mae": {"mask_ration": 0.5}})  # a typo is named whatever the objective
    # The section is the objective's: set for another objective, it is refused rather than ignored...
    with pytest.raises(ConfigError, match="config section 'mae' .* is for train.objective=mae, but this run's "
                                          "objective is classification"):
        from_dict(RunConfig, {"mae": {"mask_ratio": 0.9}})
    # ...except an untouched one, as every config saved by medscale 0.1 carries
    assert from_dict(RunConfig, {"mae": {"mask_ratio": 0.75}}).objective_config is None
    with pytest.raises(ConfigError, match="train.objective"):
        from_dict(RunConfig, {"train": {"objective": "simclr"}})


def test_mfu_counts_the_autoencoder_not_the_full_image_classifier():
    # The encoder sees a quarter of the patches: the classifier's FLOPs would overstate MFU about 4x.
    from medscale.config import RunConfig
    from medscale.tasks.classification import ClassificationTask
    from medscale.tasks.mae import MaeConfig, MaeTask

    cfg = RunConfig()
    cfg.model.name, cfg.data.channels, cfg.data.image_size = "vit_base_patch16_224", 3, 224
    full, mae = (object.__new__(cls) for cls in (ClassificationTask, MaeTask))
    full.cfg = mae.cfg = cfg
    mae.mae = MaeConfig()
    dense, masked = full.flops_per_sample(), mae.flops_per_sample()
    assert dense == pytest.approx(2 * 17.56e9, rel=0.01)  # timm's ViT-B/16: 17.6 GMACs
    # 49 of 196 patches (plus the class token) through the encoder, then the small decoder on all of them
    assert 0.25 * dense < masked < 0.3 * dense
