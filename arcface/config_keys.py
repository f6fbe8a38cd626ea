"""The documented set of config keys.

Every key a config may set lives here with one line of meaning; arcface/config_defaults.py holds the defaults.
The loader rejects anything else (with the nearest known key, or the plugin section it might be), so a typo
never silently trains with a default. Plugin sections (e.g. `kd`) are documented by their plugins.
`docs/configs.md` is checked against these tables by the tests.
"""

# Keys of insightface arcface_torch's base.py and job files, same names and meanings.
UPSTREAM_KEYS = {
    "margin_list": "(m1, m2, m3) of CombinedMarginLoss: (1.0, 0.5, 0.0) ArcFace, (1.0, 0.0, 0.4) CosFace",
    "network": "backbone name for arcface.backbones.get_model: r18 r34 r50 r100 r200 mbf mbf_large",
    "resume": "continue from <output>/checkpoint_gpu_<rank>.pt at the saved epoch and step",
    "save_all_states": "write per-rank checkpoint_gpu_<rank>.pt (needed for resume)",
    "output": "output folder; None means work_dirs/<config file name>",
    "embedding_size": "embedding dimension of the backbone",
    "sample_rate": "Partial FC: fraction of class centres sampled per step (positives always kept); 1 = all",
    "interclass_filtering_threshold": "> 0 zeroes non-target logits above this cosine (noisy-label filtering)",
    "fp16": "mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on CPU",
    "batch_size": "images per process (per GPU) per step",
    "optimizer": "sgd or adamw",
    "lr": "base learning rate (peak after warmup)",
    "momentum": "SGD momentum (used, unlike upstream which hard-codes 0.9)",
    "weight_decay": "weight decay of both the backbone and the Partial FC centres",
    "verbose": "run the .bin verification every this many global steps",
    "frequent": "log a training line every this many global steps",
    "dali": "load data with NVIDIA DALI instead of PyTorch workers",
    "dali_aug": "DALI only: upstream's extra augmentations (resize, blur, colour jitter, grayscale)",
    "gradient_acc": "micro-steps accumulated per optimizer step (loss divided by it; no DDP sync between)",
    "seed": "random seed for weights, sampling and augmentation",
    "num_workers": "DataLoader worker processes per rank",
    "rec": "dataset folder holding train.rec/train.idx (and the .bin targets), an image folder, or 'synthetic'",
    "num_classes": "number of identities (labels must lie in [0, num_classes))",
    "num_image": "number of training images (for step counting; checked against the data)",
    "num_epoch": "training epochs",
    "warmup_epoch": "linear warmup epochs before the polynomial decay (<= 0: none)",
    "val_targets": "names of <rec>/<name>.bin verification sets to run every `verbose` steps",
    "wandb_key": "Weights & Biases API key (wandb is optional and not installed by default)",
    "suffix_run_name": "suffix of the wandb run name",
    "using_wandb": "log to Weights & Biases",
    "wandb_entity": "wandb entity",
    "wandb_project": "wandb project",
    "wandb_log_all": "wandb: log from every rank",
    "save_artifacts": "wandb: upload model.pt as an artifact",
    "wandb_resume": "wandb: resume the last run",
    "notes": "free text attached to the run (upstream reads it for wandb)",
}

# Keys that older arcface_torch configs carry; accepted so those files run, and reported as ignored.
LEGACY_KEYS = {
    "loss": "old train.py: the margin is chosen by margin_list now",
    "decay_epoch": "old train.py step schedule; the current engine uses polynomial decay",
    "dataset": "old train.py: the data is given by rec",
    "lr_name": "old train.py scheduler name",
}

# Keys this engine adds. All have defaults in configs/base.py that reproduce upstream behaviour.
ENGINE_KEYS = {
    "margin_scale": "s of the margin softmax (upstream hard-codes 64)",
    "margin_gradient": "margin softmax gradient: 'straight_through' (arcface_torch's: the margin is added to the target "
                       "logit's value, its slope stays 1) or 'exact' (the derivative of cos(m1*theta + m2) - m3)",
    "clip_grad_norm": "max gradient norm of the backbone (upstream hard-codes 5); <= 0 disables clipping",
    "input_size": "square input side in pixels; 112 is the insightface size, smaller sizes are for CPU runs",
    "network_kwargs": "extra keyword arguments for get_model, e.g. {'width': 0.25} for a small CPU model",
    "pretrained_backbone": "path of a model.pt/backbone.pth to initialise the backbone from (strict load)",
    "max_steps": "stop after this many global steps (None: num_epoch epochs)",
    "save_every_steps": "also write checkpoints every N global steps (0: only at the end of each epoch)",
    "channels_last": "channels-last memory format for the backbones and their inputs (faster convolutions on CPU "
                     "and tensor cores)",
    "flip": "random horizontal flip of training images",
    "sampler": "random (upstream's distributed sampler) or pk (P identities x K images per batch)",
    "pk_k": "pk sampler: images per identity in a batch",
    "pk_random_fraction": "pk sampler: fraction of each batch filled with plain random samples",
    "skip_bad_records": "count and skip undecodable records instead of stopping with an error",
    "val_batch_size": "batch size of the .bin verification",
    "device": "auto, cpu or cuda",
    "dist_backend": "None picks nccl on CUDA and gloo on CPU",
    "tensorboard": "write TensorBoard scalars to <output>",
    "plugins": "registered plugins to switch on: names, or dicts {'name': ..., **parameters}; a plugin with a config "
               "section (the KD plugin's `kd`) is switched on by `<section>.enabled = True` instead",
    "plugin_modules": "python modules to import before the config is checked, so that the plugins they register "
                      "(and their config sections) are known; installed packages register through the "
                      "'arcface.plugins' entry point group instead",
}

# Keys the engine derives itself; a job file that sets one is refused, since its value would be overwritten.
DERIVED_KEYS = {
    "config_name": "the job file's name without .py (set by the loader)",
    "total_batch_size": "batch_size x world size (the trainer's schedule; not a config key)",
    "warmup_step": "optimizer steps of warmup, from warmup_epoch (the trainer's schedule; not a config key)",
    "total_step": "optimizer steps in total, from num_epoch / max_steps (the trainer's schedule; not a config key)",
}

ALL_KEYS = {**UPSTREAM_KEYS, **LEGACY_KEYS, **ENGINE_KEYS}
