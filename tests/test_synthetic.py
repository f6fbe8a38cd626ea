"""Procedural faces: exact landmarks, reproducibility, and the rec / .bin / IJB files read back."""
import csv
import dataclasses
import io
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from arcface.data.recordio import IndexedRecordIO, unpack
from arcface.data.synthetic import (ARCFACE_TEMPLATE_112, FAMILY_SIZE, LOOSE_FACTOR, NUM_FOLDS, Nuisance,
                                    detector_score, fit_similarity, generate, identity_latent, identity_splits, load_manifest,
                                    make_identity, plan_pairs, render, render_sample)
from arcface.data.synthetic.render import _yaw_inverse, yaw_forward
from arcface.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEG = math.pi / 180.0
SMALL = dict(seed=7, num_ids=6, per_id=3, size=32, val_ids=6, pairs=40, hard_pairs=20, ijb_ids=4,
             ijb_templates=3, ijb_media=2, ijb_frames=2, ijb_impostor_ratio=5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "one")
    manifest = generate(out, workers=1, progress=False, **SMALL)
    return out, manifest


def _decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# -- landmarks --------------------------------------------------------------------------------------------
POSES = [dict(), dict(yaw=35 * DEG), dict(yaw=-40 * DEG, pitch=12 * DEG), dict(roll=25 * DEG, yaw=20 * DEG),
         dict(pitch=-15 * DEG, scale=1.1, shift=(0.03, -0.02)), dict(smile=3.0, mouth_open=3.0)]


@pytest.mark.parametrize("mode", ["aligned", "loose"])
@pytest.mark.parametrize("pose", range(len(POSES)))
def test_landmark_pixels_show_their_feature(pose, mode):
    """On a flat background with no camera nuisance, the pixel under each landmark has the colour of
    the feature drawn there: pupil (eyes), tip highlight (nose), corner crease (mouth)."""
    for index in (3, 10):
        ident = make_identity(5, index)
        n = dataclasses.replace(Nuisance.none(), glasses_on=False, place=(0.4, -0.5) if mode == "loose" else (0, 0),
                                **POSES[pose])
        out = render(ident, n, 224, mode)
        side = int(round(224 * (LOOSE_FACTOR if mode == "loose" else 1)))
        assert out.image.shape == (side, side, 3)
        skin, lip = np.array(ident.skin), np.array(ident.lip)
        expected = [np.full(3, 0.03), np.full(3, 0.03), np.minimum(skin * 1.12, 1.0), lip * 0.5, lip * 0.5]
        for k, (x, y) in enumerate(out.landmarks):
            pixel = out.image[int(round(y)), int(round(x))].astype(float)
            assert np.abs(pixel - expected[k] * 255).max() <= 6, (index, k, pixel, expected[k] * 255)


def test_landmarks_follow_an_independent_forward_map():
    """Recompute the pixel position of each landmark by hand: cylinder yaw, pitch, then the similarity that
    takes the posed landmarks to the template (fitted here independently), then the nuisance jitter."""
    ident = make_identity(2, 9)
    yaw, pitch, roll, scale, shift = 0.5, -0.2, 0.15, 1.07, (0.02, -0.03)
    n = dataclasses.replace(Nuisance.none(), yaw=yaw, pitch=pitch, roll=roll, scale=scale, shift=shift, smile=1.5)
    out = render(ident, n, 112, "aligned")
    p = ident.params
    ey, ny = p["eye_y"], p["eye_y"] + p["nose_len"]
    my = ny + p["mouth_gap"] - 1.5
    face = [(-p["eye_sep"], ey, 0.0), (p["eye_sep"], ey, 0.0), (0.0, ny, p["nose_depth"]),
            (-p["mouth_w"], my, 0.0), (p["mouth_w"], my, 0.0)]
    radius = 1.35 * p["face_a"]
    posed = []
    for u, v, d in face:  # every landmark lies well inside the cylinder part of the yaw map
        r = radius + d
        posed.append((r * math.sin(math.asin(u / r) + yaw), v * math.cos(pitch) + d * math.sin(pitch)))
    posed = np.array(posed)
    # Least squares similarity by the normal equations of [a -b tx; b a ty].
    rows, rhs = [], []
    for (qx, qy), (tx, ty) in zip(posed, ARCFACE_TEMPLATE_112):
        rows += [[qx, -qy, 1, 0], [qy, qx, 0, 1]]
        rhs += [tx, ty]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    aligned = posed @ np.array([[a, b], [-b, a]]) + [tx, ty]
    c = np.array([56.0, 56.0])
    rot = np.array([[math.cos(roll), -math.sin(roll)], [math.sin(roll), math.cos(roll)]])
    expected = scale * (aligned - c) @ rot.T + c + np.array(shift) * 112
    np.testing.assert_allclose(out.landmarks, expected, atol=1e-6)


