""".bin verification: loader round trip, upstream's 10-fold protocol vs a plain re-computation, callback."""
import io
import logging
import pickle
import re
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from arcface.errors import DataError
from arcface.eval.callback import VerificationCallback
from arcface.eval.embedder import TorchEmbedder
from arcface.eval import ijb, report
from arcface.eval.metrics import contiguous_folds, impostors_needed, kfold_accuracy, supported_fars
from arcface.eval.verification import evaluate_embeddings, evaluate_verification, load_bin

from benchmarks.reference_ijb import reference_tar_at_far

SIZE = 16


class TinyNet(torch.nn.Module):
    """[B,3,S,S] normalised -> [B,8]; not flip-invariant, with a BatchNorm so eval mode matters."""

    def __init__(self, seed=0, dim=8):
        super().__init__()
        torch.manual_seed(seed)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.fc = torch.nn.Linear(48, dim)
        self.bn = torch.nn.BatchNorm1d(dim)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.1, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.bn(self.fc(self.pool(x).flatten(1)))


def face_like(rng, identity_pattern, size=SIZE):
    img = identity_pattern + rng.normal(0, 25, identity_pattern.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(array, quality=95):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_pairs(n_pairs, seed=0, size=(SIZE, SIZE)):
    rng = np.random.default_rng(seed)
    patterns = rng.uniform(0, 255, (n_pairs * 2, size[1], size[0], 3))
    bins, issame = [], []
    for i in range(n_pairs):
        same = i % 2 == 0
        a = face_like(rng, patterns[2 * i])
        b = face_like(rng, patterns[2 * i] if same else patterns[2 * i + 1])
        bins += [jpeg_bytes(a), jpeg_bytes(b)]
        issame.append(same)
    return bins, issame


def write_bin(path, bins, issame):
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=pickle.HIGHEST_PROTOCOL)


