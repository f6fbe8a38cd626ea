"""Render one face image (numpy + PIL) with its exact 5-point landmarks.

Every pixel is mapped back into face space and each part of the face is an implicit shape there, painted
with a one-pixel soft edge. The map from face space to pixels is, in this order: a cylinder projection
for yaw (a point at depth d lies on a cylinder of radius R + d, so the nose tip shifts more than the eyes),
a vertical foreshortening for pitch, then a similarity (scale, roll, translation). Landmarks go through the
same forward map, so they are exact by construction, not detected.

"aligned" mode fits the similarity that takes the posed landmarks onto the ArcFace 112x112 template
(scaled to the size) and perturbs it by the nuisance: what a training or .bin crop looks like.
"loose" mode renders a crop `LOOSE_FACTOR` times larger with the face rotated and off-centre: an IJB
loose crop, to be aligned by the evaluator from the returned landmarks.
"""
import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from ...errors import ConfigError
from .identity import make_identity
from .nuisance import detector_score, sample_nuisance, sample_rng

ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
LOOSE_FACTOR = 1.75
MIN_SIZE = 16
MAX_SIZE = 1024
GLASSES_DEPTH = 5.0
_CYLINDER = 1.35   # head cylinder radius, in face half-widths
_YAW_MARGIN = 0.25  # radians kept between the cylinder map's validity limit and the turned-away side


@dataclass
class Rendered:
    image: np.ndarray      # H x W x 3 uint8, RGB
    landmarks: np.ndarray  # 5 x 2 float64 pixel coordinates (pixel centres at integers), insightface order
    score: float           # faceness score, lower for harder images
    jpeg_quality: int

    def jpeg(self, quality=None):
        """JPEG bytes of the image (the nuisance's quality unless one is given)."""
        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="JPEG", quality=int(quality or self.jpeg_quality))
        return buf.getvalue()


def fit_similarity(src, dst):
    """Least-squares similarity (scale, angle, translation) taking points src onto dst; returned as
    (scale, angle, t) with dst ~= scale * R(angle) @ src + t."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    zs = src[:, 0] + 1j * src[:, 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    ms, md = zs.mean(), zd.mean()
    a = np.sum(np.conj(zs - ms) * (zd - md)) / np.sum(np.abs(zs - ms) ** 2)
    t = md - a * ms
    return float(abs(a)), float(np.angle(a)), np.array([t.real, t.imag])


# -- geometry ---------------------------------------------------------------------------------------------
def yaw_limits(radius, yaw):
    """Where the cylinder map stops being used: |u| <= u_lim maps on the cylinder, beyond it linearly."""
    phi_m = max(math.pi / 2 - abs(yaw) - _YAW_MARGIN, 0.3)
    u_lim = radius * math.sin(phi_m)
    x_hi, x_lo = radius * math.sin(phi_m + yaw), radius * math.sin(-phi_m + yaw)
    k_hi = math.cos(phi_m + yaw) / math.cos(phi_m)
    k_lo = math.cos(-phi_m + yaw) / math.cos(phi_m)
    return u_lim, x_lo, x_hi, k_lo, k_hi


def yaw_forward(u, radius, yaw):
    """Face-space horizontal coordinate -> turned coordinate (monotone, continuous, invertible)."""
    u = np.asarray(u, dtype=np.float64)
    u_lim, x_lo, x_hi, k_lo, k_hi = yaw_limits(radius, yaw)
    mid = radius * np.sin(np.arcsin(np.clip(u / radius, -1, 1)) + yaw)
    return np.where(u > u_lim, x_hi + k_hi * (u - u_lim), np.where(u < -u_lim, x_lo + k_lo * (u + u_lim), mid))


def _yaw_forward_scalar(u, radius, yaw):
    u_lim, x_lo, x_hi, k_lo, k_hi = yaw_limits(radius, yaw)
    if u > u_lim:
        return x_hi + k_hi * (u - u_lim)
    if u < -u_lim:
        return x_lo + k_lo * (u + u_lim)
    return radius * math.sin(math.asin(u / radius) + yaw)


def _yaw_inverse(x, radius, yaw):
    u_lim, x_lo, x_hi, k_lo, k_hi = yaw_limits(radius, yaw)
    if yaw == 0.0:
        return x
    mid = radius * np.sin(np.arcsin(np.clip(x / radius, -1, 1)) - yaw)
    out = np.where(x > x_hi, u_lim + (x - x_hi) / k_hi, mid)
    return np.where(x < x_lo, -u_lim + (x - x_lo) / k_lo, out)


@functools.lru_cache(maxsize=8)
def _pixel_grid(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


class Pose:
    """The forward map face space -> pixels and its per-pixel inverse."""

    def __init__(self, radius, yaw, pitch, scale, angle, t):
        self.radius, self.yaw, self.pitch = float(radius), float(yaw), float(pitch)
        self.scale, self.angle, self.t = float(scale), float(angle), np.asarray(t, dtype=np.float64)

    def posed(self, uv, depth):
        """Face-space points at the given depths -> the turned, pitched plane before the similarity."""
        uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
        depth = np.broadcast_to(np.asarray(depth, dtype=np.float64), (len(uv),))
        x = np.array([_yaw_forward_scalar(float(u), self.radius + float(d), self.yaw)
                      for u, d in zip(uv[:, 0], depth)])
        y = uv[:, 1] * math.cos(self.pitch) + depth * math.sin(self.pitch)
        return np.stack([x, y], axis=1)

    def to_pixels(self, uv, depth=0.0):
        q = self.posed(uv, depth)
        c, s = math.cos(self.angle), math.sin(self.angle)
        return self.scale * (q @ np.array([[c, s], [-s, c]])) + self.t

    def box_corners(self, u0, u1, v0, v1, depth):
        """Pixel x and y of the four corners of a face-space box (scalar math: called per face part)."""
        r = self.radius + depth
        qx = (_yaw_forward_scalar(u0, r, self.yaw), _yaw_forward_scalar(u1, r, self.yaw))
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        qy = (v0 * cp + depth * sp, v1 * cp + depth * sp)
        c, s = self.scale * math.cos(self.angle), self.scale * math.sin(self.angle)
        xs = [c * a - s * b + self.t[0] for a in qx for b in qy]
        ys = [s * a + c * b + self.t[1] for a in qx for b in qy]
        return xs, ys

    def coords(self, x, y, depth):
        """Face-space (U, V) of pixels (x, y) for a layer at `depth` (float32 arrays)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = x - np.float32(self.t[0]), y - np.float32(self.t[1])
        inv = np.float32(1.0 / self.scale)
        xq = (dx * np.float32(c) + dy * np.float32(s)) * inv
        yq = (dy * np.float32(c) - dx * np.float32(s)) * inv
        u = _yaw_inverse(xq, self.radius + depth, self.yaw).astype(np.float32, copy=False)
        v = (yq - np.float32(depth * math.sin(self.pitch))) * np.float32(1.0 / math.cos(self.pitch))
        return u, v


