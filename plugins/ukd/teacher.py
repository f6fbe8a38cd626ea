"""The frozen teacher: built with get_model, loaded strictly, never trained, never DDP-wrapped.

Peers (AdaDistill, PocketNet, TFace EKD, torchdistill) log a failed teacher load and go on with a random
teacher; here a missing or mismatched checkpoint is an error, and a sanity check on the verification sets
can stop a run whose teacher is no good before step 0.
"""
import time

import torch

from arcface.backbones import get_model
from arcface.backbones.loading import load_backbone_weights
from arcface.errors import ConfigError


class FrozenTeacher(torch.nn.Module):
    """A backbone in eval mode for good: `train()` is a no-op, parameters carry no gradient."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        super().train(False)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.last_ms = 0.0

    def train(self, mode=True):  # the student's .train() must not switch BN/dropout back on
        return super().train(False)

    def forward(self, images):
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.backbone(images)
        self.last_ms = (time.perf_counter() - start) * 1000
        # inference tensors cannot be saved for backward; a plain copy can take part in the KD losses
        return out.float().clone()


def build_teacher(kd, fp16, device, input_size=112, channels_last=False):
    if not kd.get("teacher_network"):
        raise ConfigError("kd.teacher_network is not set (e.g. 'r100'); the KD plugin needs a teacher")
    if not kd.get("teacher_weights"):
        raise ConfigError("kd.teacher_weights is not set: give the teacher's model.pt / backbone.pth; "
                          "a KD run never starts from a random teacher")
    backbone = get_model(kd.teacher_network, dropout=0.0, fp16=fp16, num_features=kd.teacher_embedding_size,
                         input_size=input_size,
                         **dict(kd.get("teacher_network_kwargs") or {}))
    load_backbone_weights(backbone, kd.teacher_weights, strict=True, what="teacher")
    teacher = FrozenTeacher(backbone).to(device)
    return teacher.to(memory_format=torch.channels_last) if channels_last else teacher
