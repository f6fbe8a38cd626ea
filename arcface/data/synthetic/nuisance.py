"""Per-image nuisance: everything that changes between two photos of the same person.

`difficulty` (0..1) scales every nuisance's strength; 0 gives clean frontal renders, 1 the hardest
setting. `pose_scale` widens only the pose ranges (for a cross-pose verification set). A sample's
nuisance is drawn from a generator seeded by (seed, identity, sample, stream), so it is a pure function
of those numbers. IJB media share a "scene" (background, light, clothes, base pose) between their
frames: pass a separate `scene_rng` seeded by the media.
"""
import math
import zlib
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError

_STREAM_SAMPLE = 21
_STREAM_SCENE = 22


@dataclass(frozen=True)
class Nuisance:
    yaw: float = 0.0              # radians; cylinder-projection turn of the head
    pitch: float = 0.0            # radians
    roll: float = 0.0             # radians, residual in-plane rotation after alignment
    scale: float = 1.0            # multiplicative scale after alignment
    shift: tuple = (0.0, 0.0)     # translation after alignment, in fractions of the crop size
    place: tuple = (0.0, 0.0)     # loose mode: face offset inside the loose crop, fractions of the free margin
    smile: float = 0.0            # face units the mouth corners rise
    mouth_open: float = 0.0       # face units between the lips
    eye_closure: float = 0.0      # 0 open .. 1 closed
    brow_raise: float = 0.0       # face units
    gaze: tuple = (0.0, 0.0)      # iris offset, fraction of the eye size
    glasses_on: bool = True       # an identity that owns glasses wears them in this image
    light_angle: float = 0.0      # direction of the image-space light gradient
    light_strength: float = 0.0   # relative brightness change across the crop
    ambient: float = 1.0
    cast: tuple = (1.0, 1.0, 1.0)
    clothes: tuple = (0.3, 0.3, 0.35)
    background: tuple = (0.5, 0.5, 0.5)  # base colour of the background
    background_texture: float = 0.0  # amplitude of the smooth colour variation over the background
    clutter: int = 0              # number of background shapes
    occluders: int = 0            # number of occluding patches over the face
    blur: float = 0.0             # Gaussian sigma in pixels at 112 (scaled to the size)
    lowres: float = 1.0           # down-then-up sampling factor (1 = none)
    noise: float = 0.0            # Gaussian noise sigma, 0..255 scale
    grayscale: bool = False
    jpeg_quality: int = 95
    detail_seed: int = 0          # seeds the per-image randomness (occluders, noise)
    scene_seed: int = 0           # seeds the background pattern and clutter (shared by a media's frames)

    @classmethod
    def none(cls, background=(0.5, 0.5, 0.5)):
        """No nuisance at all: frontal, neutral, flat background; for tests and identity sheets."""
        return cls(background=tuple(background))


def sample_rng(seed, identity, sample, stream=0):
    """Generator of one image's nuisance; `stream` separates data set parts (train, each .bin, IJB)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM_SAMPLE, int(stream), int(identity),
                                                         int(sample)]))


def scene_rng(seed, identity, media, stream=0):
    """Generator of the scene shared by the frames of one IJB media."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _STREAM_SCENE, int(stream), int(identity),
                                                         int(media)]))


def stream_id(name):
    """Stable stream number for a named data set part (Python's hash() is salted per process)."""
    return zlib.crc32(str(name).encode("utf-8")) & 0x7FFFFFFF


def _check(difficulty, pose_scale, mode):
    if not (0.0 <= float(difficulty) <= 1.0):
        raise ConfigError(f"synthetic faces: difficulty must lie in [0, 1], got {difficulty!r}")
    if not (0.0 <= float(pose_scale) <= 3.0):
        raise ConfigError(f"synthetic faces: pose_scale must lie in [0, 3], got {pose_scale!r}")
    if mode not in ("aligned", "loose"):
        raise ConfigError(f"synthetic faces: mode must be 'aligned' or 'loose', got {mode!r}")