def compose_pose(identity, nuisance, size, mode):
    """The pose of a sample: align the posed landmarks to the template, then apply the nuisance."""
    radius = _CYLINDER * identity.face_a
    base = Pose(radius, nuisance.yaw, nuisance.pitch, 1.0, 0.0, (0.0, 0.0))
    pts, depth = identity.landmarks(nuisance.smile)
    q = base.posed(pts, depth)
    s1, a1, t1 = fit_similarity(q, ARCFACE_TEMPLATE_112 * (size / 112.0))
    # Jitter about the centre of the size x size frame: p = sj R(aj) (T(q) - c) + c + d
    c = np.array([size / 2.0, size / 2.0])
    sj, aj = nuisance.scale, nuisance.roll
    rj = np.array([[math.cos(aj), -math.sin(aj)], [math.sin(aj), math.cos(aj)]])
    d = np.asarray(nuisance.shift, dtype=np.float64) * size
    out = size
    if mode == "loose":
        out = int(round(size * LOOSE_FACTOR))
        margin = (out - size) / 2.0
        d = d + margin + np.asarray(nuisance.place, dtype=np.float64) * margin
    t = sj * rj @ (t1 - c) + c + d
    return Pose(radius, nuisance.yaw, nuisance.pitch, sj * s1, a1 + aj, t), out


# -- painting ---------------------------------------------------------------------------------------------
def _cover(sd, px):
    """Coverage of a shape from its signed distance (face units) with a one-pixel soft edge."""
    a = np.float32(0.5) - sd * np.float32(px)
    np.maximum(a, np.float32(0.0), out=a)
    return np.minimum(a, np.float32(1.0), out=a)


def _ellipse_sd(u, v, cx, cy, rx, ry):
    k = np.sqrt(((u - np.float32(cx)) * np.float32(1.0 / rx)) ** 2 + ((v - np.float32(cy)) * np.float32(1.0 / ry)) ** 2)
    return (k - np.float32(1.0)) * np.float32(min(rx, ry))


def _paint(img, alpha, colour):
    colour = np.asarray(colour, dtype=np.float32)
    img += alpha[..., None] * (colour - img)