@pytest.mark.parametrize("yaw", [-0.95, -0.4, 0.0, 0.3, 0.95])
def test_yaw_map_is_monotone_and_inverted_exactly(yaw):
    radius = 50.0
    u = np.linspace(-2 * radius, 2 * radius, 2001)
    x = yaw_forward(u, radius, yaw)
    assert np.all(np.diff(x) > 0)
    np.testing.assert_allclose(_yaw_inverse(x, radius, yaw), u, atol=1e-9)
    if yaw:  # the turn moves the centre and squeezes the side turning away
        assert abs(x[1000]) > 1.0
        squeezed = x[-1] - x[1000] if yaw > 0 else x[1000] - x[0]
        assert squeezed < 2 * radius


def test_aligned_landmarks_sit_near_the_template():
    errors_clean, errors_default = [], []
    for i in range(40):
        clean = render(make_identity(1, i), Nuisance.none(), 64, "aligned")
        errors_clean.append(np.linalg.norm(clean.landmarks - ARCFACE_TEMPLATE_112 * 64 / 112, axis=1))
        errors_default.append(np.linalg.norm(render_sample(1, i, i, 112).landmarks - ARCFACE_TEMPLATE_112, axis=1))
    clean, default = np.array(errors_clean) * 112 / 64, np.array(errors_default)
    assert clean.mean() < 3.0 and clean.max() < 9.0  # identity geometry only
    assert default.mean() < 5.0 and np.percentile(default, 95) < 10.0  # plus residual alignment nuisance
    assert default.mean() > clean.mean()


def test_loose_crops_are_larger_and_off_centre():
    offsets = []
    for j in range(20):
        out = render_sample(4, j, j, 48, "loose", 0.6)
        side = int(round(48 * LOOSE_FACTOR))
        assert out.image.shape == (side, side, 3)
        s, _, _ = fit_similarity(ARCFACE_TEMPLATE_112 * 48 / 112, out.landmarks)
        assert 0.5 < s < 2.0
        offsets.append(out.landmarks.mean(axis=0) - side / 2)
    assert np.std(np.array(offsets)) > 2.0  # the face moves around inside the crop


# -- identities and determinism ---------------------------------------------------------------------------
def test_identity_is_a_pure_function_of_seed_and_index():
    a, b = make_identity(11, 42), make_identity(11, 42)
    assert a == b
    assert make_identity(12, 42).params != a.params
    assert make_identity(11, 43).params != a.params
    with pytest.raises(ConfigError, match="seed"):
        make_identity(-1, 0)
    with pytest.raises(ConfigError, match="identity index"):
        make_identity(0, 1.5)


def test_families_make_near_neighbours():
    sib, other = [], []
    for f in range(30):
        z = [identity_latent(3, f * FAMILY_SIZE + k) for k in range(2)]
        sib.append(np.linalg.norm(z[0] - z[1]))
        other.append(np.linalg.norm(z[0] - identity_latent(3, (f + 40) * FAMILY_SIZE)))
    assert np.mean(sib) < 0.85 * np.mean(other)


