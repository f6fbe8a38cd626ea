"""Face-recognition backbones by name, as arcface_torch's `get_model` but from a table.

    model = get_model("r50", dropout=0.0, fp16=True, num_features=512)            # upstream call
    tiny = get_model("r18", num_features=128, input_size=32, width=0.25)          # CPU test model
    teacher = get_model("vit_t_dp005_mask0", fp16=True, num_features=512)          # WebFace42M ViT-T

Every factory takes the same keywords: dropout, fp16, num_features (upstream's) and input_size, width
(ours; 112 and 1.0 reproduce upstream's parameters exactly). A name or keyword that does not exist is a
ConfigError with the nearest valid one.
"""
from ..registry import Registry
from .iresnet import IResNet, build_iresnet
from .loading import load_backbone_weights
from .mobilefacenet import MobileFaceNet, build_mobilefacenet
from .vit import VisionTransformer, build_vit

BACKBONES = Registry("backbone")
_SHAPE_DEFAULTS = {"num_features": 512, "input_size": 112, "width": 1.0}  # keywords that change the state_dict

__all__ = ["BACKBONES", "IResNet", "MobileFaceNet", "VisionTransformer", "get_model", "list_models",
           "load_backbone_weights"]


@BACKBONES.register("r18")
def r18(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_iresnet("r18", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("r34")
def r34(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_iresnet("r34", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("r50")
def r50(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_iresnet("r50", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("r100")
def r100(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_iresnet("r100", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("r200")
def r200(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_iresnet("r200", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("mbf")
def mbf(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_mobilefacenet("mbf", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("mbf_large")
def mbf_large(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_mobilefacenet("mbf_large", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("vit_t")
def vit_t(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_vit("vit_t", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("vit_t_dp005_mask0")
def vit_t_dp005_mask0(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_vit("vit_t_dp005_mask0", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("vit_s")
def vit_s(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_vit("vit_s", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("vit_s_dp005_mask_0")
def vit_s_dp005_mask_0(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_vit("vit_s_dp005_mask_0", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("vit_b")
def vit_b(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_vit("vit_b", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("vit_b_dp005_mask_005")
def vit_b_dp005_mask_005(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_vit("vit_b_dp005_mask_005", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("vit_l_dp005_mask_005")
def vit_l_dp005_mask_005(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_vit("vit_l_dp005_mask_005", dropout, fp16, num_features, input_size, width)


@BACKBONES.register("vit_h")
def vit_h(dropout=0.0, fp16=False, num_features=512, input_size=112, width=1.0):
    return build_vit("vit_h", dropout, fp16, num_features, input_size, width)


def get_model(name, **kwargs):
    """Build backbone `name`; the result carries `.network` (name plus non-default keywords) for messages."""
    model = BACKBONES.build(name, **kwargs)
    shape_args = [f"{key}={kwargs[key]}" for key, default in _SHAPE_DEFAULTS.items()
                  if key in kwargs and kwargs[key] != default]
    model.network = f"{name}({', '.join(shape_args)})" if shape_args else name
    return model


def list_models():
    return BACKBONES.names()
