"""Vision Transformer of insightface arcface_torch (`backbones/vit.py`), same state_dict, for the ViT-T/S/B/L/H
face models insightface trains with Partial FC on WebFace42M.

There is no class token: every patch token, flattened in grid order, feeds the head
Linear(dim * tokens, dim) -> BN -> Linear(dim, num_features) -> BN, so the embedding knows where on the
aligned face each token came from. In training, a fraction of the tokens is dropped before the blocks
(random masking) and a learnt mask token takes their places after the final LayerNorm, and each residual
branch is skipped per sample with a probability rising linearly over depth (drop path).

Departures from upstream; none changes a weight, so files load strictly both ways:
- `fp16` switches autocast on (bf16 on CPU); upstream's blocks autocast on CUDA whatever `fp16` says.
  Attention scores and softmax stay float32 as upstream, and so does the head: the embedding is float32.
Kept as upstream, on purpose: its forward calls the masking with its 0.1 default, so every variant whose
mask_ratio is above 0 (the `*_mask_005` ones included) drops 10 % of the tokens in training, whatever its name
says; a model trained here trains as it would there. `mask_ratio` only switches masking on or off.
- `input_size` and `width` give small models: patches of input_size // 13 + 1 pixels (9 at 112: upstream's
  12 x 12 grid, its last 4 pixel rows and columns unused; never more than 12 tokens a side) and embed_dim
  times width. `dropout` is upstream's drop_rate (after the position embedding, attention and MLP).
"""
import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .iresnet import autocast_dtype, check_input, scaled_channels

MAX_GRID = 12          # tokens per side at most: upstream's 112 px / 9 px patches
NUM_HEADS = 8          # every upstream variant
MLP_RATIO = 4
HEAD_BN_EPS = 2e-5


UPSTREAM_TRAIN_MASK_RATIO = 0.1  # what upstream's forward masks with whenever mask_ratio > 0


@dataclass(frozen=True)
class ViTVariant:
    embed_dim: int
    depth: int
    drop_path_rate: float
    mask_ratio: float
    gradient_checkpointing: bool  # upstream's using_checkpoint: on for the deep variants