class _Layers:
    """The canvas and the face-space coordinates of its pixels per depth (computed once each), with
    windows: a face part is painted only inside the pixel box its face-space box maps to."""

    def __init__(self, img, pose):
        self.img, self.pose = img, pose
        self.h, self.w = img.shape[:2]
        self._cache = {}

    def at(self, depth):
        if depth not in self._cache:
            self._cache[depth] = self.pose.coords(*_pixel_grid(self.h, self.w), depth)
        return self._cache[depth]

    def window(self, u0, u1, v0, v1, depth=0.0):
        """(img, U, V) views over the pixels that face-space box [u0,u1]x[v0,v1] can touch, or None.
        Exact: the yaw map acts on u alone and pitch on v alone, so the box stays a box before the
        similarity, and its four corners bound its pixel image."""
        xs, ys = self.pose.box_corners(u0, u1, v0, v1, depth)
        x0 = max(int(math.floor(min(xs))) - 2, 0)
        x1 = min(int(math.ceil(max(xs))) + 3, self.w)
        y0 = max(int(math.floor(min(ys))) - 2, 0)
        y1 = min(int(math.ceil(max(ys))) + 3, self.h)
        if x0 >= x1 or y0 >= y1:
            return None
        if depth in self._cache:
            u, v = self._cache[depth]
            u, v = u[y0:y1, x0:x1], v[y0:y1, x0:x1]
        else:
            x, y = _pixel_grid(self.h, self.w)
            u, v = self.pose.coords(x[y0:y1, x0:x1], y[y0:y1, x0:x1], depth)
        return self.img[y0:y1, x0:x1], u, v


def _face_sd(p, u, v, grow=0.0):
    a, top, bot, jaw = p["face_a"] + grow, p["face_top"] + grow, p["face_bot"] + grow, p["jaw"]
    t = np.clip(v / np.float32(bot), 0.0, 1.0)
    half_w = np.float32(a) * (1.0 - np.float32(jaw) * t ** 1.5)
    vv = np.where(v < 0, v / np.float32(top), v / np.float32(bot))
    k = np.sqrt((u / half_w) ** 2 + vv ** 2)
    return (k - 1.0) * np.float32(min(a, bot) * 0.8)


def _hair_texture(identity, u, v):
    f = identity.hair_freq
    if identity.hair_style == "curly":
        return 1.0 + 0.2 * np.sin(u * np.float32(1.2 * f)) * np.sin(v * np.float32(1.2 * f))
    return 1.0 + 0.13 * np.sin(u * np.float32(0.9 * f) + 2.5 * np.sin(v * np.float32(0.12)))


def _hairline(identity, u):
    p = identity.params
    a = p["face_a"]
    style = identity.hair_style
    if style == "fringe":
        return p["eye_y"] - p["brow_gap"] - 5.0 + 1.5 * np.sin(u * np.float32(0.8 * p["hair_freq"])) + 0.002 * u * u
    line = p["hairline"] + 7.0 * (u / np.float32(a)) ** 2 + p["hair_peak"] * np.exp(-(u / np.float32(4.0)) ** 2)
    if style == "side_part":
        line = line + 5.0 * p["hair_part"] * (u / np.float32(a))
    return line


def _draw_background(img, n, xg, yg, size):
    h, w = img.shape[:2]
    rng = np.random.default_rng(n.scene_seed)
    g = 3
    jitter = rng.uniform(-1.0, 1.0, size=(g, g, 3)) * n.background_texture
    grid = np.clip(np.asarray(n.background, dtype=np.float32) + jitter, 0, 1)
    wy = np.clip(1.0 - np.abs(np.linspace(0, g - 1, h)[:, None] - np.arange(g)[None, :]), 0, 1).astype(np.float32)
    wx = np.clip(1.0 - np.abs(np.linspace(0, g - 1, w)[:, None] - np.arange(g)[None, :]), 0, 1).astype(np.float32)
    field = wy[None] @ grid.astype(np.float32).transpose(2, 0, 1) @ wx.T[None]  # (3, h, w)
    img[:] = field.transpose(1, 2, 0)
    for _ in range(n.clutter):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.05, 0.35) * w, rng.uniform(0.05, 0.35) * h
        ang = rng.uniform(0, math.pi)
        ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
        kind = rng.integers(0, 3)
        reach = math.hypot(rx, ry) + 2 if kind < 2 else max(w, h) * 2
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, w)
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, h)
        if x0 >= x1 or y0 >= y1:
            rng.uniform(0.5, 2.5), rng.uniform(0.5, 1.0), rng.uniform(0, 1, size=3)  # keep the stream aligned
            continue
        x, y = xg[y0:y1, x0:x1], yg[y0:y1, x0:x1]
        du, dv = (x - cx) * ca + (y - cy) * sa, (y - cy) * ca - (x - cx) * sa
        if kind == 0:
            sd = np.maximum(np.abs(du) - rx, np.abs(dv) - ry)
        elif kind == 1:
            sd = (np.sqrt((du / rx) ** 2 + (dv / ry) ** 2) - 1.0) * min(rx, ry)
        else:
            sd = np.abs(dv) - rng.uniform(0.5, 2.5) * size / 112.0
        _paint(img[y0:y1, x0:x1], _cover(sd, 1.0) * np.float32(rng.uniform(0.5, 1.0)), rng.uniform(0, 1, size=3))


