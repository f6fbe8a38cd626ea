"""KD through the engine's own trainer: 2 gloo processes, each fed half of every global batch, train the same
student (weights, Partial FC centres, memory bank) as 1 process fed the whole batches.

The student and teacher are a BatchNorm-free network registered for this test: BatchNorm normalises each rank's
half on its own (upstream's broadcast_buffers=False), which is a real difference between 1 and 2 processes that
this test is not about.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from arcface.backbones import BACKBONES
from arcface.config import base_config, validate
from engine_utils import TensorLoader, make_data

SIZE, DIM, GLOBAL_BATCH = 16, 16, 16


class FlatLinear(torch.nn.Module):
    def __init__(self, dropout=0.0, fp16=False, num_features=DIM, input_size=SIZE, width=1.0):
        super().__init__()
        self.input_size, self.fp16 = input_size, fp16
        self.fc = torch.nn.Linear(3 * input_size * input_size, num_features)

    def forward(self, x):
        return self.fc(x.flatten(1))


def register_network():
    """In the training processes only: the registry of the test session stays the project's."""
    if "flat_linear" not in BACKBONES:
        BACKBONES.register("flat_linear")(FlatLinear)


def config(output, teacher, batch):
    register_network()
    cfg = base_config()
    cfg.update(dict(rec="synthetic", num_classes=8, num_image=96, network="flat_linear", embedding_size=DIM,
                    input_size=SIZE, batch_size=batch, lr=0.05, num_epoch=1, output=str(output), frequent=100,
                    tensorboard=False, save_all_states=True, seed=3, num_workers=0, val_targets=[], device="cpu"))
    cfg.kd.update(enabled=True, teacher_network="flat_linear", teacher_weights=str(teacher),
                  teacher_embedding_size=DIM, teacher_check=False,
                  losses={"iled": {"weight": 2.0, "ratio": 0.25}, "fc": {"weight": 1.0},
                          "rpsd": {"weight": 2.0, "bank": 64, "k_neg": 8, "require_positives": False}})
    cfg.config_name = "kd_dist"
    return validate(cfg)


def run(rank, world, port, output, teacher):
    from arcface.engine.trainer import train
    register_network()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    images, labels = make_data(size=SIZE)
    cfg = config(output, teacher, GLOBAL_BATCH // world)
    trainer = train(cfg, TensorLoader(images, labels, GLOBAL_BATCH // world, rank, world))
    assert trainer.global_step == 96 // GLOBAL_BATCH


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(folder, world):
    model = torch.load(os.path.join(folder, "model.pt"), weights_only=True)
    ckpts = [torch.load(os.path.join(folder, f"checkpoint_gpu_{r}.pt"), weights_only=False) for r in range(world)]
    centres = torch.cat([c["state_dict_softmax_fc"]["weight"] for c in ckpts])
    composer = ckpts[0]["state_plugins"]["ukd"]["composer"]
    bank = composer["terms.rpsd.bank.feats"][composer["terms.rpsd.bank.valid"]]
    return model, centres, bank, ckpts


@pytest.mark.dist
@pytest.mark.slow
def test_kd_training_in_two_processes_equals_one(tmp_path):
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(11)
    torch.save(FlatLinear().state_dict(), teacher)
    mp.spawn(run, args=(1, free_port(), str(tmp_path / "one"), str(teacher)), nprocs=1, join=True)
    mp.spawn(run, args=(2, free_port(), str(tmp_path / "two"), str(teacher)), nprocs=2, join=True)
    model1, centres1, bank1, _ = outputs(tmp_path / "one", 1)
    model2, centres2, bank2, ckpts2 = outputs(tmp_path / "two", 2)
    torch.manual_seed(3)  # the trainer seeds with cfg.seed before it builds the student
    initial = FlatLinear().fc.weight.detach()
    assert (model1["fc.weight"] - initial).abs().max() > 1e-3  # it trained
    for key in model1:
        torch.testing.assert_close(model2[key], model1[key], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(centres2, centres1, rtol=1e-4, atol=1e-5)
    # the bank holds the same teacher keys on both ranks and in the 1-process run (slot order aside)
    bank_rank1 = ckpts2[1]["state_plugins"]["ukd"]["composer"]
    torch.testing.assert_close(bank_rank1["terms.rpsd.bank.feats"], ckpts2[0]["state_plugins"]["ukd"]["composer"][
        "terms.rpsd.bank.feats"])
    order = lambda b: b[torch.argsort(b[:, 0])]  # noqa: E731
    torch.testing.assert_close(order(bank2.float()), order(bank1.float()), rtol=1e-5, atol=1e-6)
