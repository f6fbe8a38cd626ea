"""The one place that knows how a backward pass and an optimizer step differ between precisions.

    CUDA + fp16   the backbone autocasts to fp16; the loss is scaled (GradScaler), gradients are unscaled
                  before clipping, and a step with inf/NaN gradients is skipped by the scaler
    CPU  + fp16   the backbone autocasts to bf16, whose range needs no scaling: a plain step
    fp32          a plain step

The autocast itself lives in the backbones (upstream's `fp16` flag); this class hides the scaler.
"""
import torch


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