def _draw_occluders(img, n, xg, yg, landmarks):
    rng = np.random.default_rng(n.detail_seed)
    iod = float(np.hypot(*(landmarks[1] - landmarks[0]))) + 1.0
    targets = [(landmarks[0] + landmarks[1]) / 2, landmarks[0], landmarks[1], landmarks[2],
               (landmarks[3] + landmarks[4]) / 2]
    for _ in range(n.occluders):
        cx, cy = targets[int(rng.integers(0, len(targets)))] + rng.normal(0.0, 0.25 * iod, size=2)
        rx, ry = rng.uniform(0.25, 0.8) * iod, rng.uniform(0.2, 0.6) * iod
        ang = rng.uniform(0, math.pi)
        ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
        reach = math.hypot(rx, ry) + 2
        x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, img.shape[1])
        y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, img.shape[0])
        if x0 >= x1 or y0 >= y1:
            rng.random(), rng.uniform(0, 1, size=3), rng.uniform(0.2, 1.2)  # keep the stream aligned
            continue
        x, y = xg[y0:y1, x0:x1], yg[y0:y1, x0:x1]
        du, dv = (x - cx) * ca + (y - cy) * sa, (y - cy) * ca - (x - cx) * sa
        if rng.random() < 0.5:
            sd = np.maximum(np.abs(du) - rx, np.abs(dv) - ry)
        else:
            sd = (np.sqrt((du / rx) ** 2 + (dv / ry) ** 2) - 1.0) * min(rx, ry)
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        stripes = 1.0 + 0.25 * np.sin(du * np.float32(rng.uniform(0.2, 1.2)))
        _paint(img[y0:y1, x0:x1], _cover(sd, 1.0), colour[None, None, :] * stripes[..., None])


def _draw_hair_back(lay, identity, px):
    p = identity.params
    a, top, vol = p["face_a"], p["face_top"], p["hair_vol"]
    style = identity.hair_style
    if style == "curly":
        vol *= 1.7
    cy = -0.2 * top
    low = p["face_bot"] + 26.0 if style == "long" else p["eye_y"] + 15.0
    win = lay.window(-a - vol - 1, a + vol + 1, cy - 0.8 * top - vol - 1, low)
    if win is None:
        return
    img, u, v = win
    sd = _ellipse_sd(u, v, 0.0, cy, a + vol, 0.8 * top + vol)
    if style == "long":
        slab = np.maximum(np.abs(u) - np.float32(a + vol * 0.8), np.maximum(np.float32(cy) - v,
                                                                             v - np.float32(p["face_bot"] + 25.0)))
        sd = np.minimum(sd, slab)
    elif style == "bald":
        sd = np.maximum(sd, np.maximum(np.float32(p["eye_y"] - 12.0) - v, np.float32(0.78 * a) - np.abs(u)))
    else:
        sd = np.maximum(sd, v - np.float32(p["eye_y"] + (14.0 if style == "curly" else 6.0)))
    tex = _hair_texture(identity, u, v)
    _paint(img, _cover(sd, px), np.asarray(identity.hair_colour, np.float32) * tex[..., None])


def _draw_head(identity, n, lay, px):
    p = identity.params
    skin = np.asarray(identity.skin, dtype=np.float32)
    a, top, bot, ey = p["face_a"], p["face_top"], p["face_bot"], p["eye_y"]
    lay.at(0.0)

    # Clothes and neck.
    win = lay.window(-2.3 * a - 1, 2.3 * a + 1, bot + 9, bot + 91)
    if win is not None:
        img, u, v = win
        _paint(img, _cover(_ellipse_sd(u, v, 0.0, bot + 50.0, 2.3 * a, 40.0), px), n.clothes)
    win = lay.window(-0.5 * a - 1, 0.5 * a + 1, 0.3 * bot - 1, bot + 19 + 0.15 * a)
    if win is not None:
        img, u, v = win
        neck = np.maximum(np.abs(u) - np.float32(0.5 * a), np.maximum(np.float32(0.3 * bot) - v,
                                                                      v - np.float32(bot + 18.0) - 0.3 * np.abs(u)))
        _paint(img, _cover(neck, px), skin * 0.78)
    _draw_hair_back(lay, identity, px)

    # Ears, behind the face outline.
    for side in (-1.0, 1.0):
        ex, eyy = side * (a - 1.0), ey + p["ear_dy"] + 3.0
        win = lay.window(ex - p["ear_rx"] - 1, ex + p["ear_rx"] + 1, eyy - p["ear_ry"] - 1, eyy + p["ear_ry"] + 1)
        if win is None:
            continue
        wimg, wu, wv = win
        _paint(wimg, _cover(_ellipse_sd(wu, wv, ex, eyy, p["ear_rx"], p["ear_ry"]), px), skin * 0.9)
        _paint(wimg, _cover(_ellipse_sd(wu, wv, ex + side * 0.8, eyy, p["ear_rx"] * 0.5, p["ear_ry"] * 0.6), px)
               * 0.6, skin * 0.7)

    # Face with 3D-ish shading and the identity's skin texture.
    win = lay.window(-a - 1, a + 1, -top - 1, bot + 1)
    if win is None:
        return
    img, u, v = win
    fsd = _face_sd(p, u, v)
    r2 = np.minimum((u / np.float32(a)) ** 2 + (v / np.float32(bot)) ** 2, 1.0)
    shade = 1.0 - 0.22 * r2 * r2
    for fu, fv, ph, amp in identity.texture:
        shade = shade + np.float32(amp) * np.cos(u * np.float32(fu) + v * np.float32(fv) + np.float32(ph))
    _paint(img, _cover(fsd, px), skin[None, None, :] * shade[..., None])
    if p["blush"] > 0.02:
        ny = ey + p["nose_len"]
        for side in (-1.0, 1.0):
            cx = side * 0.55 * a
            win = lay.window(cx - 20.0, cx + 20.0, ny - 12.0, ny + 12.0)
            if win is not None:
                wimg, wu, wv = win
                k = np.exp(-(((wu - np.float32(cx)) / 8.0) ** 2 + ((wv - np.float32(ny)) / 5.0) ** 2))
                _paint(wimg, k * np.float32(p["blush"] * 2.0), (0.85, 0.35, 0.35))


