"""The identity parameter space of the procedural faces.

Identity `i` of a data set with seed `S` is a pure function of (S, i): its random generator is seeded from
that pair alone, never from a global state, so any process can rebuild any identity. Identities come in
families of `FAMILY_SIZE` consecutive indices that share part of their latent vector; siblings are close
but distinct, so hard impostor pairs exist without being planted by hand.

Face space: units are pixels of the 112x112 ArcFace crop, origin at the face-ellipse centre, v pointing
down. A canonical face has its eyes ~35 units apart, near the template's spacing.
"""
import math
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError

FAMILY_SIZE = 4
OWN_WEIGHT = 0.55  # share of a latent's variance that belongs to the identity rather than its family

_STREAM_OWN = 11
_STREAM_FAMILY = 12
_STREAM_DETAIL = 13

# name -> (low, high); each maps a standard-normal latent through its CDF onto a uniform range.
_CONTINUOUS = {
    "face_a": (35.0, 45.0), "face_top": (46.0, 57.0), "face_bot": (45.0, 57.0), "jaw": (0.0, 0.42),
    "ear_rx": (3.5, 6.0), "ear_ry": (7.0, 11.0), "ear_dy": (0.0, 7.0),
    "skin_tone": (0.0, 1.0), "skin_hue": (-1.0, 1.0), "blush": (0.0, 0.14),
    "eye_sep": (15.5, 20.5), "eye_y": (-12.0, -5.0), "eye_w": (5.4, 8.4), "eye_h": (2.2, 3.8),
    "eye_tilt": (-0.2, 0.2), "iris_scale": (0.85, 1.2), "eye_colour_mix": (0.0, 0.6), "lash": (0.3, 1.2),
    "brow_gap": (4.5, 9.0), "brow_thick": (1.4, 4.0), "brow_angle": (-0.2, 0.25), "brow_arch": (0.0, 3.5),
    "brow_len": (8.0, 12.5), "brow_shift": (-2.0, 2.0), "brow_dark": (0.45, 1.0),
    "nose_len": (16.0, 25.0), "nose_w": (3.8, 7.5), "nose_depth": (8.0, 15.0), "nose_bridge": (0.0, 1.0),
    "mouth_gap": (13.0, 21.0), "mouth_w": (11.0, 17.0), "lip_up": (1.4, 3.8), "lip_low": (2.0, 5.0),
    "lip_tint": (0.0, 1.0), "cupid": (0.0, 1.0),
    "hair_shade": (0.75, 1.2), "hairline": (-44.0, -28.0), "hair_peak": (0.0, 6.0), "hair_vol": (3.0, 12.0),
    "hair_part": (-1.0, 1.0), "hair_freq": (0.5, 1.5),
    "glasses_size": (0.9, 1.15), "glasses_habit": (0.6, 1.0),
}
# name -> category weights; a latent picks a category through its CDF, so siblings tend to agree.
_CATEGORICAL = {
    "eye_colour": (0.35, 0.2, 0.12, 0.1, 0.15, 0.08),
    "hair_style": (0.3, 0.2, 0.14, 0.14, 0.1, 0.12),
    "hair_colour": (0.3, 0.25, 0.17, 0.12, 0.06, 0.07, 0.03),
    "glasses": (0.7, 0.12, 0.13, 0.05),
    "frame_colour": (0.4, 0.25, 0.2, 0.15),
    "beard": (0.65, 0.12, 0.1, 0.07, 0.06),
}
LATENT_NAMES = tuple(_CONTINUOUS) + tuple(_CATEGORICAL)

HAIR_STYLES = ("short", "long", "fringe", "side_part", "bald", "curly")
GLASSES = ("none", "round", "rect", "sun")
BEARDS = ("none", "stubble", "full", "goatee", "moustache")

_EYE_COLOURS = np.array([[0.22, 0.13, 0.07], [0.42, 0.27, 0.13], [0.45, 0.40, 0.20],
                         [0.30, 0.45, 0.25], [0.32, 0.47, 0.72], [0.50, 0.55, 0.60]])
_HAIR_COLOURS = np.array([[0.07, 0.06, 0.06], [0.22, 0.13, 0.08], [0.43, 0.28, 0.16], [0.82, 0.68, 0.42],
                          [0.58, 0.24, 0.10], [0.60, 0.60, 0.60], [0.88, 0.88, 0.85]])
_FRAME_COLOURS = np.array([[0.05, 0.05, 0.05], [0.35, 0.2, 0.1], [0.75, 0.6, 0.25], [0.7, 0.72, 0.75]])
_SKIN_RAMP = np.array([[0.97, 0.82, 0.71], [0.86, 0.66, 0.52], [0.66, 0.45, 0.31], [0.36, 0.23, 0.16]])


