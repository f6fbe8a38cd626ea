"""The teacher embedding cache: build, resume after a kill, 2-rank build, KD losses equal to the live teacher,
and start-up refusals of caches that do not fit the run."""
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from easydict import EasyDict as edict
from PIL import Image

from arcface.backbones import get_model
from arcface.config import base_config, validate
from arcface.data.packing import write_insightface_rec
from arcface.engine.hooks import StepBatch, TrainContext
from arcface.errors import ConfigError, DataError
from plugins.ukd import cache as C
from plugins.ukd.cache import build as cache_build, file_format
from plugins.ukd.plugin import UKDPlugin
from plugins.ukd.teacher_backends import build_teacher_backend

ROOT = Path(__file__).resolve().parents[1]
SIZE, DIM, N = 16, 16, 22        # 22 images: chunks of 8 leave a short last chunk
BATCH, CHUNK = 4, 8
FP16_HALF_ULP = 2.0 ** -12       # fp16 rounding error bound of a unit-vector component in [0.5, 1)


def jpeg(rng, size=SIZE):
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_rec(folder, n=N, seed=0):
    rng = np.random.default_rng(seed)
    labels = sorted(i % 5 for i in range(n))
    payloads = [jpeg(rng) for _ in labels]
    write_insightface_rec(folder, labels, payloads, image_size=(SIZE, SIZE))
    return folder, payloads


def make_teacher(path, seed=0):
    torch.manual_seed(seed)
    model = get_model("r18", num_features=DIM, input_size=SIZE, width=0.25).eval()
    with torch.no_grad():  # non-trivial BN statistics so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)
    return model


