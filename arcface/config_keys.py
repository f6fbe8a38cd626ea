"""The documented set of config keys.

Every key a config may set lives here with one line of meaning; arcface/config_defaults.py holds the defaults.
The loader rejects anything else (with the nearest known key, or the plugin section it might be), so a typo
never silently trains with a default. Plugin sections (e.g. `kd`) are documented by their plugins.
`docs/configs.md` is checked against these tables by the tests.
"""

# Keys of insightface arcface_torch's base.py and job files, same names and meanings.
UPSTREAM_KEYS = {
    "margin_list": "(m1, m2, m3) of CombinedMarginLoss: (1.0, 0.5, 0.0) ArcFace, (1.0, 0.0, 0.4) CosFace",
    "network": "backbone name for arcface.backbones.get_model: r18 r34 r50 r100 r200 mbf mbf_large vit_t "
               "vit_t_dp005_mask0 vit_s vit_s_dp005_mask_0 vit_b vit_b_dp005_mask_005 vit_l_dp005_mask_005 vit_h",
    "resume": "continue from <output>/checkpoint_gpu_<rank>.pt at the saved epoch and step",
    "save_all_states": "write per-rank checkpoint_gpu_<rank>.pt (needed for resume)",
    "output": "output folder; None means work_dirs/<config file name>",
    "embedding_size": "embedding dimension of the backbone",
    "sample_rate": "Partial FC: fraction of class centres sampled per step, in (0, 1] (positives always kept); 1 = all",
    "interclass_filtering_threshold": "> 0 zeroes non-target logits above this cosine (noisy-label filtering)",
    "fp16": "mixed precision: fp16 autocast + GradScaler on CUDA; on CPU bf16 autocast where the CPU has fast bf16 "
            "kernels, else float32 (the log says which)",
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
    "num_epoch": "training epochs (0: as many as max_steps needs)",
    "warmup_epoch": "linear warmup epochs before the polynomial decay (<= 0: none)",
    "val_targets": "names of <rec>/<name>.bin verification sets to run every `verbose` steps",
    "wandb_key": "Weights & Biases API key for the login (not needed with WANDB_MODE=offline)",
    "suffix_run_name": "wandb: suffix of the run name <yymmdd_HHMM>_GPU<rank>",
    "using_wandb": "log to Weights & Biases (pip install 'ukd[wandb]'): config, loss, lr, verification accuracy; "
                   "the run's files go to <output>/wandb",
    "wandb_entity": "wandb entity (user or team) of the run",
    "wandb_project": "wandb project of the run",
    "wandb_log_all": "wandb: a run per rank instead of rank 0 only",
    "save_artifacts": "wandb: upload model.pt as an artifact after every epoch and at the end",
    "wandb_resume": "wandb: resume the run (wandb.init's resume argument)",
    "notes": "wandb: free text attached to the run",
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
    "max_steps": "the run's length in optimizer steps at most: training and the LR schedule (which decays to 0 at "
                 "its last step) end at min(max_steps, num_epoch epochs); with num_epoch=0 max_steps alone decides "
                 "(None: num_epoch epochs)",
    "num_threads": "torch CPU threads per process (None: OMP_NUM_THREADS if set, else the cores divided among the "
                   "local processes); DataLoader workers use one thread each",
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
    "dist_timeout": "seconds a collective may wait for the other ranks before the job stops with an error naming "
                    "the step (a stopped or dead rank); raise it for very slow steps or long evaluations on rank 0",
    "resume_unsafe_pickle": "resume from a checkpoint of an earlier version that holds pickled python objects: "
                            "reading it can run code from the file, so only for files you trust (checkpoints are "
                            "otherwise read with torch.load(weights_only=True))",
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

# What users of other trainers call these keys: an unknown key that is one of these (or is spelled like one) is
# answered with the key it means, e.g. learning_rate -> lr, which spelling alone would not find.
KEY_ALIASES = {
    "learning_rate": "lr", "base_lr": "lr", "lr_rate": "lr", "init_lr": "lr",
    "epochs": "num_epoch", "num_epochs": "num_epoch", "max_epoch": "num_epoch", "max_epochs": "num_epoch",
    "warmup": "warmup_epoch", "warmup_epochs": "warmup_epoch",
    "max_iter": "max_steps", "max_iters": "max_steps", "total_steps": "max_steps", "steps": "max_steps",
    "batchsize": "batch_size", "bs": "batch_size", "batch": "batch_size",
    "workers": "num_workers", "threads": "num_threads",
    "wd": "weight_decay", "decay": "weight_decay",
    "backbone": "network", "model": "network", "arch": "network",
    "emb_size": "embedding_size", "embedding_dim": "embedding_size", "feature_dim": "embedding_size",
    "num_features": "embedding_size",
    "margin": "margin_list", "margins": "margin_list", "scale": "margin_scale",
    "classes": "num_classes", "num_class": "num_classes", "num_ids": "num_classes",
    "data": "rec", "data_dir": "rec", "dataset_dir": "rec", "train_data": "rec",
    "amp": "fp16", "mixed_precision": "fp16", "half": "fp16",
    "grad_accum": "gradient_acc", "accumulation_steps": "gradient_acc", "gradient_accumulation": "gradient_acc",
    "val_sets": "val_targets", "val_datasets": "val_targets", "eval_sets": "val_targets",
    "log_every": "frequent", "print_freq": "frequent", "log_interval": "frequent",
    "eval_every": "verbose", "val_freq": "verbose", "eval_interval": "verbose",
    "save_every": "save_every_steps", "checkpoint_every": "save_every_steps",
    "clip": "clip_grad_norm", "grad_clip": "clip_grad_norm", "max_grad_norm": "clip_grad_norm",
    "distill": "kd", "distillation": "kd", "knowledge_distillation": "kd",
    "pretrained": "pretrained_backbone", "init_weights": "pretrained_backbone",
}