@dataclass(frozen=True)
class Identity:
    """Everything fixed about one person; nuisance (pose, light, expression...) lives elsewhere."""
    seed: int
    index: int
    params: dict             # continuous parameters by name (face units or unit ranges)
    hair_style: str
    glasses: str
    beard: str
    skin: tuple              # RGB in 0..1
    lip: tuple
    eye_colour: tuple
    hair_colour: tuple
    frame_colour: tuple
    moles: tuple             # ((u, v, radius), ...) in face units
    freckles: tuple          # ((u, v), ...)
    texture: tuple           # ((fu, fv, phase, amplitude), ...) skin texture sinusoids

    def __getattr__(self, name):  # identity.eye_sep reads params["eye_sep"]
        params = self.__dict__.get("params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(name)

    @property
    def family(self):
        return self.index // FAMILY_SIZE

    def landmarks(self, smile=0.0, brow_raise=0.0):
        """Five face-space landmarks (left eye, right eye, nose tip, left and right mouth corner) and the
        depth of each (the nose tip stands out of the face plane, which matters under yaw)."""
        p = self.params
        ey = p["eye_y"]
        ny = ey + p["nose_len"]
        my = ny + p["mouth_gap"]
        corner_y = my - smile
        pts = np.array([[-p["eye_sep"], ey], [p["eye_sep"], ey], [0.0, ny],
                        [-p["mouth_w"], corner_y], [p["mouth_w"], corner_y]], dtype=np.float64)
        depth = np.array([0.0, 0.0, p["nose_depth"], 0.0, 0.0])
        return pts, depth


def _seed_sequence(*words):
    return np.random.SeedSequence([int(w) for w in words])


def _normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _category(u, weights):
    cum = np.cumsum(weights) / np.sum(weights)
    return int(min(np.searchsorted(cum, u, side="right"), len(weights) - 1))


def identity_latent(seed, index):
    """The identity's standard-normal latent vector: a family part plus its own part."""
    _check_seed_index(seed, index)
    dim = len(LATENT_NAMES)
    own = np.random.default_rng(_seed_sequence(seed, _STREAM_OWN, index)).standard_normal(dim)
    fam = np.random.default_rng(_seed_sequence(seed, _STREAM_FAMILY, index // FAMILY_SIZE)).standard_normal(dim)
    return math.sqrt(1.0 - OWN_WEIGHT) * fam + math.sqrt(OWN_WEIGHT) * own


def _check_seed_index(seed, index):
    for name, value in (("seed", seed), ("identity index", index)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"synthetic faces: {name} must be a non-negative integer, got {value!r}")


def _ramp(palette, u):
    """Colour at position `u` (0..1) along a palette, linearly interpolated so tones are continuous."""
    pos = u * (len(palette) - 1)
    lo = min(int(math.floor(pos)), len(palette) - 2)
    w = pos - lo
    return palette[lo] * (1 - w) + palette[lo + 1] * w


def make_identity(seed, index):
    """Identity `index` of the data set with seed `seed` (pure function of the pair)."""
    z = identity_latent(seed, index)
    u = [_normal_cdf(float(v)) for v in z]
    params = {}
    for k, (name, (lo, hi)) in enumerate(_CONTINUOUS.items()):
        params[name] = lo + (hi - lo) * u[k]
    cats = {name: _category(u[len(_CONTINUOUS) + k], w) for k, (name, w) in enumerate(_CATEGORICAL.items())}

    tone = params["skin_tone"]
    skin = _ramp(_SKIN_RAMP, tone)
    skin = skin + params["skin_hue"] * np.array([0.03, -0.005, -0.03])
    lip = skin * np.array([0.86, 0.58, 0.58]) * (0.92 + 0.16 * params["lip_tint"])
    eye = _EYE_COLOURS[cats["eye_colour"]] * (1 - params["eye_colour_mix"] * 0.5) + \
        _EYE_COLOURS[(cats["eye_colour"] + 1) % len(_EYE_COLOURS)] * params["eye_colour_mix"] * 0.5
    hair = np.clip(_HAIR_COLOURS[cats["hair_colour"]] * params["hair_shade"], 0.02, 0.97)
    frame = _FRAME_COLOURS[cats["frame_colour"]]

    # Fine, identity-only details: not shared with the family, small enough to vanish at low resolution.
    rng = np.random.default_rng(_seed_sequence(seed, _STREAM_DETAIL, index))
    a, bot = params["face_a"], params["face_bot"]
    moles = []
    for _ in range(int(rng.poisson(1.3))):
        moles.append((float(rng.uniform(-0.75, 0.75) * a), float(rng.uniform(-0.5, 0.8) * bot),
                      float(rng.uniform(0.6, 1.4))))
    freckles = []
    if rng.random() < 0.2:
        for _ in range(int(rng.integers(8, 28))):
            side = 1.0 if rng.random() < 0.5 else -1.0
            freckles.append((float(side * rng.uniform(0.15, 0.7) * a), float(params["eye_y"] + rng.uniform(4, 20))))
    texture = []
    for _ in range(4):
        ang = rng.uniform(0, math.pi)
        freq = rng.uniform(0.15, 0.6)
        texture.append((float(freq * math.cos(ang)), float(freq * math.sin(ang)), float(rng.uniform(0, 2 * math.pi)),
                        float(rng.uniform(0.006, 0.02))))
    return Identity(
        seed=int(seed), index=int(index), params=params,
        hair_style=HAIR_STYLES[cats["hair_style"]], glasses=GLASSES[cats["glasses"]], beard=BEARDS[cats["beard"]],
        skin=tuple(float(c) for c in np.clip(skin, 0.05, 1.0)), lip=tuple(float(c) for c in np.clip(lip, 0.03, 1.0)),
        eye_colour=tuple(float(c) for c in eye), hair_colour=tuple(float(c) for c in hair),
        frame_colour=tuple(float(c) for c in frame), moles=tuple(moles), freckles=tuple(freckles),
        texture=tuple(texture))