def _draw_skin_marks(lay, identity, px):
    marks = [(fu, fv, 0.65, 0.45, np.asarray(identity.skin, np.float32) * 0.62) for fu, fv in identity.freckles]
    marks += [(mu, mv, mr, 0.9, (0.22, 0.13, 0.09)) for mu, mv, mr in identity.moles]
    for mu, mv, mr, strength, colour in marks:
        win = lay.window(mu - mr - 1, mu + mr + 1, mv - mr - 1, mv + mr + 1)
        if win is None:
            continue
        img, u, v = win
        sd = np.sqrt((u - np.float32(mu)) ** 2 + (v - np.float32(mv)) ** 2) - np.float32(mr)
        _paint(img, _cover(sd, px) * np.float32(strength), colour)


def _mouth_curves(p, n, u):
    """Centre line, lip extents and the lip profile of the mouth at each u."""
    mw = p["mouth_w"]
    my = p["eye_y"] + p["nose_len"] + p["mouth_gap"]
    w = np.clip(1.0 - (u / np.float32(mw)) ** 2, 0.0, 1.0)
    c = np.float32(my) - np.float32(n.smile) * (u / np.float32(mw)) ** 2
    prof = w ** 0.6
    gap = np.float32(n.mouth_open) * w * 0.5
    top = c - gap - np.float32(p["lip_up"]) * prof * (1.0 - 0.35 * np.float32(p["cupid"]) * np.exp(-(u / 2.5) ** 2))
    bottom = c + gap + np.float32(p["lip_low"]) * prof
    return mw, my, c, gap, top, bottom, w


def _draw_beard(lay, identity, n, px):
    if identity.beard == "none":
        return
    p = identity.params
    win = lay.window(-p["face_a"] - 3, p["face_a"] + 3, p["eye_y"] + p["nose_len"], p["face_bot"] + 3)
    if win is None:
        return
    img, u, v = win
    mw, my, c, gap, top, bottom, _ = _mouth_curves(p, n, u)
    ny = p["eye_y"] + p["nose_len"]
    grown = _face_sd(p, u, v, grow=1.5)
    if identity.beard in ("full", "stubble"):
        region = np.maximum(grown, np.float32(ny + 3.0) - v)
        hole = _ellipse_sd(u, v, 0.0, my, mw + 1.5, (p["lip_up"] + p["lip_low"]) * 0.5 + 1.2 + n.mouth_open * 0.5)
        region = np.maximum(region, -hole)
    elif identity.beard == "goatee":
        region = np.maximum(grown, np.maximum(np.abs(u) - np.float32(mw * 0.85), np.float32(my + 1.0) - v))
        region = np.maximum(region, -(v - bottom - 0.6))
    else:  # moustache
        region = np.maximum(np.abs(u) - np.float32(mw + 1.0), np.maximum(np.float32(ny + 2.5) - v, v - (top - 0.3)))
    dense = 0.35 if identity.beard == "stubble" else 0.92
    tex = 1.0 + 0.15 * np.sin(u * np.float32(2.1)) * np.sin(v * np.float32(1.7))
    _paint(img, _cover(region, px) * np.float32(dense), np.asarray(identity.hair_colour, np.float32) * 0.9
           * tex[..., None])


