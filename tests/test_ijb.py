"""IJB: ROC / TAR@FAR rule, vectorised aggregation and scoring vs the loop reference, 1:N, the tool end to end."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from arcface.errors import ConfigError, DataError
from arcface.eval import ijb, ijb_io
from arcface.eval.alignment import align_face, arcface_template
from arcface.eval.embedder import TorchEmbedder
from arcface.eval.ijb_io import IJBSearchSet
from arcface.eval.metrics import roc_curve, tar_at_far

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks.reference_ijb import (reference_identification, reference_image_features,
                                      reference_roc, reference_scores, reference_tar_at_far,
                                      reference_template_features)
from arcface.tools import eval_ijb

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
KEYS = ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]


def measurable(reference, labels):
    """The loop reference's TARs, None at the FARs that the pair list's impostors cannot resolve (fewer than
    1/FAR impostor pairs: not even one false accept would be allowed there)."""
    impostors = int((np.asarray(labels) == 0).sum())
    return [tar if impostors * far >= 1 - 1e-9 else None for far, tar in reference.items()]


# ------------------------------------------------------------------------------------ ROC and TAR


def test_roc_curve_matches_loop_reference_with_ties():
    rng = np.random.default_rng(0)
    labels = (rng.random(3000) < 0.2).astype(int)
    scores = np.round(rng.normal(labels * 0.8, 0.5), 1)  # many ties
    fpr, tpr, thr = roc_curve(labels, scores)
    rfpr, rtpr, rthr = reference_roc(labels, scores)
    np.testing.assert_array_equal(fpr, rfpr)
    np.testing.assert_array_equal(tpr, rtpr)
    np.testing.assert_array_equal(thr, rthr)
    assert thr[0] == np.inf and fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1


def test_tar_at_far_on_hand_computed_scores():
    """10 impostors at 0.9 .. 0.0, 4 genuine at 0.95, 0.85, 0.75, 0.05.

    ROC points after sklearn's drop_intermediate (fps, tps): (0,0) (0,1) (1,1) (1,2) (2,2) (2,3) (9,3) (9,4) (10,4).
    FAR 0.1 -> the points at FPR 0.1, larger TPR: 2/4. FAR 0.2 -> 3/4. FAR 0.01 -> FPR 0 point, 1/4.
    FAR 0.5 -> nearest FPR is 0.2 (0.3 away; 0.9 is 0.4 away): 3/4. FAR 0.6 -> nearest FPR is 0.9: 4/4,
    i.e. upstream's rule may take a point whose FPR exceeds the FAR.
    """
    impostor = np.arange(9, -1, -1) / 10.0
    genuine = np.array([0.95, 0.85, 0.75, 0.05])
    scores = np.concatenate([impostor, genuine])
    labels = np.r_[np.zeros(10, int), np.ones(4, int)]
    fars = (0.01, 0.1, 0.2, 0.5, 0.6)
    expected = {0.01: 0.25, 0.1: 0.5, 0.2: 0.75, 0.5: 0.75, 0.6: 1.0}
    assert tar_at_far(labels, scores, fars) == expected
    assert reference_tar_at_far(labels, scores, fars) == expected
    fpr, tpr, _ = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, .1, .1, .2, .2, .9, .9, 1])
    np.testing.assert_allclose(tpr, [0, .25, .25, .5, .5, .75, .75, 1, 1])


# ----------------------------------------------------------------------- aggregation and scoring


def synthetic_protocol(seed=0, n_images=360, n_templates=36, dim=16, single_image_templates=0):
    """Random templates, media and pairs; the last `single_image_templates` templates hold one image each."""
    rng = np.random.default_rng(seed)
    shared = n_templates - single_image_templates
    tpl_rows = np.concatenate([np.arange(n_templates), rng.integers(0, shared, n_images - n_templates)])
    template_ids = np.sort(rng.choice(np.arange(1, 500), n_templates, replace=False))
    templates = template_ids[tpl_rows]
    medias = rng.integers(0, 5, n_images) + 1000 * (tpl_rows % 3)  # media ids shared across templates too
    feats = rng.standard_normal((n_images, 2 * dim)).astype(np.float32)
    faceness = rng.uniform(0.1, 1.0, n_images).astype(np.float32)
    i, j = np.triu_indices(n_templates, 1)
    subject = rng.integers(0, 8, n_templates)
    labels = (subject[i] == subject[j]).astype(int)
    return feats, faceness, templates, medias, template_ids[i], template_ids[j], labels


@pytest.mark.parametrize("mode", ijb.ALL_MODES, ids=lambda m: m.name)
def test_vectorised_pipeline_equals_loop_reference(mode):
    feats, faceness, templates, medias, t1, t2, labels = synthetic_protocol()
    ours, unique = ijb.template_features(feats, faceness, templates, medias, mode)
    x = reference_image_features(feats, faceness, mode.norm_score, mode.detector_score, mode.flip)
    ref, ref_unique = reference_template_features(x, templates, medias)
    np.testing.assert_array_equal(unique, ref_unique)
    np.testing.assert_allclose(ours, ref, atol=1e-6)  # the reference sums in float32, as upstream
    scores = ijb.score_pairs(ours, unique, t1, t2)
    ref_scores = reference_scores(ref, ref_unique, t1, t2)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)
    res = ijb.verification_metrics(scores, labels)
    expected = measurable(reference_tar_at_far(labels, ref_scores, FARS), labels)
    assert res["tar_at_far"] == dict(zip(KEYS, expected))
    assert res["impostor_pairs"] == int((labels == 0).sum()) and expected[-2:] != [None, None]
    assert expected[:4] == [None] * 4  # 630 pairs: FARs below 1e-2 are not measurable


def test_modes_change_the_arithmetic_as_upstream():
    feats, faceness, templates, medias, *_ = synthetic_protocol(seed=1, single_image_templates=3)
    base, unique = ijb.template_features(feats, faceness, templates, medias, ijb.Mode(True, True, True))
    for mode in ijb.ALL_MODES[1:]:
        other, _ = ijb.template_features(feats, faceness, templates, medias, mode)
        assert np.abs(other - base).max() > 1e-3, mode.name
    # a template of one image: N0 or N1, D0 or D1 all give that image's normalised (flip-summed) feature
    images_per_template = {t: int((templates == t).sum()) for t in unique.tolist()}
    single = [t for t, n in images_per_template.items() if n == 1]
    assert len(single) == 3
    for mode in ijb.ALL_MODES:
        feats_mode, unique_mode = ijb.template_features(feats, faceness, templates, medias, mode)
        for t in single:
            row = int(np.flatnonzero(templates == t)[0])
            v = feats[row, :16].astype(np.float64) + (feats[row, 16:] if mode.flip else 0.0)
            got = feats_mode[int(np.flatnonzero(unique_mode == t)[0])]
            np.testing.assert_allclose(got, v / np.linalg.norm(v), atol=1e-6, err_msg=mode.name)


def test_both_scoring_paths_equal_the_reference():
    feats, faceness, templates, medias, *_ = synthetic_protocol(seed=2, n_images=2000, n_templates=400)
    tf, unique = ijb.template_features(feats, faceness, templates, medias)
    rng = np.random.default_rng(5)
    dense = (unique[rng.integers(0, 400, 30000)], unique[rng.integers(0, 400, 30000)])   # blocked products
    sparse = (unique[rng.integers(0, 400, 50)], unique[rng.integers(0, 400, 50)])        # row-wise dots
    for t1, t2 in (dense, sparse):
        expected = reference_scores(tf, unique, t1, t2)
        np.testing.assert_allclose(ijb.score_pairs(tf, unique, t1, t2), expected, atol=1e-6)  # float32 dots
        np.testing.assert_allclose(ijb.score_pairs(tf, unique, t1, t2, block_bytes=4 * 400 * 7), expected, atol=1e-6)


def test_unknown_template_in_pairs_is_a_data_error():
    feats, faceness, templates, medias, t1, t2, _ = synthetic_protocol()
    tf, unique = ijb.template_features(feats, faceness, templates, medias)
    with pytest.raises(DataError, match=r"pairs.txt: template 99999 \(row 3\)"):
        ijb.score_pairs(tf, unique, t1[:5], np.r_[t2[:2], 99999, t2[3:5]], source="pairs.txt")


def test_identification_equals_loop_reference():
    rng = np.random.default_rng(7)
    dim, subjects = 12, 30
    centres = rng.standard_normal((subjects, dim))
    gallery_subjects = np.arange(15)
    gallery = centres[gallery_subjects] + 0.6 * rng.standard_normal((15, dim))
    probe_subjects = rng.integers(0, subjects, 200)  # about half are not enrolled (open set)
    probes = centres[probe_subjects] + 0.8 * rng.standard_normal((200, dim))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    ours = ijb.identification_metrics(probes, probe_subjects, gallery, gallery_subjects, chunk=37)
    ref = reference_identification(probes, probe_subjects, gallery, gallery_subjects)
    assert ours["mated_probes"] == ref["mated"]
    assert ours["rank_hits"] == {str(k): v for k, v in ref["rank_hits"].items()}
    assert ours["tpir_at_fpir"] == {"0.01": ref["tpir"][0.01], "0.1": ref["tpir"][0.1]}
    assert 0 < ours["rank"]["1"] <= ours["rank"]["5"] <= ours["rank"]["10"] <= 1


# ------------------------------------------------------------------------------- the tool, end to end


INPUT = 32
NET_KW = {"width": 0.25, "num_features": 16}


def build_ijb(root, target="IJBC", subjects=6, templates_per_subject=3, seed=0):
    """A tiny IJB folder: loose crops with a face pattern per subject, 5 landmarks, meta files, 1:N CSVs."""
    rng = np.random.default_rng(seed)
    p = target.lower()
    os.makedirs(os.path.join(root, "loose_crop"))
    os.makedirs(os.path.join(root, "meta"))
    patterns = rng.uniform(0, 255, (subjects, 12, 12, 3))
    tid_lines, pts_lines, template_subject = [], [], {}
    image_no, media_no = 1, 500
    for s in range(subjects):
        for k in range(templates_per_subject):
            tid = 100 + s * 10 + k
            template_subject[tid] = s
            for m in range(2):
                media_no += 1
                for _ in range(1 + (m == 1 and k == 0)):  # some media hold two frames
                    name = f"{image_no}.jpg"
                    image_no += 1
                    angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.2)
                    face = Image.fromarray(patterns[s].astype(np.uint8)).resize((40, 40), Image.BILINEAR)
                    canvas = Image.new("RGB", (56, 60), tuple(int(v) for v in rng.integers(0, 255, 3)))
                    canvas.paste(face, (8, 10))
                    arr = np.asarray(canvas).astype(np.float64) + rng.normal(0, 10, (60, 56, 3))
                    canvas = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).rotate(np.degrees(angle))
                    canvas.save(os.path.join(root, "loose_crop", name), quality=92)
                    c, s_ = np.cos(-angle) * scale, np.sin(-angle) * scale
                    tpl = arcface_template(40) - 20.0
                    lmk = tpl @ np.array([[c, s_], [-s_, c]]) + [28.0, 30.0]
                    tid_lines.append(f"{name} {tid} {media_no}")
                    pts_lines.append(" ".join([name] + [f"{v:.3f}" for v in lmk.ravel()]
                                              + [f"{rng.uniform(0.5, 1.0):.3f}"]))
    tids = sorted(template_subject)
    pair_lines = [f"{a} {b} {int(template_subject[a] == template_subject[b])}"
                  for i, a in enumerate(tids) for b in tids[i + 1:]]
    meta = os.path.join(root, "meta")
    for suffix, lines in (("face_tid_mid.txt", tid_lines), ("name_5pts_score.txt", pts_lines),
                          ("template_pair_label.txt", pair_lines)):
        with open(os.path.join(meta, f"{p}_{suffix}"), "w") as f:
            f.write("\n".join(lines) + "\n")
    g1, g2 = ijb_io.GALLERY_NAMES[target]
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    gal = {g1: [t for t in tids if t % 10 == 0 and template_subject[t] < 3],
           g2: [t for t in tids if t % 10 == 0 and template_subject[t] >= 3]}
    for g, members in gal.items():
        with open(os.path.join(meta, f"{p}_1N_gallery_{g}.csv"), "w") as f:
            f.write(header + "".join(f"{t},{template_subject[t]},x.jpg\n{t},{template_subject[t]},y.jpg\n"
                                     for t in members))
    with open(os.path.join(meta, f"{p}_1N_probe_mixed.csv"), "w") as f:
        f.write(header + "".join(f"{t},{template_subject[t]},z.jpg\n" for t in tids if t % 10 != 0))
    return template_subject


@pytest.fixture(scope="module")
def ijb_run(tmp_path_factory):
    from arcface.backbones import get_model

    base = tmp_path_factory.mktemp("ijb")
    root = str(base / "IJBC")
    build_ijb(root)
    torch.manual_seed(0)
    model = get_model("r18", input_size=INPUT, **NET_KW).eval()
    ckpt = str(base / "model.pt")
    torch.save(model.state_dict(), ckpt)
    out = str(base / "out")
    feats = str(base / "feats.npz")
    common = ["--image-path", root, "--target", "IJBC", "--modes", "all", "--no-progress", "--job", "tiny"]
    results = eval_ijb.run(common + ["--model-prefix", ckpt, "--network", "r18", "--network-kwargs",
                                      json.dumps(NET_KW), "--input-size", str(INPUT), "--batch-size", "5",
                                      "--workers", "2", "--save-features", feats, "--result-dir", out])
    return {"root": root, "out": out, "feats": feats, "model": model, "results": results, "base": base,
            "common": common}


def test_tool_writes_all_outputs(ijb_run):
    out = ijb_run["out"]
    for name in ("table.txt", "tar_at_far.json", "tar_at_far.csv", "roc.png", "identification.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "roc.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    tars = json.load(open(os.path.join(out, "tar_at_far.json")))
    assert set(tars) == {f"tiny-IJBC-{m.name}" for m in ijb.ALL_MODES}
    # 153 pairs, 135 of them impostors: TAR is measurable at FAR 1e-2 (100 needed) and 1e-1 only
    for row in tars.values():
        assert list(row) == KEYS
        assert [row[k] for k in KEYS[:4]] == [None] * 4
        assert all(0.0 <= row[k] <= 1.0 for k in KEYS[4:])
    table = open(os.path.join(out, "table.txt")).read()
    assert "tiny-IJBC-N1D1F1" in table and "1e-06" in table and "rank-1" in table
    row = next(line for line in table.splitlines() if "tiny-IJBC-N1D1F1" in line)
    assert [cell.strip() for cell in row.split("|")[2:6]] == ["-"] * 4
    assert "- : too few impostor pairs" in table and "1e-06 needs 1,000,000" in table and "0.001 needs 1,000" in table
    csv_lines = open(os.path.join(out, "tar_at_far.csv")).read().splitlines()
    assert csv_lines[0] == "method,mode,1e-06,1e-05,0.0001,0.001,0.01,0.1,auc" and len(csv_lines) == 9
    assert csv_lines[1].split(",")[2:6] == [""] * 4
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_features_follow_upstream_layout(ijb_run):
    data = np.load(ijb_run["feats"])
    images = ijb_io.read_images(ijb_run["root"], "IJBC")
    assert data["img_feats"].shape == (len(images.names), 32)
    np.testing.assert_array_equal(data["faceness_scores"], images.faceness)
    embedder = TorchEmbedder(ijb_run["model"])
    for row in (0, 7):
        img = Image.open(os.path.join(ijb_run["root"], "loose_crop", images.names[row])).convert("RGB")
        crop = align_face(img, images.landmarks[row], INPUT).transpose(2, 0, 1)[None]
        scale = np.abs(data["img_feats"][row]).max()  # batch composition changes float32 rounding only
        np.testing.assert_allclose(data["img_feats"][row, :16], embedder(crop)[0], atol=1e-5 * scale)
        np.testing.assert_allclose(data["img_feats"][row, 16:], embedder(crop[:, :, :, ::-1].copy())[0],
                                   atol=1e-5 * scale)


def test_tool_numbers_equal_the_loop_reference(ijb_run):
    data = np.load(ijb_run["feats"])
    images = ijb_io.read_images(ijb_run["root"], "IJBC")
    pairs = ijb_io.read_template_pairs(ijb_run["root"], "IJBC")
    tars = json.load(open(os.path.join(ijb_run["out"], "tar_at_far.json")))
    for mode in ijb.ALL_MODES:
        x = reference_image_features(data["img_feats"], data["faceness_scores"], mode.norm_score,
                                     mode.detector_score, mode.flip)
        tf, unique = reference_template_features(x, images.templates, images.medias)
        expected = reference_tar_at_far(pairs.label, reference_scores(tf, unique, pairs.t1, pairs.t2))
        got = list(tars[f"tiny-IJBC-{mode.name}"].values())
        want = measurable(expected, pairs.label)
        assert [g is None for g in got] == [w is None for w in want]
        assert [g for g in got if g is not None] == pytest.approx([w for w in want if w is not None], abs=1e-12)
    # 1:N in mode N1D1F1, per gallery
    ident = json.load(open(os.path.join(ijb_run["out"], "identification.json")))
    x = reference_image_features(data["img_feats"], data["faceness_scores"])
    galleries, probes = ijb_io.read_search_protocol(ijb_run["root"], "IJBC")
    p_tpl, p_first = np.unique(probes.templates, return_index=True)
    p_feats, _ = reference_template_features(x, images.templates, images.medias, p_tpl)
    for gallery in galleries:
        g_tpl, g_first = np.unique(gallery.templates, return_index=True)
        g_feats, _ = reference_template_features(x, images.templates, images.medias, g_tpl)
        ref = reference_identification(p_feats, probes.subjects[p_first], g_feats, gallery.subjects[g_first])
        got = ident["galleries"][gallery.name]
        assert got["rank_hits"] == {str(k): v for k, v in ref["rank_hits"].items()}
        assert got["tpir_at_fpir"] == {"0.01": ref["tpir"][0.01], "0.1": ref["tpir"][0.1]}
        assert got["templates"] == 3 and got["mated_probes"] == 6 and got["nonmated_probes"] == 6


def test_rescoring_from_features_gives_identical_numbers(ijb_run):
    out2 = str(ijb_run["base"] / "out2")
    eval_ijb.run(ijb_run["common"] + ["--features", ijb_run["feats"], "--result-dir", out2])
    for name in ("tar_at_far.json", "identification.json", "tar_at_far.csv", "table.txt"):
        assert open(os.path.join(out2, name)).read() == open(os.path.join(ijb_run["out"], name)).read(), name


def test_tool_input_errors(ijb_run, tmp_path):
    with pytest.raises(ConfigError, match=r"give a model \(--model-prefix or --onnx\) or --features FILE"):
        eval_ijb.run(["--image-path", ijb_run["root"]])
    with pytest.raises(ConfigError, match="IJBB or IJBC"):
        eval_ijb.run(["--image-path", ijb_run["root"], "--target", "IJBA", "--features", ijb_run["feats"]])
    with pytest.raises(ConfigError, match=r"mode 'N2D1F1' is not N<0\|1>D"):
        eval_ijb.run(["--image-path", ijb_run["root"], "--modes", "N2D1F1", "--features", ijb_run["feats"]])
    other = str(tmp_path / "other")
    build_ijb(other, subjects=5)
    with pytest.raises(DataError, match="feats.npz holds 42 rows but the meta files list 35 images"):
        eval_ijb.run(["--image-path", other, "--features", ijb_run["feats"], "--result-dir", str(tmp_path)])


# --------------------------------------------------------------------------------- bad input files


@pytest.fixture()
def small_ijb(tmp_path):
    root = str(tmp_path / "IJBB")
    build_ijb(root, target="IJBB", subjects=2, templates_per_subject=2)
    return root


def rewrite_line(path, lineno, text):
    lines = open(path).read().splitlines()
    lines[lineno - 1] = text
    open(path, "w").write("\n".join(lines) + "\n")


def test_missing_meta_file(small_ijb):
    path = os.path.join(small_ijb, "meta", "ijbb_template_pair_label.txt")
    os.remove(path)
    with pytest.raises(DataError, match=f"IJB meta file {path} does not exist"):
        ijb_io.read_template_pairs(small_ijb, "IJBB")


def test_malformed_landmark_line_names_file_and_line(small_ijb):
    path = os.path.join(small_ijb, "meta", "ijbb_name_5pts_score.txt")
    rewrite_line(path, 3, "3.jpg 1.0 2.0 3.0 oops 5.0 6.0 7.0 8.0 9.0 10.0 0.9")
    with pytest.raises(DataError, match=r"ijbb_name_5pts_score.txt: line 3: .*oops"):
        ijb_io.read_images(small_ijb, "IJBB")
    rewrite_line(path, 2, "2.jpg 1.0 2.0")
    with pytest.raises(DataError, match=r"line 2: .*got 3"):
        ijb_io.read_images(small_ijb, "IJBB")


def test_malformed_pair_lines(small_ijb):
    path = os.path.join(small_ijb, "meta", "ijbb_template_pair_label.txt")
    rewrite_line(path, 4, "100 110 x")
    with pytest.raises(DataError, match=r"ijbb_template_pair_label.txt: line 4: '100 110 x'"):
        ijb_io.read_template_pairs(small_ijb, "IJBB")
    rewrite_line(path, 4, "100 110 2")
    with pytest.raises(DataError, match=r"line 4 has label 2"):
        ijb_io.read_template_pairs(small_ijb, "IJBB")


def test_misaligned_meta_files(small_ijb):
    path = os.path.join(small_ijb, "meta", "ijbb_face_tid_mid.txt")
    rewrite_line(path, 2, "999.jpg 100 501")
    with pytest.raises(DataError, match=r"row 2 names '999.jpg'"):
        ijb_io.read_images(small_ijb, "IJBB")
    rewrite_line(path, 2, "2.jpg 100")
    with pytest.raises(DataError, match=r"ijbb_face_tid_mid.txt: line 2"):
        ijb_io.read_images(small_ijb, "IJBB")


def test_missing_image(small_ijb, tmp_path):
    missing = os.path.join(small_ijb, "loose_crop", "4.jpg")
    os.remove(missing)
    images = ijb_io.read_images(small_ijb, "IJBB")
    with pytest.raises(DataError, match=f"IJB image {missing}"):
        ijb_io.check_images_exist(small_ijb, images.names)
    with pytest.raises(DataError, match=f"IJB image {missing} does not exist"):
        ijb.load_aligned_crop(missing, images.landmarks[3], 32)


def test_search_csv_needs_its_header(small_ijb):
    path = os.path.join(small_ijb, "meta", "ijbb_1N_probe_mixed.csv")
    open(path, "w").write("A,B\n1,2\n")
    with pytest.raises(DataError, match="TEMPLATE_ID and SUBJECT_ID"):
        ijb_io.read_search_protocol(small_ijb, "IJBB")
    open(path, "w").write("SUBJECT_ID,TEMPLATE_ID\n7,110\nx,y\n")
    with pytest.raises(DataError, match="line 3"):
        ijb_io.read_search_protocol(small_ijb, "IJBB")
    open(path, "w").write("SUBJECT_ID,TEMPLATE_ID\n7,110\n")
    _, probes = ijb_io.read_search_protocol(small_ijb, "IJBB")
    assert isinstance(probes, IJBSearchSet) and probes.templates.tolist() == [110] and probes.subjects.tolist() == [7]
