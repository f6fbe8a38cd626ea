"""The one place that knows how precision differs between devices: whether `fp16` autocasts at all, and how a
backward pass and an optimizer step differ.

    CUDA + fp16   the backbone autocasts to fp16; the loss is scaled (GradScaler), gradients are unscaled
                  before clipping, and a step with inf/NaN gradients is skipped by the scaler
    CPU  + fp16   bf16 autocast where the CPU runs bf16 fast (oneDNN's bf16 kernels: AVX-512 and newer); on a
                  CPU without them (AVX2 only) bf16 is 3-5x slower than fp32, so fp32 is used and the log says so
    fp32          a plain step

The autocast itself lives in the backbones (upstream's `fp16` flag); `autocast_for` decides the flag they get.
"""
import torch


def cpu_bf16_is_fast():
    """oneDNN has native bf16 kernels on this CPU (False on AVX2-only machines, where bf16 is emulated)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_for(fp16, device):
    """(autocast on?, a phrase for the log) for a network asked to run with `fp16` on `device`."""
    device = torch.device(device)
    if not fp16:
        return False, "float32"
    if device.type == "cuda":
        return True, "float16 autocast with a grad scaler"
    if cpu_bf16_is_fast():
        return True, "bfloat16 autocast (this CPU runs bf16 natively)"
    return False, "float32: fp16=True, but this CPU has no fast bf16 kernels (bf16 would run 3-5x slower)"


class MixedPrecision:
    def __init__(self, fp16, device):
        self.scaler = (torch.amp.GradScaler("cuda", growth_interval=100)
                       if fp16 and torch.device(device).type == "cuda" else None)

    @property
    def scale(self):
        """The loss scale for the log line (upstream's 'Fp16 Grad Scale'), None without a scaler."""
        return self.scaler.get_scale() if self.scaler is not None else None

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer, clip_params=(), max_norm=0.0):
        """Unscale, clip to max_norm (<= 0: no clipping), step; returns the gradient norm before clipping, or
        None when not clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = None
        if max_norm and max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(clip_params, max_norm)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return norm

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state):
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