def plain_protocol(bins, issame, model, nfolds=10):
    """Independent computation: decode, embed image and mirror, sum, normalise, loop over folds and thresholds."""
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bins]).astype(np.float32)
    x = torch.from_numpy(((imgs / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        e1 = model(x).double().numpy()
        e2 = model(torch.flip(x, dims=[3])).double().numpy()
    xnorm = np.mean([np.linalg.norm(v) for v in np.concatenate([e1, e2])])
    emb = e1 + e2
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    dist = np.array([np.sum((emb[2 * i] - emb[2 * i + 1]) ** 2) for i in range(len(issame))])
    actual = np.array(issame)
    thresholds = np.arange(0, 4, 0.01)
    n = len(issame)
    sizes = [n // nfolds + (1 if k < n % nfolds else 0) for k in range(nfolds)]
    accs, start = [], 0
    for size in sizes:
        test = np.arange(start, start + size)
        train = np.setdiff1d(np.arange(n), test)
        best_t, best_acc = None, -1.0
        for t in thresholds:
            acc = np.mean((dist[train] < t) == actual[train])
            if acc > best_acc:
                best_t, best_acc = t, acc
        accs.append(np.mean((dist[test] < best_t) == actual[test]))
        start += size
    return np.mean(accs), np.std(accs), xnorm, dist


def test_bin_round_trip_matches_independent_computation(tmp_path):
    bins, issame = make_pairs(40)
    path = tmp_path / "mini.bin"
    write_bin(path, bins, issame)
    data = load_bin(path, SIZE)
    assert data.name == "mini" and len(data) == 40
    assert data.images.dtype == np.uint8 and data.images.shape == (80, 3, SIZE, SIZE)
    np.testing.assert_array_equal(data.flips[3], data.images[3][:, :, ::-1])
    model = TinyNet().eval()
    res = evaluate_verification(TorchEmbedder(model), data, batch_size=7)
    acc, std, xnorm, dist = plain_protocol(bins, issame, model)
    assert res["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert res["std"] == pytest.approx(std, abs=1e-12)
    assert res["xnorm"] == pytest.approx(xnorm, rel=1e-6)
    assert 0.5 < res["accuracy"] <= 1.0 and len(res["fold_accuracies"]) == 10
    # TAR@FAR: 20 impostor pairs resolve only FAR 0.1 (0.01 would need 100, 0.001 1000)
    assert res["impostor_pairs"] == 20
    assert list(res["tar_at_far"]) == ["0.001", "0.01", "0.1"]
    assert res["tar_at_far"]["0.001"] is None and res["tar_at_far"]["0.01"] is None
    expected = reference_tar_at_far(np.array(issame, dtype=int), -dist, fars=(0.1,))[0.1]
    assert res["tar_at_far"]["0.1"] == pytest.approx(expected, abs=1e-12)
    # best threshold: the accuracy-maximising one over all pairs
    thresholds = np.arange(0, 4, 0.01)
    overall = [np.mean((dist < t) == np.array(issame)) for t in thresholds]
    assert res["best_threshold"] == pytest.approx(thresholds[int(np.argmax(overall))])


def test_one_far_rule_for_bin_and_ijb():
    """A FAR is measured when the impostor pairs number at least 1/FAR; .bin and IJB apply the same rule."""
    assert [impostors_needed(f) for f in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.3, 0.05)] == \
        [1_000_000, 100_000, 10_000, 1_000, 100, 10, 4, 20]
    assert supported_fars(9, (0.1, 0.3)) == (0.3,) and supported_fars(10, (0.1, 0.3)) == (0.1, 0.3)
    rng = np.random.default_rng(4)
    for impostors in (19, 20, 21):
        issame = np.r_[np.ones(40 - impostors, bool), np.zeros(impostors, bool)]
        emb = rng.standard_normal((80, 8))
        emb[1::2][issame] = emb[0::2][issame] + 0.3 * rng.standard_normal((int(issame.sum()), 8))
        fars = (0.01, 0.05, 0.1)
        bin_res = evaluate_embeddings(emb, np.zeros_like(emb), issame, nfolds=2, fars=fars)
        joint = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        dist = np.sum(np.square(joint[0::2] - joint[1::2]), axis=1)
        ijb_res = ijb.verification_metrics(-dist, issame.astype(int), fars=fars)
        assert bin_res["tar_at_far"] == pytest.approx(ijb_res["tar_at_far"])
        measured = [k for k, v in bin_res["tar_at_far"].items() if v is not None]
        assert measured == (["0.05", "0.1"] if impostors >= 20 else ["0.1"])


def test_tables_print_a_dash_and_say_what_is_missing():
    ver = {"lfw": {"accuracy": 0.99, "std": 0.01, "xnorm": 20.0, "best_threshold": 1.4, "impostor_pairs": 600,
                   "tar_at_far": {"0.001": None, "0.01": 0.9, "0.1": 0.99}},
           "big": {"accuracy": 0.9, "std": 0.02, "xnorm": 21.0, "best_threshold": 1.3, "impostor_pairs": 5000,
                   "tar_at_far": {"0.001": 0.5, "0.01": 0.8, "0.1": 0.95}}}
    lines = report.verification_table(ver).get_string().splitlines()
    assert [c.strip() for c in lines[3].split("|")[6:9]] == ["-", "90.00", "99.00"]
    assert [c.strip() for c in lines[4].split("|")[6:9]] == ["50.00", "80.00", "95.00"]
    assert lines[-1] == ("- : too few impostor pairs for that FAR to be measured (a FAR needs at least 1/FAR "
                         "impostor pairs: 0.001 needs 1,000); lfw has 600")
    rows = {"a": {"1e-06": None, "0.01": 0.25}, "b": {"1e-06": None, "0.01": 0.5}}
    text = report.tar_table(rows, ["1e-06", "0.01"], impostor_pairs=135).get_string()
    assert text.splitlines()[-1].endswith("1e-06 needs 1,000,000); the pair list has 135")
    full = report.tar_table({"a": {"0.01": 0.25}}, ["0.01"], impostor_pairs=135)
    assert "-" not in full.get_string().splitlines()[-2] and "impostor" not in full.get_string()


@pytest.mark.parametrize("n,nfolds", [(603, 10), (40, 10), (57, 5)])
def test_kfold_matches_plain_loop(n, nfolds):
    rng = np.random.default_rng(n)
    issame = rng.random(n) < 0.5
    dist = np.where(issame, rng.normal(1.0, 0.4, n), rng.normal(1.8, 0.4, n)).clip(0, 4)
    thresholds = np.arange(0, 4, 0.01)
    accs, thrs = kfold_accuracy(dist, issame, thresholds, nfolds)
    start = 0
    for k in range(nfolds):
        size = n // nfolds + (1 if k < n % nfolds else 0)
        test = np.arange(start, start + size)
        train = np.concatenate([np.arange(0, start), np.arange(start + size, n)])
        scores = [np.mean((dist[train] < t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(scores))]
        assert thrs[k] == best
        assert accs[k] == pytest.approx(np.mean((dist[test] < best) == issame[test]))
        start += size
    folds = contiguous_folds(n, nfolds)
    assert np.array_equal(np.concatenate([t for _, t in folds]), np.arange(n))


def python2_pickle(bins, issame):
    """A protocol-2 pickle whose images are py2 `str` (BINSTRING) objects, as the released .bin files."""
    out = [b"\x80\x02", b"]", b"("]
    for blob in bins:
        out += [b"T", struct.pack("<i", len(blob)), blob]
    out += [b"e", b"]", b"("]
    out += [b"\x88" if s else b"\x89" for s in issame]
    out += [b"e", b"\x86", b"."]
    return b"".join(out)


def test_python2_pickle_falls_back_to_bytes_encoding(tmp_path):
    bins, issame = make_pairs(10, seed=1)
    path = tmp_path / "py2.bin"
    path.write_bytes(python2_pickle(bins, issame))
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(path.read_bytes())
    data = load_bin(path, SIZE)
    expected = np.asarray(Image.open(io.BytesIO(bins[5])).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.images[5], expected)
    assert data.issame.tolist() == issame


def test_images_of_another_size_are_resized(tmp_path):
    bins, issame = make_pairs(4, size=(24, 20))
    path = tmp_path / "big.bin"
    write_bin(path, bins, issame)
    data = load_bin(path, SIZE)
    assert data.images.shape == (8, 3, SIZE, SIZE)
    src = Image.open(io.BytesIO(bins[0])).convert("RGB").resize((19, SIZE), Image.BILINEAR)
    expected = np.asarray(src.crop((1, 0, 1 + SIZE, SIZE))).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.images[0], expected)


def test_bad_bins_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nothere.bin"):
        load_bin(tmp_path / "nothere.bin")
    bins, issame = make_pairs(3)
    write_bin(tmp_path / "short.bin", bins[:5], issame)
    with pytest.raises(DataError, match=r"short.bin holds 5 images for 3 pairs"):
        load_bin(tmp_path / "short.bin", SIZE)
    write_bin(tmp_path / "corrupt.bin", bins[:3] + [b"not a jpeg"] + bins[4:], issame)
    with pytest.raises(DataError, match=r"corrupt.bin: image 3 cannot be decoded"):
        load_bin(tmp_path / "corrupt.bin", SIZE)
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01junk")
    with pytest.raises(DataError, match="junk.bin"):
        load_bin(tmp_path / "junk.bin", SIZE)


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_callback_logs_upstream_lines_and_restores_train_mode(tmp_path, caplog):
    bins, issame = make_pairs(20, seed=2)
    write_bin(tmp_path / "mini.bin", bins, issame)
    writer = FakeWriter()
    with caplog.at_level(logging.WARNING):
        callback = VerificationCallback(["mini", "absent"], str(tmp_path), summary_writer=writer,
                                        input_size=SIZE, batch_size=6)
    assert any(str(tmp_path / "absent.bin") in r.getMessage() for r in caplog.records)
    model = TinyNet(seed=3)
    model.train()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        results = callback(5, model)
    assert model.training
    expected = evaluate_verification(TinyNet(seed=3).eval(), load_bin(tmp_path / "mini.bin", SIZE), 6)
    assert results["mini"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert results["mini"]["xnorm"] == pytest.approx(expected["xnorm"])
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"\[mini\]\[5\]XNorm: \d+\.\d{6}", line) for line in lines)
    assert any(re.fullmatch(r"\[mini\]\[5\]Accuracy-Flip: \d\.\d{5}\+-\d\.\d{5}", line) for line in lines)
    assert any(re.fullmatch(r"\[mini\]\[5\]Accuracy-Highest: \d\.\d{5}", line) for line in lines)
    assert ("mini", results["mini"]["accuracy"], 5) in writer.scalars
    assert set(results) == {"mini"}
    # the highest accuracy is kept across calls
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    second = callback(6, model)
    assert second["mini"]["highest"] == max(results["mini"]["accuracy"], second["mini"]["accuracy"])


def test_callback_on_other_ranks_does_nothing(tmp_path, monkeypatch):
    bins, issame = make_pairs(4)
    write_bin(tmp_path / "mini.bin", bins, issame)
    monkeypatch.setattr("arcface.eval.callback._rank", lambda: 1)
    callback = VerificationCallback(["mini"], str(tmp_path), input_size=SIZE)
    assert callback.datasets == []
    assert callback(10, TinyNet()) == {}