def _draw_eyes(lay, identity, n, px):
    p = identity.params
    ew, eh, es, ey = p["eye_w"], p["eye_h"], p["eye_sep"], p["eye_y"]
    skin = np.asarray(identity.skin, np.float32)
    lash_col = np.minimum(np.asarray(identity.hair_colour, np.float32) * 0.5, 0.12)
    close = float(np.clip(n.eye_closure, 0.0, 1.0))
    for side in (-1.0, 1.0):
        reach = 1.3 * ew + 1.0
        win = lay.window(side * es - reach, side * es + reach, ey - 2.6 * eh - reach * 0.3 - 2,
                         ey + eh + reach * 0.3 + 2)
        if win is None:
            continue
        img, u, v = win
        ang = -side * p["eye_tilt"]
        ca, sa = np.float32(math.cos(ang)), np.float32(math.sin(ang))
        du, dv = u - np.float32(side * es), v - np.float32(ey)
        eu, ev = du * ca + dv * sa, dv * ca - du * sa
        g = np.clip(1.0 - (eu / np.float32(ew)) ** 2, 0.0, 1.0) ** 0.8
        lid_top = np.float32(eh) * g * np.float32(2.0 * close - 1.0)
        lid_bot = np.float32(eh) * g
        side_sd = np.abs(eu) - np.float32(ew)
        aperture = _cover(np.maximum(np.maximum(lid_top - ev, ev - lid_bot), side_sd), px)
        # Crease and lashes around the opening.
        crease = np.maximum(np.abs(ev - (lid_top - np.float32(eh * 1.1))) - 0.4, side_sd)
        _paint(img, _cover(crease, px) * 0.3, skin * 0.6)
        _paint(img, aperture, (0.93, 0.91, 0.87))
        ir = eh * p["iris_scale"] * 1.05
        gu, gv = n.gaze[0] * ew, n.gaze[1] * eh
        r = np.sqrt((eu - np.float32(gu)) ** 2 + (ev - np.float32(gv)) ** 2)
        iris_col = np.asarray(identity.eye_colour, np.float32)
        ring = np.clip(0.65 + 0.45 * (1.0 - r / np.float32(ir)), 0.6, 1.1)
        _paint(img, _cover(r - np.float32(ir), px) * aperture, iris_col[None, None, :] * ring[..., None])
        _paint(img, _cover(r - np.float32(0.42 * ir), px) * aperture, (0.03, 0.03, 0.03))
        glint = np.sqrt((eu - np.float32(gu + 0.4 * ir)) ** 2 + (ev - np.float32(gv - 0.4 * ir)) ** 2)
        _paint(img, _cover(glint - np.float32(0.22 * ir), px) * aperture * 0.8, (1.0, 1.0, 1.0))
        lash = np.maximum(np.abs(ev - lid_top) - np.float32(0.35 * p["lash"]), np.abs(eu) - np.float32(ew * 1.05))
        _paint(img, _cover(lash, px), lash_col)


def _draw_brows(lay, identity, n, px):
    p = identity.params
    skin = np.asarray(identity.skin, np.float32)
    colour = skin * 0.55 * (1 - p["brow_dark"]) + np.asarray(identity.hair_colour, np.float32) * 0.7 * p["brow_dark"]
    bw = p["brow_len"]
    cy = p["eye_y"] - p["brow_gap"] - n.brow_raise
    for side in (-1.0, 1.0):
        cx = side * (p["eye_sep"] + p["brow_shift"])
        reach = p["brow_arch"] + p["brow_thick"] + abs(p["brow_angle"]) * bw + 1.0
        win = lay.window(cx - bw - 1, cx + bw + 1, cy - reach, cy + reach)
        if win is None:
            continue
        img, u, v = win
        bu = (u - np.float32(cx)) * np.float32(side)
        x = np.clip(bu / np.float32(bw), -1.0, 1.0)
        centre = np.float32(cy) - np.float32(p["brow_arch"]) * (1.0 - x * x) + np.float32(p["brow_angle"]) * bu
        thick = np.float32(p["brow_thick"]) * (1.0 - 0.3 * (x + 1.0))
        sd = np.maximum(np.abs(v - centre) - thick * 0.5, np.abs(bu) - np.float32(bw))
        _paint(img, _cover(sd, px) * 0.95, colour)