def sample_nuisance(rng, difficulty=0.5, pose_scale=1.0, mode="aligned", scene=None):
    """Draw one image's nuisance. `scene` (a generator) supplies the parts shared within a media; when it
    is None they come from `rng` too, i.e. every image is its own scene."""
    _check(difficulty, pose_scale, mode)
    d = float(difficulty)
    loose = mode == "loose"
    sc = rng if scene is None else scene

    # Scene: pose base, light, background, clothes, glasses habit.
    deg = math.pi / 180.0
    yaw_base = float(np.clip(sc.normal(0.0, 24.0 * d * pose_scale), -55.0, 55.0)) * deg
    pitch_base = float(np.clip(sc.normal(0.0, 9.0 * d * pose_scale), -25.0, 25.0)) * deg
    light_angle = float(sc.uniform(0, 2 * math.pi))
    light_strength = float(sc.uniform(0.0, 0.9 * d))
    ambient = float(np.exp(sc.normal(0.0, 0.22 * d)))
    cast = tuple(float(c) for c in np.exp(sc.normal(0.0, 0.07 * d, size=3)))
    clothes = tuple(float(c) for c in sc.uniform(0.05, 0.9, size=3))
    background = tuple(float(c) for c in sc.uniform(0.1, 0.9, size=3))
    background_texture = float(sc.uniform(0.05, 0.25))
    clutter = int(sc.integers(0, 1 + int(round(6 * d)))) if d > 0 else 0
    glasses_on = bool(sc.random() < 0.85)
    scene_detail = int(sc.integers(0, 2**31 - 1))

    # Shot: small changes around the scene (media frames), or everything (independent images).
    jitter = 0.25 if scene is not None else 1.0
    yaw = yaw_base + (float(rng.normal(0.0, 5.0 * d)) * deg if scene is not None else 0.0)
    pitch = pitch_base + (float(rng.normal(0.0, 2.0 * d)) * deg if scene is not None else 0.0)
    if loose:
        roll = float(np.clip(rng.normal(0.0, 14.0 * d), -40, 40)) * deg
        scale = float(np.exp(rng.normal(0.0, 0.15 * max(d, 0.3))))
        shift = (0.0, 0.0)
        place = (float(rng.uniform(-0.8, 0.8)), float(rng.uniform(-0.8, 0.8)))
    else:
        roll = float(np.clip(rng.normal(0.0, 4.0 * d), -12, 12)) * deg
        scale = float(np.exp(rng.normal(0.0, 0.05 * d)))
        shift = (float(rng.normal(0.0, 0.025 * d)), float(rng.normal(0.0, 0.025 * d)))
        place = (0.0, 0.0)
    smile = float(rng.uniform(-0.8, 3.5) * min(1.0, 0.3 + d))
    mouth_open = float(rng.uniform(0.5, 5.0)) * min(1.0, 0.3 + d) if rng.random() < 0.35 * min(1.0, 0.4 + d) else 0.0
    eye_closure = float(rng.uniform(0.3, 1.0)) if rng.random() < 0.12 * d else float(rng.uniform(0.0, 0.25 * d))
    brow_raise = float(rng.normal(0.0, 1.2 * d))
    gaze = (float(rng.normal(0.0, 0.12 * d)), float(rng.normal(0.0, 0.06 * d)))
    blur = float(rng.uniform(0.0, 1.8 * d)) if rng.random() < 0.5 * d * jitter + (0.5 * d if loose else 0) else 0.0
    lowres = float(rng.uniform(1.5, 1.5 + 3.0 * d)) if rng.random() < 0.3 * d else 1.0
    noise = float(rng.uniform(0.0, 14.0 * d))
    grayscale = bool(rng.random() < 0.06 * d)
    jpeg_quality = int(rng.integers(int(round(95 - 60 * d)), 96))
    occluders = int(rng.integers(1, 3)) if rng.random() < 0.3 * d else 0
    detail_seed = int(rng.integers(0, 2**31 - 1))
    return Nuisance(
        yaw=yaw, pitch=pitch, roll=roll, scale=scale, shift=shift, place=place, smile=smile,
        mouth_open=mouth_open, eye_closure=eye_closure, brow_raise=brow_raise, gaze=gaze, glasses_on=glasses_on,
        light_angle=light_angle, light_strength=light_strength, ambient=ambient, cast=cast, clothes=clothes,
        background=background, background_texture=background_texture, clutter=clutter, occluders=occluders,
        blur=blur, lowres=lowres, noise=noise, grayscale=grayscale, jpeg_quality=jpeg_quality,
        detail_seed=detail_seed, scene_seed=scene_detail)


def detector_score(n):
    """A faceness score that falls with the things that make a face hard to see (IJB weighs by it)."""
    hard = (abs(n.yaw) / (50 * math.pi / 180) * 0.35 + abs(n.pitch) / (25 * math.pi / 180) * 0.1
            + min(n.blur / 2.0, 1.0) * 0.15 + min((n.lowres - 1.0) / 3.0, 1.0) * 0.15 + n.occluders * 0.12
            + n.noise / 14.0 * 0.06 + n.eye_closure * 0.03 + (95 - n.jpeg_quality) / 60.0 * 0.04)
    return float(np.clip(0.999 - 0.8 * hard, 0.05, 0.999))