def make_cfg(rec, teacher, cache=None, **kw):
    cfg = base_config()
    cfg.update(dict(rec=str(rec), num_classes=5, network="mbf", embedding_size=DIM, input_size=SIZE,
                    network_kwargs={"width": 0.25}, batch_size=BATCH, num_workers=0, device="cpu", fp16=False,
                    val_targets=[], output="/tmp/unused"))
    cfg.kd = edict(enabled=True, teacher_network="r18", teacher_weights=str(teacher), teacher_embedding_size=DIM,
                   teacher_network_kwargs={"width": 0.25}, teacher_check=False, teacher_cache=cache,
                   losses={"iled": {"weight": 1.0}, "l2": {"weight": 1.0},
                           "rpsd": {"weight": 1.0, "bank": 16, "k_neg": 4, "require_positives": False}})
    kd = kw.pop("kd", {})
    cfg.update(kw)
    cfg.kd.update(kd)
    return validate(cfg)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two OpenMP threads on a shared 2-core machine are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    rec, payloads = make_rec(tmp / "rec")
    model = make_teacher(tmp / "teacher.pt")
    out = tmp / "teacher.tcache"
    cfg = make_cfg(rec, tmp / "teacher.pt", str(out))
    C.build_teacher_cache(cfg, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    return edict(tmp=tmp, rec=rec, payloads=payloads, model=model, cfg=cfg, out=str(out),
                 teacher=str(tmp / "teacher.pt"))


def engine_image(payload, flip):
    """Independent reference of the engine's preprocessing: PIL RGB, (x - 127.5) / 127.5, CHW."""
    arr = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB")).astype(np.float32)
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(((arr - 127.5) / 127.5).transpose(2, 0, 1).copy())


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def ctx(cfg, loader=None):
    return TrainContext(cfg=cfg, backbone=None, device=torch.device("cpu"), rank=0, world_size=1, train_loader=loader)


# ---- building -----------------------------------------------------------------------------------------------------

def test_cache_holds_normalised_teacher_embeddings_of_both_views(world):
    header, complete = C.read_header(world.out)
    assert complete and not C.progress_files(world.out)
    idx = os.path.join(world.rec, "train.idx")
    assert header["dataset"]["images"] == N and header["dataset"]["records"] == 1 + N + 5
    assert header["dataset"]["idx_sha256"] == hashlib.sha256(file_bytes(idx)).hexdigest()
    assert header["teacher"]["sha256"] == hashlib.sha256(file_bytes(world.teacher)).hexdigest()
    assert header["teacher"]["network"] == "r18" and header["teacher"]["embedding_size"] == DIM
    assert header["preprocessing"]["input_size"] == SIZE
    num_chunks = -(-N // CHUNK)  # the crc32 table: one uint32 per chunk
    assert os.path.getsize(world.out) == C.HEADER_BYTES + N * 2 * DIM * 2 + N * 2 * 4 + num_chunks * 4

    cache = C.CacheFile.open(world.out)
    images = torch.stack([engine_image(p, f) for f in (False, True) for p in world.payloads])
    with torch.no_grad():
        raw = world.model(images).reshape(2, N, DIM).transpose(0, 1)          # [N, 2, d]
    norms = raw.norm(dim=2)
    unit = raw / norms.unsqueeze(2)
    assert cache.embeddings.dtype == np.float16 and cache.embeddings.shape == (N, 2, DIM)
    np.testing.assert_allclose(cache.norms, norms.numpy(), rtol=1e-5)
    assert np.abs(cache.embeddings.astype(np.float32) - unit.numpy()).max() <= FP16_HALF_ULP * 1.01
    np.testing.assert_allclose(np.linalg.norm(cache.embeddings.astype(np.float32), axis=2), 1.0, atol=2e-3)


def test_kill_and_resume_gives_identical_bytes(world, tmp_path, monkeypatch):
    out = str(tmp_path / "partial.tcache")
    real_write = C.write_progress
    calls = []

    def killed_after_two(*args):
        calls.append(args)
        if len(calls) == 3:  # chunk 3's rows are on disk but not recorded: it must be recomputed
            raise KeyboardInterrupt("simulated kill")
        real_write(*args)

    monkeypatch.setattr(file_format, "write_progress", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        C.build_teacher_cache(world.cfg, out=out, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    monkeypatch.setattr(file_format, "write_progress", real_write)
    assert not C.read_header(out)[1]
    with pytest.raises(ConfigError, match=r"incomplete \(2 of 3 chunks"):
        cfg = make_cfg(world.rec, world.teacher, out, kd={"teacher_backend": "cache"})
        build_teacher_backend(cfg.kd, cfg, ctx(cfg))

    written = []
    real_rows = C.write_rows
    monkeypatch.setattr(cache_build, "write_rows", lambda cache, rows, emb: (written.extend(rows), real_rows(cache, rows, emb)))
    C.build_teacher_cache(world.cfg, out=out, progress=False)  # batch/chunk sizes come from the partial file
    assert sorted(written) == list(range(2 * CHUNK, N))
    assert file_bytes(out) == file_bytes(world.out)
    assert not C.progress_files(out)


def test_rerun_of_complete_cache_is_a_no_op_and_other_settings_need_restart(world, tmp_path):
    out = str(tmp_path / "c.tcache")
    C.build_teacher_cache(world.cfg, out=out, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    stamp = os.stat(out).st_mtime_ns
    C.build_teacher_cache(world.cfg, out=out, progress=False)
    assert os.stat(out).st_mtime_ns == stamp
    other = tmp_path / "other.pt"
    make_teacher(other, seed=1)
    cfg = make_cfg(world.rec, other, out)
    with pytest.raises(ConfigError, match=r"--restart.*|teacher\.sha256"):
        C.build_teacher_cache(cfg, progress=False)
    C.build_teacher_cache(cfg, restart=True, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    assert C.read_header(out)[0]["teacher"]["sha256"] == hashlib.sha256(file_bytes(other)).hexdigest()
    with pytest.raises(ConfigError, match="multiple"):
        C.build_teacher_cache(cfg, out=str(tmp_path / "d.tcache"), batch_size=4, chunk_size=6, progress=False)


def _rank_build(rank, world_size, init_file, cfg, out, log_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    real_write = file_format.write_progress

    def logged(path, rank_, digest, done):  # which chunks this rank computed
        with open(os.path.join(log_dir, f"rank{rank_}.txt"), "w") as f:
            f.write(",".join(map(str, sorted(done))))
        real_write(path, rank_, digest, done)

    file_format.write_progress = logged
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        C.build_teacher_cache(cfg, out=out, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    finally:
        dist.destroy_process_group()


def test_two_rank_build_equals_one_rank_build(world, tmp_path):
    out = str(tmp_path / "two.tcache")
    mp.spawn(_rank_build, args=(2, str(tmp_path / "rdv"), world.cfg, out, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == "0,1" and (tmp_path / "rank1.txt").read_text() == "2"
    assert C.read_header(out)[1]
    assert file_bytes(out) == file_bytes(world.out)


def test_unreadable_records_and_broken_teachers(world, tmp_path):
    from arcface.data.recordio import IRHeader, IndexedRecordIO, pack
    rng = np.random.default_rng(4)
    folder = tmp_path / "bad_rec"
    folder.mkdir()
    w = IndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w")
    for key in range(6):
        payload = b"not an image" if key == 2 else jpeg(rng)
        w.write_idx(key, pack(IRHeader(0, float(key % 3), key, 0), payload))
    w.close()
    out = str(tmp_path / "bad.tcache")
    with pytest.raises(DataError, match="key 2"):
        C.build_teacher_cache(make_cfg(folder, world.teacher, out), batch_size=2, chunk_size=2, progress=False)
    cfg = make_cfg(folder, world.teacher, out, skip_bad_records=True, kd={"teacher_backend": "cache"})
    C.build_teacher_cache(cfg, batch_size=2, chunk_size=2, restart=True, progress=False)
    cache = C.CacheFile.open(out)
    assert np.isnan(cache.norms[2]).all() and np.isfinite(np.delete(np.asarray(cache.norms), 2, axis=0)).all()
    backend = build_teacher_backend(cfg.kd, cfg, ctx(cfg))
    rows = backend(torch.zeros(2, 3, SIZE, SIZE), index=torch.tensor([1, 3]), flip=torch.tensor([True, False]))
    assert rows.shape == (2, DIM)
    with pytest.raises(DataError, match="sample 2 has no embedding"):
        backend(torch.zeros(1, 3, SIZE, SIZE), index=torch.tensor([2]), flip=torch.tensor([False]))
    # a teacher whose BatchNorm has a negative variance returns NaN: refused, nothing marked complete
    state = torch.load(world.teacher, weights_only=True)
    state[next(k for k in state if k.endswith("running_var"))].fill_(-1.0)
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(DataError, match="non-finite"):
        C.build_teacher_cache(make_cfg(world.rec, tmp_path / "nan.pt", str(tmp_path / "nan.tcache")),
                              batch_size=BATCH, chunk_size=CHUNK, progress=False)
    assert not C.read_header(str(tmp_path / "nan.tcache"))[1]


def test_cli_builds_the_same_file(world, tmp_path):
    job = tmp_path / "job.py"
    job.write_text("from easydict import EasyDict as edict\nconfig = edict()\n"
                   f"config.rec = {str(world.rec)!r}\nconfig.num_classes = 5\nconfig.network = 'mbf'\n"
                   f"config.embedding_size = {DIM}\nconfig.input_size = {SIZE}\nconfig.batch_size = {BATCH}\n"
                   "config.num_workers = 1\nconfig.device = 'cpu'\n"
                   f"config.kd = edict(enabled=True, teacher_network='r18', teacher_weights={world.teacher!r}, "
                   f"teacher_embedding_size={DIM}, teacher_network_kwargs={{'width': 0.25}})\n")
    out = tmp_path / "cli.tcache"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cache_teacher.py"), str(job), "--out", str(out),
                           "--chunk-size", str(CHUNK), "--set", "kd.teacher_check=False"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert file_bytes(out) == file_bytes(world.out)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cache_teacher.py"), str(job), "--out",
                           str(tmp_path / "x.tcache"), "--set", "rec='synthetic'"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2 and "RecordIO" in proc.stderr


# ---- training from the cache --------------------------------------------------------------------------------------

def _plugin(cfg):
    plugin = UKDPlugin(cfg)
    plugin.before_training(ctx(cfg))
    return plugin


def test_cache_backend_gives_the_live_teachers_kd_losses(world):
    live = _plugin(world.cfg)
    cached = _plugin(make_cfg(world.rec, world.teacher, world.out, kd={"teacher_backend": "cache"}))
    assert type(cached.teacher).__name__ == "CacheTeacherBackend"
    g = torch.Generator().manual_seed(3)
    labels_all = np.asarray(sorted(i % 5 for i in range(N)))
    for step in range(3):  # 3 steps: the RPSD bank is filled from the cache, then used
        index = torch.randperm(N, generator=g)[:BATCH]
        flip = torch.rand(BATCH, generator=g) < 0.5
        images = torch.stack([engine_image(world.payloads[i], bool(f)) for i, f in zip(index.tolist(), flip.tolist())])
        student = torch.randn(BATCH, DIM, generator=g)
        labels = torch.from_numpy(labels_all[index.numpy()])
        terms = []
        for plugin in (live, cached):
            batch = StepBatch(images=images, labels=labels, embeddings=student.clone().requires_grad_(True),
                              step=step, index=index, flip=flip)
            terms.append({k: v.detach() for k, v in plugin.after_forward(batch).items()})
            plugin.after_step(batch)
        assert set(terms[0]) == {"kd/iled", "kd/l2", "kd/rpsd"} and set(terms[0]) == set(terms[1])
        for name in terms[0]:
            # teacher rows differ by fp16 rounding of the unit vector (<= 2^-12 per component): terms agree to
            # ~1.5e-4 relative (measured); a wrong view changes them by >= 7%
            torch.testing.assert_close(terms[1][name], terms[0][name], rtol=1e-3, atol=1e-6, msg=name)
    # the teacher rows themselves: |cache - live| <= norm * fp16 half-ulp per component
    with torch.no_grad():
        live_rows = live.teacher(images)
    cache_rows = cached.teacher(images, index=index, flip=flip)
    bound = live_rows.norm(dim=1, keepdim=True) * FP16_HALF_ULP * 1.01 + 1e-6
    assert ((cache_rows - live_rows).abs() <= bound).all()
    bank_live = [v for k, v in live.composer.state_dict().items() if "bank" in k and v.is_floating_point()]
    bank_cache = [v for k, v in cached.composer.state_dict().items() if "bank" in k and v.is_floating_point()]
    assert bank_live and all(torch.allclose(a.float(), b.float(), atol=2e-3) for a, b in zip(bank_live, bank_cache))


def test_training_run_from_the_cache_follows_the_live_teacher_run(world, tmp_path):
    """The engine's own RecordIO loader (index + reproducible flips) feeding the cache backend."""
    from arcface.engine.trainer import train
    histories = []
    for backend in ("torch", "cache"):
        cfg = make_cfg(world.rec, world.teacher, world.out, output=str(tmp_path / backend), num_epoch=2, lr=0.001,
                       warmup_epoch=0, frequent=2, tensorboard=False, seed=7, kd={"teacher_backend": backend})
        trainer = train(cfg)
        histories.append([loss for _, loss in trainer.history])
        log = open(os.path.join(cfg.output, "training.log")).read()
        assert "kd/iled" in log and "kd/rpsd" in log
    assert len(histories[0]) == 2 * (N // BATCH)
    # step 0 differs by the cache's fp16 rounding (~2e-4); training carries it on (~1e-3 after 10 steps at this
    # small lr, measured); a wrong view or sample moves the KD terms by several percent
    np.testing.assert_allclose(histories[1][:1], histories[0][:1], rtol=5e-4)
    np.testing.assert_allclose(histories[1], histories[0], rtol=5e-3)
    assert "cache " + world.out in open(os.path.join(tmp_path / "cache", "training.log")).read()


def test_cache_refuses_mismatches_at_start_up(world, tmp_path):
    kd = {"teacher_backend": "cache"}

    def start(cfg, loader=None):
        return build_teacher_backend(cfg.kd, cfg, ctx(cfg, loader))

    other_rec, _ = make_rec(tmp_path / "other_rec", n=N, seed=5)  # same count, other images
    with pytest.raises(ConfigError, match="another data set"):
        start(make_cfg(other_rec, world.teacher, world.out, kd=kd))
    other_teacher = tmp_path / "t2.pt"
    make_teacher(other_teacher, seed=2)
    with pytest.raises(ConfigError, match="sha256"):
        start(make_cfg(world.rec, other_teacher, world.out, kd=kd))
    with pytest.raises(ConfigError, match="input_size=24"):
        start(make_cfg(world.rec, world.teacher, world.out, input_size=24, kd=kd))
    with pytest.raises(ConfigError, match="teacher_embedding_size=32"):
        start(make_cfg(world.rec, world.teacher, world.out, kd=dict(kd, teacher_embedding_size=32)))
    with pytest.raises(ConfigError, match="dali"):
        start(make_cfg(world.rec, world.teacher, world.out, dali=True, kd=kd))
    with pytest.raises(ConfigError, match="RecordIO"):
        start(make_cfg("synthetic", world.teacher, world.out, kd=kd))
    with pytest.raises(ConfigError, match="does not exist"):
        start(make_cfg(world.rec, world.teacher, str(tmp_path / "none.tcache"), kd=kd))
    junk = tmp_path / "junk.tcache"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="not a teacher cache"):
        start(make_cfg(world.rec, world.teacher, str(junk), kd=kd))
    truncated = tmp_path / "short.tcache"
    truncated.write_bytes(file_bytes(world.out)[:-8])
    with pytest.raises(ConfigError, match="truncated"):
        start(make_cfg(world.rec, world.teacher, str(truncated), kd=kd))
    # no teacher file configured: the cache alone is accepted (nothing to hash against)
    backend = start(make_cfg(world.rec, world.teacher, world.out, kd=dict(kd, teacher_weights=None)))
    assert backend.embedder() is None


def test_loader_without_indices_is_refused_on_the_first_batch(world):
    cfg = make_cfg(world.rec, world.teacher, world.out, kd={"teacher_backend": "cache"})
    backend = build_teacher_backend(cfg.kd, cfg, ctx(cfg))
    images = torch.zeros(2, 3, SIZE, SIZE)
    with pytest.raises(ConfigError, match="index=None"):
        backend(images, index=None, flip=None)
    with pytest.raises(DataError, match="outside"):
        backend(images, index=torch.tensor([0, N]), flip=torch.tensor([False, True]))