def _draw_nose(lay, identity, px):
    p = identity.params
    skin = np.asarray(identity.skin, np.float32)
    nw, ny = p["nose_w"], p["eye_y"] + p["nose_len"]
    ey = p["eye_y"]
    win = lay.window(-1.4 * nw - 1, 1.4 * nw + 1, ey + 3, ny + 5, p["nose_depth"])
    if win is None:
        return
    img, u, v = win
    for side in (-1.0, 1.0):
        bridge = np.maximum(np.abs(u - np.float32(side * 0.45 * nw)) - 0.7, np.maximum(np.float32(ey + 4.0) - v,
                                                                                      v - np.float32(ny - 2.5)))
        _paint(img, _cover(bridge, px) * np.float32(0.12 + 0.2 * p["nose_bridge"]), skin * 0.7)
    _paint(img, _cover(_ellipse_sd(u, v, 0.0, ny + 3.2, nw * 0.9, 1.4), px) * 0.45, skin * 0.8)
    for side in (-1.0, 1.0):
        ring = np.abs(_ellipse_sd(u, v, side * nw * 0.85, ny + 0.3, nw * 0.45, 2.6)) - 0.35
        _paint(img, _cover(ring, px) * 0.5, skin * 0.68)
    _paint(img, _cover(_ellipse_sd(u, v, 0.0, ny - 0.8, nw * 0.55, 2.4), px), np.minimum(skin * 1.12, 1.0))
    for side in (-1.0, 1.0):
        _paint(img, _cover(_ellipse_sd(u, v, side * nw * 0.42, ny + 1.9, nw * 0.28, 0.95), px), skin * 0.3)


def _draw_mouth(lay, identity, n, px):
    p = identity.params
    lip = np.asarray(identity.lip, np.float32)
    my = p["eye_y"] + p["nose_len"] + p["mouth_gap"]
    reach = abs(n.smile) + n.mouth_open + 2.0
    win = lay.window(-p["mouth_w"] - 2, p["mouth_w"] + 2, my - p["lip_up"] - reach, my + p["lip_low"] + reach)
    if win is None:
        return
    img, u, v = win
    mw, my, c, gap, top, bottom, w = _mouth_curves(p, n, u)
    inside = np.abs(u) - np.float32(mw)
    if n.mouth_open > 0.05:
        _paint(img, _cover(np.maximum(np.maximum(c - gap - v, v - (c + gap)), inside), px), (0.16, 0.05, 0.05))
        teeth_h = np.minimum(np.float32(2.2), gap) * w
        _paint(img, _cover(np.maximum(np.maximum(c - gap - v, v - (c - gap + teeth_h)), inside), px), (0.92, 0.9, 0.84))
    _paint(img, _cover(np.maximum(np.maximum(top - v, v - (c - gap)), inside), px), lip * 0.92)
    _paint(img, _cover(np.maximum(np.maximum(c + gap - v, v - bottom), inside), px), np.minimum(lip * 1.06, 1.0))
    if n.mouth_open <= 0.05:
        _paint(img, _cover(np.maximum(np.abs(v - c) - 0.3, inside), px) * 0.8, lip * 0.5)
    for side in (-1.0, 1.0):
        sd = np.sqrt((u - np.float32(side * mw)) ** 2 + (v - np.float32(my - n.smile)) ** 2) - np.float32(0.9)
        _paint(img, _cover(sd, px), lip * 0.5)


def _draw_hair_front(lay, identity, px):
    if identity.hair_style == "bald":
        return
    p = identity.params
    win = lay.window(-p["face_a"] - 2, p["face_a"] + 2, -p["face_top"] - 2, p["eye_y"] + 6)
    if win is None:
        return
    img, u, v = win
    fsd = _face_sd(p, u, v)
    sd = np.maximum(v - _hairline(identity, u), fsd - 1.0)
    if identity.hair_style == "long":
        sides = np.maximum(np.float32(0.86 * identity.face_a) - np.abs(u), v - np.float32(identity.eye_y + 4.0))
        sd = np.minimum(sd, np.maximum(sides, fsd - 1.0))
    tex = _hair_texture(identity, u, v)
    _paint(img, _cover(sd, px), np.asarray(identity.hair_colour, np.float32) * tex[..., None])
    if identity.hair_style == "side_part":
        part = np.maximum(np.abs(u - np.float32(identity.hair_part * identity.face_a * 0.4)) - 0.5,
                          v - _hairline(identity, u) + 3.0)
        _paint(img, _cover(np.maximum(part, fsd + 2.0 - identity.hair_vol), px) * 0.5, identity.skin)


