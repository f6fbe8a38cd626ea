"""Procedural faces: a seeded identity space, a renderer with nuisance and exact landmarks, and writers
for the training .rec, verification .bin and IJB-style folders (see tools/make_synthetic.py)."""
from .identity import FAMILY_SIZE, Identity, identity_latent, make_identity
from .nuisance import Nuisance, detector_score, sample_nuisance, sample_rng, scene_rng, stream_id
from .render import (ARCFACE_TEMPLATE_112, LOOSE_FACTOR, Pose, Rendered, compose_pose, fit_similarity, render,
                     render_sample)
from .writers import (GENERATOR_VERSION, NUM_FOLDS, artifact_splits, contact_sheet, dataset_spec, generate,
                      identity_splits, load_manifest, manifest_matches, parallel_render, plan_ijb, plan_pairs,
                      validate_spec, write_ijb, write_preview, write_train_rec, write_verification_bin)

__all__ = [
    "FAMILY_SIZE", "Identity", "identity_latent", "make_identity",
    "Nuisance", "detector_score", "sample_nuisance", "sample_rng", "scene_rng", "stream_id",
    "ARCFACE_TEMPLATE_112", "LOOSE_FACTOR", "Pose", "Rendered", "compose_pose", "fit_similarity", "render",
    "render_sample",
    "GENERATOR_VERSION", "NUM_FOLDS", "artifact_splits", "contact_sheet", "dataset_spec", "generate", "identity_splits",
    "load_manifest", "manifest_matches", "parallel_render", "plan_ijb", "plan_pairs", "validate_spec", "write_ijb",
    "write_preview", "write_train_rec", "write_verification_bin",
]