def test_same_identity_renders_closer_than_different_identities():
    same, diff = [], []
    for i in range(12):
        crop = (slice(6, 30), slice(6, 26))  # face region of a 32x32 aligned crop
        a = render_sample(2, i, 0, 32, "aligned", 0.2).image[crop].astype(float)
        b = render_sample(2, i, 1, 32, "aligned", 0.2).image[crop].astype(float)
        c = render_sample(2, i + 1, 1, 32, "aligned", 0.2).image[crop].astype(float)
        same.append(np.abs(a - b).mean())
        diff.append(np.abs(a - c).mean())
    assert np.mean(same) < 0.6 * np.mean(diff)


def test_difficulty_scales_the_nuisance():
    def spread(d):
        return np.mean([np.abs(render_sample(8, 0, j, 32, "aligned", d).image.astype(float)
                               - render(make_identity(8, 0), Nuisance.none(), 32).image).mean() for j in range(8)])
    assert spread(0.0) < spread(0.5) < spread(1.0)


def test_detector_score_falls_with_harder_images():
    clean = Nuisance.none()
    base = detector_score(clean)
    assert base == pytest.approx(0.999)
    for change in (dict(yaw=40 * DEG), dict(blur=1.5), dict(lowres=3.0), dict(occluders=2), dict(noise=12.0)):
        assert detector_score(dataclasses.replace(clean, **change)) < base - 0.03, change
    assert detector_score(dataclasses.replace(clean, yaw=50 * DEG)) < detector_score(dataclasses.replace(clean, yaw=0.3))


def test_render_is_deterministic_and_rejects_bad_arguments():
    a, b = render_sample(3, 5, 9, 48, "aligned", 0.7), render_sample(3, 5, 9, 48, "aligned", 0.7)
    assert a.jpeg() == b.jpeg() and np.array_equal(a.landmarks, b.landmarks)
    assert render_sample(3, 5, 10, 48).jpeg() != a.jpeg()
    with pytest.raises(ConfigError, match="size"):
        render_sample(0, 0, 0, 8)
    with pytest.raises(ConfigError, match="difficulty"):
        render_sample(0, 0, 0, 32, difficulty=1.5)
    with pytest.raises(ConfigError, match="mode"):
        render_sample(0, 0, 0, 32, mode="tight")