def _draw_glasses(lay, identity, px):
    p = identity.params
    gs, es, ey, ew, eh = p["glasses_size"], p["eye_sep"], p["eye_y"], p["eye_w"], p["eye_h"]
    reach = (max(ew + 3.5, eh + 4.5) + 1.5) * gs
    win = lay.window(-p["face_a"] - 2, p["face_a"] + 2, ey - reach - 1, ey + reach + 1, GLASSES_DEPTH)
    if win is None:
        return
    img, u, v = win
    frame = np.asarray(identity.frame_colour, np.float32)
    ft = 0.9
    half = None
    lens_sd = []
    for side in (-1.0, 1.0):
        du, dv = u - np.float32(side * es), v - np.float32(ey)
        if identity.glasses == "round":
            half = (ew + 3.0) * gs
            sd = np.sqrt(du * du + dv * dv) - np.float32(half)
        else:
            hx, hy, rad = (ew + 3.5) * gs, (eh + 4.5) * gs, 2.0
            half = hx
            qx, qy = np.abs(du) - np.float32(hx - rad), np.abs(dv) - np.float32(hy - rad)
            sd = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2) + np.minimum(np.maximum(qx, qy), 0) - rad
        lens_sd.append(sd)
    lens = np.minimum(lens_sd[0], lens_sd[1])
    if identity.glasses == "sun":
        _paint(img, _cover(lens, px) * 0.88, (0.05, 0.05, 0.08))
    else:
        _paint(img, _cover(lens, px) * 0.12, (0.9, 0.95, 1.0))
    _paint(img, _cover(np.abs(lens) - ft / 2, px), frame)
    bridge = np.maximum(np.abs(v - np.float32(ey - 1.0)) - ft / 2, np.abs(u) - np.float32(es - half + 0.5))
    temples = np.maximum(np.abs(v - np.float32(ey - 2.0)) - ft / 2,
                         np.maximum(np.float32(es + half - 0.5) - np.abs(u), np.abs(u) - np.float32(p["face_a"] + 1.0)))
    _paint(img, _cover(np.minimum(bridge, temples), px), frame)


def render(identity, nuisance, size=112, mode="aligned"):
    """Render `identity` under `nuisance` at `size` (aligned crop side; a loose crop is LOOSE_FACTOR larger)."""
    if not isinstance(size, (int, np.integer)) or not (MIN_SIZE <= size <= MAX_SIZE):
        raise ConfigError(f"synthetic faces: size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {size!r}")
    if mode not in ("aligned", "loose"):
        raise ConfigError(f"synthetic faces: mode must be 'aligned' or 'loose', got {mode!r}")
    n = nuisance
    pose, out = compose_pose(identity, n, int(size), mode)
    pts, depth = identity.landmarks(n.smile)
    landmarks = pose.to_pixels(pts, depth)
    px = pose.scale
    x, y = _pixel_grid(out, out)
    img = np.empty((out, out, 3), dtype=np.float32)
    _draw_background(img, n, x, y, size)
    lay = _Layers(img, pose)
    _draw_head(identity, n, lay, px)
    _draw_skin_marks(lay, identity, px)
    _draw_beard(lay, identity, n, px)
    _draw_eyes(lay, identity, n, px)
    _draw_brows(lay, identity, n, px)
    _draw_mouth(lay, identity, n, px)
    _draw_nose(lay, identity, px)
    _draw_hair_front(lay, identity, px)
    if identity.glasses != "none" and n.glasses_on:
        _draw_glasses(lay, identity, px)
    if n.occluders:
        _draw_occluders(img, n, x, y, landmarks)
    if n.light_strength or n.ambient != 1.0 or n.cast != (1.0, 1.0, 1.0):
        ramp = ((x - out / 2) * math.cos(n.light_angle) + (y - out / 2) * math.sin(n.light_angle)) / out
        light = np.maximum(np.float32(n.ambient) * (1.0 + np.float32(n.light_strength) * ramp), 0.15)
        img *= light[..., None] * np.asarray(n.cast, np.float32)
    img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    img = _degrade(img, n, size)
    return Rendered(image=img, landmarks=landmarks, score=detector_score(n), jpeg_quality=int(n.jpeg_quality))


def _degrade(img, n, size):
    """Camera-side nuisance: low resolution, blur, sensor noise, grayscale."""
    if n.lowres > 1.01 or n.blur > 0.05:
        pil = Image.fromarray(img)
        h, w = img.shape[:2]
        if n.lowres > 1.01:
            small = (max(4, int(round(w / n.lowres))), max(4, int(round(h / n.lowres))))
            pil = pil.resize(small, Image.BILINEAR).resize((w, h), Image.BILINEAR)
        if n.blur > 0.05:
            pil = pil.filter(ImageFilter.GaussianBlur(radius=n.blur * size / 112.0))
        img = np.asarray(pil)
    if n.noise > 0.0:
        rng = np.random.default_rng(n.detail_seed + 1)
        noisy = img.astype(np.float32) + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(n.noise)
        img = np.clip(noisy + 0.5, 0, 255).astype(np.uint8)
    if n.grayscale:
        lum = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        img = np.repeat(np.clip(lum + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.ascontiguousarray(img)


def render_sample(seed, identity_index, sample_index, size=112, mode="aligned", difficulty=0.5, pose_scale=1.0,
                  stream=0):
    """Sample `sample_index` of identity `identity_index` (pure function of all arguments)."""
    identity = make_identity(seed, identity_index)
    rng = sample_rng(seed, identity_index, sample_index, stream)
    return render(identity, sample_nuisance(rng, difficulty, pose_scale, mode), size, mode)
