"""Masked-autoencoder pretraining (He et al. 2022) around any timm `VisionTransformer` encoder.

The wrapper uses only the encoder's public parts: ``patch_embed``, ``pos_embed``, ``cls_token`` /
``reg_token`` (``num_prefix_tokens``, ``no_embed_class``), ``norm_pre``, ``blocks`` and ``norm``.
Per sample, a fraction of the patch tokens is masked; the encoder runs on the visible ones only
(where MAE's speed comes from); a small decoder gets the encoded visible tokens back in place, a
shared mask token everywhere else, fixed 2-D sine-cosine positions, and predicts every patch's
pixels. The loss is the mean squared error over the masked patches only, optionally on targets
normalised per patch (`patch_targets`).

Masks are a pure function of each sample's integer seed (``batch["seed"]`` from the loader: run
seed, epoch and position), computed on the model's device for the whole batch at once: the same
sample gets the same mask on any number of ranks and after a resume, and a new one each epoch.
The model knows nothing about DeepSpeed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from medscale.errors import ConfigError

__all__ = ["MaskedAutoencoder", "MaeOutput", "mask_from_seeds", "patchify", "unpatchify", "patch_targets",
           "masked_loss", "sincos_pos_embed_2d"]

_M32 = 0xFFFFFFFF
_SALT = 0x6D61_6531  # "mae1": mask draws differ from anything else keyed by the same sample seed


class MaeOutput(NamedTuple):
    """What one forward pass gives."""

    pred: torch.Tensor
    """(B, N, P) predicted pixels of every patch (P = patch height x width x channels), in the loss's space."""
    target: torch.Tensor
    """(B, N, P) the target pixels (normalised per patch with ``norm_pix_loss``), fp32."""
    mask: torch.Tensor
    """(B, N) bool, True where the patch was masked (hidden from the encoder)."""


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift-multiply, odd multiplier) on int64 tensors holding
    values below 2**32: every product stays below 2**59, so nothing overflows int64."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def mask_from_seeds(seeds: torch.Tensor, num_patches: int, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample random masks from integer seeds, computed for the whole batch on the seeds' device.

    Each sample's patch order is an argsort of hash values that are distinct within the sample (a
    bijective hash of the patch index keyed by the seed), so it is a permutation fixed by the seed
    alone, on any device. Exactly ``round(mask_ratio * num_patches)`` patches are masked per sample
    (at least 1, at most ``num_patches - 1``).

    Args:
        seeds: (B,) int64 per-sample seeds (non-negative).
        num_patches: N, patches per image.
        mask_ratio: fraction to mask.

    Returns:
        ``mask`` (B, N) bool (True: masked) and ``keep`` (B, N_visible) int64: indices of the visible
        patches of each sample in increasing order.
    """
    n_mask = min(max(int(round(mask_ratio * num_patches)), 1), num_patches - 1)
    seeds = seeds.to(torch.int64).reshape(-1, 1)
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    idx = torch.arange(num_patches, device=seeds.device, dtype=torch.int64).reshape(1, -1)
    noise = _hash32(lo ^ _hash32(hi ^ _hash32(idx ^ _SALT)))  # (B, N), distinct within each row
    order = torch.argsort(noise, dim=1)
    keep = torch.sort(order[:, n_mask:], dim=1).values
    mask = torch.ones(seeds.shape[0], num_patches, dtype=torch.bool, device=seeds.device)
    mask.scatter_(1, keep, False)
    return mask, keep


def patchify(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, ph * pw * C), patches in row-major grid order (as the patch embedding
    orders its tokens), each patch's values ordered (row, column, channel)."""
    b, c, h, w = images.shape
    ph, pw = patch
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
    x = images.reshape(b, c, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(patches: torch.Tensor, patch: tuple[int, int], grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, ph * pw * C) -> (B, C, H, W)."""
    b = patches.shape[0]
    (ph, pw), (gh, gw) = patch, grid
    x = patches.reshape(b, gh, gw, ph, pw, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * ph, gw * pw)


def patch_targets(patches: torch.Tensor, norm_pix: bool, eps: float = 1e-6) -> torch.Tensor:
    """The target of each patch, in fp32: its pixels, or with `norm_pix` the MAE paper's
    normalised pixels: ``(x - mean) / sqrt(var + eps)`` with the mean and the (unbiased) variance of
    all the patch's values, every channel together."""
    t = patches.float()
    if not norm_pix:
        return t
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)
    return (t - mean) / (var + eps) ** 0.5


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the masked patches of the valid samples only (stand-ins and padding,
    ``valid=False``, count for nothing); 0 (with a gradient path) when none is valid."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    weight = mask.float()
    if valid is not None:
        weight = weight * valid.to(weight.device).reshape(-1, 1).float()
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings, (gh * gw, dim), row-major: half the channels encode
    the row, half the column (MAE's decoder positions); any grid shape."""
    if dim % 4:
        raise ConfigError(f"mae.decoder_dim={dim} must be a multiple of 4 (2-D sine-cosine positions)")
    gh, gw = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64),
                                indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder (``encoder``, its state dict under the plain model's key names) and an MAE decoder.

    Args:
        encoder: a timm ``VisionTransformer`` built without a head (num_classes=0, global_pool='').
        in_chans: input channels (the loader's windows as channels).
        mask_ratio: fraction of patches masked per sample.
        decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio: the decoder's size.
        norm_pix_loss: regress per-patch normalised pixels.

    Raises:
        ConfigError: an encoder without the parts MAE needs (a patch embedding with a fixed grid,
            absolute position embeddings).
    """

    def __init__(self, encoder: nn.Module, *, in_chans: int, mask_ratio: float = 0.75, decoder_dim: int = 128,
                 decoder_depth: int = 2, decoder_heads: int = 4, decoder_mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = True):
        super().__init__()
        from timm.models.vision_transformer import Block

        name = type(encoder).__name__
        for part in ("patch_embed", "pos_embed", "blocks", "norm", "num_prefix_tokens"):
            if not hasattr(encoder, part):
                raise ConfigError(f"train.objective=mae needs a timm VisionTransformer; {name} has no {part!r}")
        if encoder.pos_embed is None:
            raise ConfigError(f"train.objective=mae needs absolute position embeddings; {name} has none (rope?)")
        self.encoder = encoder
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch = tuple(encoder.patch_embed.patch_size)
        self.grid = tuple(encoder.patch_embed.grid_size)
        self.num_prefix = int(encoder.num_prefix_tokens)
        width = int(encoder.embed_dim)
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_prefix_pos = nn.Parameter(torch.zeros(1, self.num_prefix, decoder_dim)) if self.num_prefix \
            else None
        self.register_buffer("decoder_pos", sincos_pos_embed_2d(decoder_dim, self.grid)[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=decoder_mlp_ratio, qkv_bias=True) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch[0] * self.patch[1] * in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue  # timm's own initialisation
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens with their position embeddings (prefix positions excluded), and the grid."""
        enc = self.encoder
        x = enc.patch_embed(images)
        if x.ndim == 4:  # dynamic_img_size: (B, H, W, D)
            grid = (x.shape[1], x.shape[2])
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            grid = self.grid
        if grid != self.grid:
            raise ValueError(f"images give a {grid} patch grid; this MAE was built for {self.grid}")
        pos = enc.pos_embed
        patch_pos = pos if getattr(enc, "no_embed_class", False) else pos[:, self.num_prefix:]
        return x + patch_pos, grid

    def _prefix(self, batch: int) -> torch.Tensor | None:
        """The class and register tokens (with their positions where the encoder has them)."""
        enc = self.encoder
        tokens = [t.expand(batch, -1, -1) for t in (getattr(enc, "cls_token", None), getattr(enc, "reg_token", None))
                  if t is not None]
        if not tokens:
            return None
        prefix = torch.cat(tokens, dim=1)
        if not getattr(enc, "no_embed_class", False):
            prefix = prefix + enc.pos_embed[:, :self.num_prefix]
        return prefix

    def encode(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, prefix + N_visible, D) of the visible patches `keep` (B, N_visible) only."""
        enc = self.encoder
        x, _ = self._embed(images)
        x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        prefix = self._prefix(x.shape[0])
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        x = enc.pos_drop(x) if hasattr(enc, "pos_drop") else x
        x = enc.norm_pre(x) if hasattr(enc, "norm_pre") else x
        if getattr(enc, "grad_checkpointing", False) and self.training:
            from timm.models import checkpoint_seq

            x = checkpoint_seq(enc.blocks, x)
        else:
            x = enc.blocks(x)
        return enc.norm(x)

    def decode(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Predicted pixels (B, N, P) of every patch from the encoded visible tokens."""
        b, n = latent.shape[0], self.num_patches
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :self.num_prefix], x[:, self.num_prefix:]
        full = self.mask_token.to(x.dtype).expand(b, n, -1).clone()
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), visible)
        full = full + self.decoder_pos.to(x.dtype)
        if self.decoder_prefix_pos is not None:
            full = torch.cat([prefix + self.decoder_prefix_pos.to(x.dtype), full], dim=1)
        for block in self.decoder_blocks:
            full = block(full)
        return self.decoder_pred(self.decoder_norm(full))[:, self.num_prefix:]

    def forward(self, images: torch.Tensor, seeds: torch.Tensor) -> MaeOutput:
        """Mask each image by its seed, encode the visible patches, predict all of them."""
        mask, keep = mask_from_seeds(seeds.to(images.device), self.num_patches, self.mask_ratio)
        pred = self.decode(self.encode(images, keep), keep)
        target = patch_targets(patchify(images, self.patch), self.norm_pix_loss)
        return MaeOutput(pred, target, mask)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, out: MaeOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """For figures: the reconstruction (B, C, H, W) in the input's intensity space, and where the
        patches were hidden (B, 1, H, W) bool.

        The reconstruction pastes the predicted patches into the masked places beside the visible
        ones. With ``norm_pix_loss`` the predictions are mapped back with each true patch's own mean
        and standard deviation (as MAE's figures do), so only their structure is the model's.
        """
        patches = patchify(images.float(), self.patch)
        pred = out.pred.float()
        if self.norm_pix_loss:
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        m = out.mask.unsqueeze(-1)
        recon = unpatchify(torch.where(m, pred, patches), self.patch, self.grid, self.in_chans)
        hidden = unpatchify(m.expand(-1, -1, self.patch[0] * self.patch[1]).float(), self.patch, self.grid, 1)
        return recon, hidden.bool()