# -- files ------------------------------------------------------------------------------------------------
def test_train_rec_layout(dataset):
    out, manifest = dataset
    n_ids, per_id, size = SMALL["num_ids"], SMALL["per_id"], SMALL["size"]
    n_img = n_ids * per_id
    rec = IndexedRecordIO(os.path.join(out, "train.idx"), os.path.join(out, "train.rec"), "r")
    assert rec.keys == list(range(n_img + n_ids + 1))
    header, payload = unpack(rec.read_idx(0))
    assert header.flag == 2 and list(header.label) == [n_img + 1, n_img + 1 + n_ids] and payload == b""
    for key in range(1, n_img + 1):
        h, img = unpack(rec.read_idx(key))
        assert h.flag == 0 and h.label == float((key - 1) // per_id) and h.id == key
        assert _decode(img).shape == (size, size, 3)
    for c in range(n_ids):
        h, payload = unpack(rec.read_idx(n_img + 1 + c))
        assert h.flag == 2 and list(h.label) == [1 + c * per_id, 1 + (c + 1) * per_id] and payload == b""
    rec.close()
    with open(os.path.join(out, "property")) as f:
        assert f.read().strip() == f"{n_ids},{size},{size}"
    assert manifest["counts"]["train_images"] == n_img
    assert not [name for name in os.listdir(out) if name.endswith(".tmp") or name.startswith(".")]


def test_verification_bins(dataset):
    out, _ = dataset
    for name, pairs in (("synth_val.bin", SMALL["pairs"]), ("synth_hard.bin", SMALL["hard_pairs"])):
        with open(os.path.join(out, name), "rb") as f:
            bins, issame = pickle.load(f)
        assert len(bins) == 2 * pairs and len(issame) == pairs
        assert all(isinstance(b, bytes) for b in bins) and all(isinstance(s, bool) for s in issame)
        assert _decode(bins[0]).shape == (SMALL["size"], SMALL["size"], 3)
        fold = pairs // NUM_FOLDS
        for k in range(NUM_FOLDS):
            assert sum(issame[k * fold:(k + 1) * fold]) == fold // 2


def test_pair_plan_uses_held_out_identities_only():
    splits = identity_splits(10, 12, 5)
    train, val, ijb = (set(range(*splits[k])) for k in ("train", "val", "ijb"))
    assert not (train & val) and not (train & ijb) and not (val & ijb)
    families = [{i // FAMILY_SIZE for i in part} for part in (train, val, ijb)]
    assert not (families[0] & families[1]) and not (families[1] & families[2])
    plan = plan_pairs(0, sorted(val), 200, "x.bin", hard_impostors=True)
    for a, sa, b, sb, same in plan:
        assert a in val and b in val
        assert (a == b) == same and sa != sb
    siblings = sum(1 for a, _, b, _, same in plan if not same and a // FAMILY_SIZE == b // FAMILY_SIZE)
    assert siblings > 10
    with pytest.raises(ConfigError, match="multiple of 20"):
        plan_pairs(0, sorted(val), 30, "x.bin")


def _read_rows(path):
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


def test_ijb_folder(dataset):
    out, manifest = dataset
    root = os.path.join(out, "IJBC")
    tid_mid = _read_rows(os.path.join(root, "meta", "ijbc_face_tid_mid.txt"))
    pts = _read_rows(os.path.join(root, "meta", "ijbc_name_5pts_score.txt"))
    pairs = _read_rows(os.path.join(root, "meta", "ijbc_template_pair_label.txt"))
    assert len(tid_mid) == len(pts) == manifest["counts"]["ijb_images"]
    assert [r[0] for r in tid_mid] == [r[0] for r in pts] == [f"{k}.jpg" for k in range(1, len(pts) + 1)]
    side = int(round(SMALL["size"] * LOOSE_FACTOR))
    for row in pts:
        assert len(row) == 12 and all(len(v.split(".")[1]) == 3 for v in row[1:])
        lmk = np.array(row[1:11], dtype=float).reshape(5, 2)
        assert 0.0 < float(row[11]) <= 0.999
        assert (lmk > -side * 0.2).all() and (lmk < side * 1.2).all()
    assert _decode(open(os.path.join(root, "loose_crop", "1.jpg"), "rb").read()).shape == (side, side, 3)
    assert len(os.listdir(os.path.join(root, "loose_crop"))) == len(tid_mid)
    template_of = {r[0]: int(r[1]) for r in tid_mid}
    media_per_template, images_per_media = {}, {}
    for name, tid, mid in tid_mid:
        media_per_template.setdefault(int(tid), set()).add(int(mid))
        images_per_media[int(mid)] = images_per_media.get(int(mid), 0) + 1
    assert max(len(m) for m in media_per_template.values()) > 1 and max(images_per_media.values()) > 1

    subject_of, csv_rows = {}, {}
    for group in ("1N_gallery_G1", "1N_gallery_G2", "1N_probe_mixed"):
        with open(os.path.join(root, "meta", f"ijbc_{group}.csv")) as f:
            rows = list(csv.DictReader(f))
        assert {"TEMPLATE_ID", "SUBJECT_ID", "FILENAME"} <= set(rows[0])
        for r in rows:
            assert template_of[r["FILENAME"]] == int(r["TEMPLATE_ID"])
            subject_of[int(r["TEMPLATE_ID"])] = int(r["SUBJECT_ID"])
        csv_rows[group] = rows
    g1 = {int(r["SUBJECT_ID"]) for r in csv_rows["1N_gallery_G1"]}
    g2 = {int(r["SUBJECT_ID"]) for r in csv_rows["1N_gallery_G2"]}
    assert g1 and g2 and not (g1 & g2)
    for group in ("1N_gallery_G1", "1N_gallery_G2"):
        tids = {}
        for r in csv_rows[group]:
            tids.setdefault(int(r["SUBJECT_ID"]), set()).add(int(r["TEMPLATE_ID"]))
        assert all(len(t) == 1 for t in tids.values())
    probes = {int(r["SUBJECT_ID"]) for r in csv_rows["1N_probe_mixed"]}
    assert probes & g1 and probes & g2
    gallery_tids = {int(r["TEMPLATE_ID"]) for g in ("1N_gallery_G1", "1N_gallery_G2") for r in csv_rows[g]}
    assert not gallery_tids & {int(r["TEMPLATE_ID"]) for r in csv_rows["1N_probe_mixed"]}
    assert set(subject_of) == set(template_of.values())

    labels = [int(r[2]) for r in pairs]
    for t1, t2, label in pairs:
        assert int(t1) in subject_of and int(t2) in subject_of
        assert (subject_of[int(t1)] == subject_of[int(t2)]) == (label == "1")
    assert sum(labels) > 0 and labels.count(0) >= 3 * sum(labels)


def test_workers_do_not_change_bytes(dataset, tmp_path):
    out, _ = dataset
    other = str(tmp_path / "two")
    generate(other, workers=2, progress=False, **SMALL)
    for rel in ("train.rec", "train.idx", "synth_val.bin", "synth_hard.bin", "IJBC/meta/ijbc_name_5pts_score.txt",
                "IJBC/meta/ijbc_template_pair_label.txt", "IJBC/loose_crop/5.jpg"):
        with open(os.path.join(out, rel), "rb") as f1, open(os.path.join(other, rel), "rb") as f2:
            assert f1.read() == f2.read(), rel


def test_manifest_reuse_and_regeneration(tmp_path):
    out = str(tmp_path / "m")
    args = dict(seed=1, num_ids=3, per_id=2, size=32)
    generate(out, workers=1, progress=False, **args)
    rec = os.path.join(out, "train.rec")
    stamp = os.stat(rec).st_mtime_ns
    os.utime(rec, ns=(stamp - 10**9, stamp - 10**9))
    generate(out, workers=1, progress=False, **args)
    assert os.stat(rec).st_mtime_ns == stamp - 10**9  # reused, not rewritten
    generate(out, workers=1, progress=False, **dict(args, per_id=3))
    assert load_manifest(out)["counts"]["train_images"] == 9
    with open(rec, "ab") as f:
        f.write(b"\0\0\0\0")  # a damaged file no longer matches its manifest
    generate(out, workers=1, progress=False, **dict(args, per_id=3))
    assert os.path.getsize(rec) == load_manifest(out)["files"]["train.rec"]
    with pytest.raises(ConfigError, match="pairs must be a positive multiple"):
        generate(str(tmp_path / "bad"), val_ids=4, pairs=30, progress=False, **args)
    assert not os.path.exists(str(tmp_path / "bad"))


def test_cli_preview_and_generate(tmp_path):
    png, out = str(tmp_path / "sheet.png"), str(tmp_path / "cli")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "make_synthetic.py"), "--preview", png, "--preview-ids", "2",
           "--preview-samples", "3", "--size", "32", "--out", out, "--num-ids", "2", "--per-id", "2", "--workers",
           "1", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert Image.open(png).size == (3 * 32, 2 * 32)
    assert load_manifest(out)["spec"]["num_ids"] == 2
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert "manifest matches" in res.stdout
    bad = subprocess.run(cmd[:2] + ["--out", out, "--val-ids", "3", "--pairs", "25"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "multiple of 20" in bad.stderr
