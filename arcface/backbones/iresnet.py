"""IResNet of insightface arcface_torch, with the same state_dict so model-zoo weights load strictly.

Beyond upstream: `input_size` (any side >= 16; the fc adapts to the ceil(input_size/16) feature map) and
`width` (a channel multiplier for tiny CPU models; 1.0 is upstream exactly). The embedding is float32
whatever `fp16` says, because fc and features always run outside autocast.
"""
import operator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError

STAGE_CHANNELS = (64, 128, 256, 512)
STAGE_DEPTHS = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}


def _conv3x3(in_ch, out_ch, stride=1):
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-ish residual block: BN, conv, BN, PReLU, conv(stride), BN, + shortcut."""

    def __init__(self, in_ch, out_ch, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-05)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-05)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=1e-05)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=1e-05),
            )
        self.stride = stride
        self.gradient_checkpointing = False  # not a parameter: state_dict stays upstream's

    def _residual(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut

    def forward(self, x):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._residual, x, use_reentrant=False)
        return self._residual(x)


class IResNet(nn.Module):
    """Stem (stride 1) + four stages of stride 2 + BN, flatten, dropout, fc, BatchNorm1d (weight frozen at 1)."""

    def __init__(self, depths, dropout=0.0, num_features=512, fp16=False, input_size=112, width=1.0):
        super().__init__()
        if len(depths) != 4 or any(int(d) < 1 for d in depths):
            raise ConfigError(f"IResNet needs four stage depths >= 1, got {tuple(depths)}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {dropout}")
        if int(num_features) < 1:
            raise ConfigError(f"num_features must be a positive integer, got {num_features}")
        side = feature_map_side(input_size)
        channels = [scaled_channels(c, width) for c in STAGE_CHANNELS]
        self.fp16 = bool(fp16)
        self.input_size = int(input_size)
        self.width = float(width)
        self.extra_gflops = 0.0  # read by upstream's flops.py

        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0], eps=1e-05)
        self.prelu = nn.PReLU(channels[0])
        in_ch = channels[0]
        for index, (out_ch, depth) in enumerate(zip(channels, depths), start=1):
            blocks = [IBasicBlock(in_ch, out_ch, stride=2)]
            blocks += [IBasicBlock(out_ch, out_ch) for _ in range(int(depth) - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*blocks))
            in_ch = out_ch
        self.bn2 = nn.BatchNorm2d(in_ch, eps=1e-05)
        self.dropout = nn.Dropout(p=float(dropout), inplace=True)
        self.fc = nn.Linear(in_ch * side * side, int(num_features))
        self.features = nn.BatchNorm1d(int(num_features), eps=1e-05)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Upstream freezes the embedding BN scale: the margin loss sees a fixed-gain embedding.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def set_gradient_checkpointing(self, enabled=True):
        """Recompute each block in backward (upstream's `using_ckpt`), trading compute for memory."""
        for module in self.modules():
            if isinstance(module, IBasicBlock):
                module.gradient_checkpointing = bool(enabled)
        return self

    def forward(self, x):
        check_input(x, self.input_size, type(self).__name__)
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype(x), enabled=self.fp16):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.bn2(x)
            x = torch.flatten(x, 1)
            x = self.dropout(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.fc(x.to(self.fc.weight.dtype))
            x = self.features(x)
        return x


def build_iresnet(name, dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    if name not in STAGE_DEPTHS:
        raise ConfigError(f"unknown IResNet '{name}' (known: {', '.join(STAGE_DEPTHS)})")
    return IResNet(STAGE_DEPTHS[name], dropout=dropout, num_features=num_features, fp16=fp16,
                   input_size=input_size, width=width)


def scaled_channels(channels, width):
    """Channels times `width`, rounded to a multiple of 8 (at least 8); width 1.0 leaves upstream's counts."""
    width = float(width)
    if not width > 0:
        raise ConfigError(f"width must be > 0, got {width}")
    if width == 1.0:
        return int(channels)
    return max(8, int(round(channels * width / 8.0)) * 8)


def feature_map_side(input_size):
    """Side of the last feature map: four stride-2 3x3 convs (padding 1) each give ceil(n / 2), so ceil(n / 16).

    112 gives upstream's 7; sizes that are not multiples of 16 (e.g. 56 -> 4) work too.
    """
    try:
        size = None if isinstance(input_size, bool) else operator.index(input_size)
    except TypeError:
        size = None
    if size is None or size < 16:
        raise ConfigError(f"input_size must be an integer >= 16 (112 for insightface models), got {input_size!r}")
    return -(-size // 16)


def autocast_dtype(x):
    """fp16 is what CUDA tensor cores want; CPU autocast is only fast and safe in bfloat16."""
    return torch.bfloat16 if x.device.type == "cpu" else torch.float16


def check_input(x, input_size, what):
    """A wrong image size would otherwise surface as an unreadable matmul shape error in fc / GDC."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != input_size or x.shape[3] != input_size:
        raise ValueError(f"{what} built for input_size={input_size} expects images [B, 3, {input_size}, "
                         f"{input_size}], got {list(x.shape)}")