VIT_VARIANTS = {
    "vit_t": ViTVariant(256, 12, 0.1, 0.1, False),
    "vit_t_dp005_mask0": ViTVariant(256, 12, 0.05, 0.0, False),
    "vit_s": ViTVariant(512, 12, 0.1, 0.1, False),
    "vit_s_dp005_mask_0": ViTVariant(512, 12, 0.05, 0.0, False),
    "vit_b": ViTVariant(512, 24, 0.1, 0.1, True),
    "vit_b_dp005_mask_005": ViTVariant(512, 24, 0.05, 0.05, True),
    "vit_l_dp005_mask_005": ViTVariant(768, 24, 0.05, 0.05, True),
    "vit_h": ViTVariant(1024, 48, 0.1, 0.0, True),
}


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of samples and rescale the
    rest by 1 / keep, so the expected branch output is unchanged and eval needs no correction."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        per_sample = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0:
            per_sample.div_(keep)
        return x * per_sample

    def extra_repr(self):
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    """Multi-head self-attention; the projections may autocast, scores and softmax are always float32."""

    def __init__(self, dim, num_heads=NUM_HEADS, drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)

    def forward(self, x):
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = qkv.float().unbind(0)
            weights = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
            out = (weights @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block; the two norms are registered first, as upstream's state_dict lists them."""

    def __init__(self, dim, num_heads, drop_path=0.0, drop=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, drop)
        self.drop_path = DropPath(drop_path)
        self.mlp = Mlp(dim, dim * MLP_RATIO, drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a conv with stride = kernel; pixels past the last whole patch are unused."""

    def __init__(self, img_size, patch_size, embed_dim, in_channels=3):
        super().__init__()
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def random_token_mask(tokens, keep):
    """Keep `keep` tokens per sample, chosen uniformly (argsort of uniform noise, as in MAE); returns the kept
    tokens in noise order and, per sample, the permutation that puts the full sequence back in grid order."""
    batch, length, dim = tokens.shape
    order = torch.rand(batch, length, device=tokens.device).argsort(dim=1)
    restore = order.argsort(dim=1)
    kept = tokens.gather(1, order[:, :keep].unsqueeze(-1).expand(-1, -1, dim))
    return kept, restore


class VisionTransformer(nn.Module):
    def __init__(self, input_size=112, patch_size=9, num_features=512, embed_dim=768, depth=12,
                 num_heads=NUM_HEADS, drop_rate=0.0, drop_path_rate=0.0, mask_ratio=0.1, fp16=False,
                 gradient_checkpointing=False, width=1.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ConfigError(f"VisionTransformer: embed_dim {embed_dim} is not divisible by {num_heads} heads")
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ConfigError(f"VisionTransformer: mask_ratio must lie in [0, 1), got {mask_ratio}")
        self.fp16 = bool(fp16)
        self.input_size = int(input_size)
        self.width = float(width)
        self.embed_dim = int(embed_dim)
        self.mask_ratio = float(mask_ratio)
        self.gradient_checkpointing = bool(gradient_checkpointing)

        self.patch_embed = PatchEmbed(self.input_size, int(patch_size), self.embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, self.embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, int(depth), device="cpu").tolist()  # float32, as upstream
        self.blocks = nn.ModuleList([Block(self.embed_dim, num_heads, rate, drop_rate) for rate in rates])
        self.norm = nn.LayerNorm(self.embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(self.embed_dim * self.num_patches, self.embed_dim, bias=False),
            nn.BatchNorm1d(self.embed_dim, eps=HEAD_BN_EPS),
            nn.Linear(self.embed_dim, int(num_features), bias=False),
            nn.BatchNorm1d(int(num_features), eps=HEAD_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        # read by upstream's flops.py: the attention products, which a parameter count misses
        self.extra_gflops = int(depth) * 2 * self.num_patches ** 2 * self.embed_dim / 1000 ** 3
        self._init_weights()

    def _init_weights(self):
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_gradient_checkpointing(self, enabled=True):
        """Recompute each block in backward (upstream's `using_checkpoint`); drop path draws the same masks."""
        self.gradient_checkpointing = bool(enabled)
        return self

    def tokens_kept(self):
        """Tokens that survive masking in training: upstream's int(L * (1 - 0.1)) (see the module docstring)."""
        return int(self.num_patches * (1 - UPSTREAM_TRAIN_MASK_RATIO))

    def forward(self, x):
        check_input(x, self.input_size, type(self).__name__)
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        restore = None
        if self.training and self.mask_ratio > 0:
            x, restore = random_token_mask(x, self.tokens_kept())
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype(x), enabled=self.fp16):
            for block in self.blocks:
                if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.norm(x.float())
            if restore is not None:
                fill = self.mask_token.to(x.dtype).expand(x.shape[0], restore.shape[1] - x.shape[1], -1)
                x = torch.cat([x, fill], dim=1).gather(1, restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            x = self.feature(x.flatten(1))
        return x


def patch_size_for(input_size):
    """The finest patch whose grid has at most MAX_GRID tokens a side: 9 px at 112 (upstream), 3 px at 32."""
    try:
        size = None if isinstance(input_size, bool) else operator.index(input_size)
    except TypeError:
        size = None
    if size is None or size < 16:
        raise ConfigError(f"input_size must be an integer >= 16 (112 for insightface models), got {input_size!r}")
    return size // (MAX_GRID + 1) + 1


def build_vit(name, dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    if name not in VIT_VARIANTS:
        raise ConfigError(f"unknown ViT '{name}' (known: {', '.join(VIT_VARIANTS)})")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
    if int(num_features) < 1:
        raise ConfigError(f"num_features must be a positive integer, got {num_features}")
    variant = VIT_VARIANTS[name]
    return VisionTransformer(
        input_size=input_size, patch_size=patch_size_for(input_size), num_features=num_features,
        embed_dim=scaled_channels(variant.embed_dim, width), depth=variant.depth, drop_rate=float(dropout),
        drop_path_rate=variant.drop_path_rate, mask_ratio=variant.mask_ratio, fp16=fp16,
        gradient_checkpointing=variant.gradient_checkpointing, width=width)
