"""MobileFaceNet as arcface_torch's `get_mbf` / `get_mbf_large` (itself from cavaface), same state_dict.

Naming follows upstream because the parameter names are the checkpoint format: a `ConvBlock` is
conv+BN+PReLU, a `LinearBlock` conv+BN, a `DepthWise` the inverted bottleneck whose `groups` argument is
its expanded (depthwise) channel count, and `GDC` the global depthwise conv head. Only the stem-to-trunk
`self.layers` runs under autocast; `conv_sep` and the head run in float32, so the embedding is float32.
"""
import math

import torch
from torch import nn

from ..errors import ConfigError
from .iresnet import autocast_dtype, check_input, feature_map_side, scaled_channels

MBF_BLOCKS = {"mbf": ((1, 4, 6, 2), 2), "mbf_large": ((2, 8, 12, 4), 4)}


class ConvBlock(nn.Module):
    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.PReLU(out_ch),
        )

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    """1x1 expand to `groups` channels, 3x3 depthwise (stride), 1x1 linear projection; optional shortcut."""

    def __init__(self, in_ch, out_ch, residual=False, stride=2, groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_ch, groups),
            ConvBlock(groups, groups, kernel=3, stride=stride, padding=1, groups=groups),
            LinearBlock(groups, out_ch),
        )

    def forward(self, x):
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    def __init__(self, channels, num_block, groups):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, residual=True, stride=1, groups=groups)
                                      for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv over the whole last feature map, then a bias-free linear and BatchNorm1d."""

    def __init__(self, channels, embedding_size, side):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=side, groups=channels),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, fp16=False, num_features=512, blocks=(1, 4, 6, 2), scale=2, input_size=112, width=1.0):
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ConfigError(f"MobileFaceNet needs four block counts >= 1, got {tuple(blocks)}")
        if int(num_features) < 1:
            raise ConfigError(f"num_features must be a positive integer, got {num_features}")
        side = feature_map_side(input_size)
        self.fp16 = bool(fp16)
        self.scale = scale
        self.input_size = int(input_size)
        self.width = float(width)
        narrow = scaled_channels(64 * scale, width)
        wide = scaled_channels(128 * scale, width)
        expand_1, expand_2, expand_3 = (scaled_channels(c, width) for c in (128, 256, 512))
        head = scaled_channels(512, width)

        self.layers = nn.ModuleList([ConvBlock(3, narrow, kernel=3, stride=2, padding=1)])
        if blocks[0] == 1:
            # Upstream: a grouped (not depthwise) 3x3 with 64 groups; gcd keeps it valid at any width.
            groups = math.gcd(narrow, scaled_channels(64, width))
            self.layers.append(ConvBlock(narrow, narrow, kernel=3, stride=1, padding=1, groups=groups))
        else:
            self.layers.append(Residual(narrow, blocks[0], groups=expand_1))
        self.layers.extend([
            DepthWise(narrow, narrow, stride=2, groups=expand_1),
            Residual(narrow, blocks[1], groups=expand_1),
            DepthWise(narrow, wide, stride=2, groups=expand_2),
            Residual(wide, blocks[2], groups=expand_2),
            DepthWise(wide, wide, stride=2, groups=expand_3),
            Residual(wide, blocks[3], groups=expand_2),
        ])
        self.conv_sep = ConvBlock(wide, head)
        self.features = GDC(head, int(num_features), side)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        check_input(x, self.input_size, type(self).__name__)
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype(x), enabled=self.fp16):
            for layer in self.layers:
                x = layer(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.conv_sep(x.to(self.conv_sep.layers[0].weight.dtype))
            x = self.features(x)
        return x


def build_mobilefacenet(name, dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    if name not in MBF_BLOCKS:
        raise ConfigError(f"unknown MobileFaceNet '{name}' (known: {', '.join(MBF_BLOCKS)})")
    if dropout:
        # Upstream silently ignores it; a config that asks for dropout should learn it gets none.
        raise ConfigError(f"{name} has no dropout layer; set dropout=0.0 (got {dropout})")
    blocks, scale = MBF_BLOCKS[name]
    return MobileFaceNet(fp16=fp16, num_features=num_features, blocks=blocks, scale=scale,
                         input_size=input_size, width=width)
