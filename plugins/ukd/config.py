"""The `kd` config section: its keys, defaults and meanings (the single source for validation and docs)."""
from arcface.engine.plugins import ConfigSection

KD_KEYS = {
    "enabled": (False, "switch the UKD plugin on"),
    "teacher_network": (None, "teacher backbone name for get_model, e.g. 'r100'"),
    "teacher_weights": (None, "teacher checkpoint (arcface_torch model.pt / backbone.pth), loaded strictly"),
    "teacher_embedding_size": (512, "teacher embedding dimension"),
    "teacher_network_kwargs": ({}, "extra get_model keyword arguments of the teacher (e.g. width for tiny runs)"),
    "teacher_check": (True, "evaluate the teacher on the .bin targets before step 0 and stop if it is poor"),
    "teacher_check_targets": (None, "names of <rec>/<name>.bin sets for the check (None: val_targets)"),
    "teacher_min_accuracy": (0.8, "the teacher sanity check fails below this verification accuracy"),
    "teacher_backend": ("torch", "where teacher embeddings come from: 'torch' (teacher_network + teacher_weights), "
                        "'onnx' (teacher_onnx, run with onnxruntime) or 'cache' (teacher_cache, built once by "
                        "tools/cache_teacher.py; needs the PyTorch RecordIO loader, not DALI)"),
    "teacher_onnx": (None, "the teacher as an ONNX file (teacher_backend='onnx', or to build / check a cache)"),
    "teacher_onnx_layout": ("NCHW", "input layout the ONNX teacher expects: 'NCHW' or 'NHWC' (checked at start-up)"),
    "teacher_onnx_normalize": ("arcface", "input normalisation the ONNX teacher expects, applied to 0..255 pixels: "
                               "'arcface' ((x - 127.5) / 127.5, insightface models), 'none' (raw 0..255) or "
                               "{'mean': m, 'std': s} ((x - m) / s; m, s scalars or 3 values in the model's "
                               "channel order)"),
    "teacher_onnx_channels": ("RGB", "channel order the ONNX teacher expects: 'RGB' or 'BGR'"),
    "teacher_cache": (None, "teacher embedding cache file written by tools/cache_teacher.py (teacher_backend="
                      "'cache'); its header must match the data set, input_size, embedding size and, when "
                      "teacher_weights / teacher_onnx is also set, that file's sha256"),
    "projector": ("auto", "student->teacher projector: auto (linear when the sizes differ), linear, or none"),
    "losses": ({"iled": {"weight": 10.0}, "rpsd": {"weight": 10.0}},
               "KD losses: {name: {weight, ramp_steps, <loss parameters>}}; see docs/plugins.md for each loss"),
}


KD_SECTION = ConfigSection(
    key="kd",
    keys=KD_KEYS,
    intro=("The knowledge-distillation section, owned by the UKD plugin (`plugins/ukd/`). It is off unless "
           "`config.kd.enabled = True`; its keys are checked even while it is off. Each term of `kd.losses` is "
           "`{name: {\"weight\": w, \"ramp_steps\": n, **parameters}}`; the losses and their parameters are listed "
           "in [plugins.md](plugins.md). Losses that match relations between samples (rpsd) want positive pairs in "
           "a batch: use the P x K sampler (`config.sampler = 'pk'`)."),
    example=("config.sampler = \"pk\"\n"
             "config.kd = edict(enabled=True, teacher_network=\"r100\", "
             "teacher_weights=\"work_dirs/ms1mv3_r100/model.pt\",\n"
             "                  losses={\"iled\": {\"weight\": 10.0}, \"rpsd\": {\"weight\": 10.0, \"bank\": 16384}})"),
)


def resolve_kd_config(section):
    """Defaults merged with the user's section; an unknown key is a ConfigError naming the nearest one."""
    return KD_SECTION.resolve(section, "config.kd")
