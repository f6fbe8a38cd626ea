"""Backbones: upstream-identical state_dicts and outputs, the extra knobs, and strict weight loading.

The fixtures in tests/fixtures/backbones were produced from insightface's own iresnet.py and
mobilefacenet.py (see fixtures/backbones/README.md): the state_dict layout of each network, and the
eval-mode outputs of upstream r18 / mbf after `deterministic_state` (below) filled their weights.
"""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from arcface.backbones import get_model, list_models, load_backbone_weights
from arcface.errors import CheckpointError, ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "backbones"
LAYOUT = json.loads((FIXTURES / "state_dict_layout.json").read_text())
INPUT_SEED = 20240611


# ----------------------------------------------------------------------------- shared with the fixture script
def deterministic_state(layout):
    """A state dict for `layout` ([key, shape, dtype] rows) whose every tensor depends only on its key.

    numpy's legacy RandomState has a stream guaranteed stable across versions, so upstream's model (when the
    fixture was made) and ours (now) get bit-identical weights. The scales (weights ~ N(0, 1/fan_in), BN
    scales / PReLU slopes in [0.45, 1.35], running variances in [0.5, 2]) were tuned so that eval-mode r18
    and mbf embeddings are O(1) and still depend strongly on the input: smaller scales make the trunk's
    signal vanish (the output would be all biases), larger ones make mbf's residual sums explode.
    """
    state = {}
    for key, shape, dtype in layout:
        rng = np.random.RandomState(int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little"))
        leaf = key.rsplit(".", 1)[-1]
        shape = tuple(shape)
        if leaf == "num_batches_tracked":
            value = np.full(shape, 1000)
        elif leaf == "running_var":
            value = rng.uniform(0.5, 2.0, shape)
        elif leaf == "running_mean":
            value = rng.normal(0.0, 0.2, shape)
        elif len(shape) >= 2:
            value = rng.normal(0.0, 1.0 / math.sqrt(math.prod(shape[1:])), shape)
        elif leaf == "weight":  # BN scale or PReLU slope
            value = rng.uniform(0.45, 1.35, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        state[key] = torch.from_numpy(np.asarray(value)).to(getattr(torch, dtype))
    return state


def reference_input(size=112, batch=2):
    return torch.from_numpy(np.random.RandomState(INPUT_SEED).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32))


def layout_of(model):
    return [[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()]


def layout_digest(layout):
    """sha256 of the canonical JSON of a layout: the fixture keeps only this for r34 and r200 (size)."""
    return hashlib.sha256(json.dumps(layout, separators=(",", ":")).encode()).hexdigest()


# ----------------------------------------------------------------------------- helpers
def on_meta(name, **kwargs):
    """Full-size networks without allocating or initialising their weights (r100/r200 stay cheap)."""
    with torch.device("meta"):
        return get_model(name, **kwargs)


def tiny(name, **kwargs):
    kwargs.setdefault("input_size", 32)
    kwargs.setdefault("width", 0.25)
    kwargs.setdefault("num_features", 64)
    torch.manual_seed(0)
    return get_model(name, **kwargs)


def images(size, batch=3, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- upstream compatibility
def test_registry_names():
    convolutional = [name for name in list_models() if not name.startswith("vit")]  # ViTs: tests/test_vit.py
    assert convolutional == sorted(["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large"])
    assert sorted(LAYOUT["networks"]) == convolutional
    for record in LAYOUT["networks"].values():
        if "state_dict" in record:
            assert layout_digest(record["state_dict"]) == record["sha256"]


@pytest.mark.parametrize("name", sorted(LAYOUT["networks"]))
def test_state_dict_layout_is_upstreams(name):
    ours = layout_of(on_meta(name))
    record = LAYOUT["networks"][name]
    assert len(ours) == record["num_entries"]
    assert layout_digest(ours) == record["sha256"]
    if "state_dict" in record:  # listed in full: compare row by row for a readable failure
        for mine, theirs in zip(ours, record["state_dict"]):
            assert mine == theirs


@pytest.mark.parametrize("name", sorted(LAYOUT["networks"]))
def test_parameter_counts_are_upstreams(name):
    model = on_meta(name)
    record = LAYOUT["networks"][name]
    assert sum(p.numel() for p in model.parameters()) == record["num_parameters"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == record["num_trainable"]


def test_parameter_counts_are_the_published_sizes():
    """Guards the fixture itself: r50 is insightface's 43.6M-parameter net, mbf the 2.0M one."""
    assert LAYOUT["networks"]["r50"]["num_parameters"] == pytest.approx(43.6e6, rel=0.01)
    assert LAYOUT["networks"]["mbf"]["num_parameters"] == pytest.approx(2.06e6, rel=0.01)


def test_reference_input_is_the_fixtures():
    """If this fails, the RNG changed, not the network: regenerate the fixtures rather than debug the model."""
    probe = np.load(FIXTURES / "reference_outputs.npz")
    x = reference_input().numpy()
    np.testing.assert_array_equal(x.reshape(-1)[:16], probe["input_head"])
    assert float(x.astype(np.float64).sum()) == pytest.approx(float(probe["input_sum"]), abs=1e-6)


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_outputs_equal_upstreams_under_identical_weights(name):
    expected = np.load(FIXTURES / "reference_outputs.npz")[name]
    model = get_model(name)
    load_backbone_weights(model, deterministic_state(LAYOUT["networks"][name]["state_dict"]))
    model.eval()
    with torch.inference_mode():
        out = model(reference_input())
    assert out.dtype == torch.float32 and out.shape == (2, 512)
    assert 0.1 < float(out.abs().mean()) < 100  # the fixture exercises real activations, not zeros
    torch.testing.assert_close(out, torch.from_numpy(expected), atol=1e-4, rtol=1e-5)


def test_weights_differ_per_key():
    """The generator must not give two tensors the same values, or a swapped layer would go unnoticed."""
    rows = [row for row in LAYOUT["networks"]["r18"]["state_dict"] if row[0].endswith(".conv2.weight")][:4]
    state = deterministic_state(rows)
    a, b = state["layer1.0.conv2.weight"], state["layer1.1.conv2.weight"]
    assert a.shape == b.shape and not torch.equal(a, b)


# ----------------------------------------------------------------------------- our knobs
@pytest.mark.parametrize("name", ["r18", "mbf", "mbf_large"])
@pytest.mark.parametrize("size", [32, 48, 56])
def test_small_inputs_and_width_give_fp32_embeddings(name, size):
    model = tiny(name, input_size=size).eval()
    with torch.inference_mode():
        out = model(images(size, batch=2))
    assert out.shape == (2, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size, side", [(48, 3), (56, 4), (112, 7)])
def test_input_size_adapts_fc_and_gdc(size, side):
    """Each stride-2 stage maps n to ceil(n / 2): 56 -> 28 -> 14 -> 7 -> 4."""
    r18 = on_meta("r18", input_size=size, width=0.25)
    assert tuple(r18.fc.weight.shape) == (512, 128 * side * side)
    mbf = on_meta("mbf", input_size=size, width=0.25)
    assert tuple(mbf.features.layers[0].layers[0].weight.shape) == (128, 1, side, side)


def test_width_scales_channels_and_keeps_key_names():
    full, narrow = on_meta("r18"), on_meta("r18", width=0.25)
    assert [k for k, _, _ in layout_of(full)] == [k for k, _, _ in layout_of(narrow)]
    assert narrow.conv1.weight.shape[0] == 16 and narrow.layer4[0].conv1.weight.shape[0] == 128
    full_state, narrow_state = full.state_dict(), narrow.state_dict()
    for key in full_state:
        if key.startswith("layer") and key.endswith("conv1.weight"):  # both channel counts scale by 1/4
            assert full_state[key].numel() == 16 * narrow_state[key].numel(), key
    assert narrow.fc.in_features == 128 * 7 * 7 and narrow.fc.out_features == 512
    mbf_full, mbf_narrow = on_meta("mbf"), on_meta("mbf", width=0.25)
    assert [k for k, _, _ in layout_of(mbf_full)] == [k for k, _, _ in layout_of(mbf_narrow)]
    assert mbf_narrow.conv_sep.layers[0].weight.shape[0] == 128


@pytest.mark.parametrize("name", ["r18", "mbf"])
def test_fp16_autocasts_the_trunk_but_returns_fp32_on_cpu(name):
    model = tiny(name).eval()
    trunk = model.layer4 if name == "r18" else model.layers[-1]
    seen = []
    trunk.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    x = images(32)
    with torch.inference_mode():
        reference = model(x)
        model.fp16 = True
        mixed = model(x)
    assert seen == [torch.float32, torch.bfloat16]
    assert mixed.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(mixed, reference)
    assert (cosine > 0.98).all(), cosine


def test_embedding_stays_fp32_inside_an_outer_autocast():
    model = tiny("r18", fp16=True).eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(images(32)).dtype == torch.float32


def test_features_bn_weight_is_frozen_at_one():
    model = tiny("r18").train()
    assert model.features.weight.requires_grad is False
    assert torch.equal(model.features.weight, torch.ones(64))
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(images(32, batch=4)).pow(2).mean().backward()
    optimizer.step()
    assert torch.equal(model.features.weight, torch.ones(64))
    assert not torch.equal(model.fc.weight, before["fc.weight"])
    assert model.features.bias.requires_grad and not torch.equal(model.features.bias, before["features.bias"])


def test_gradient_checkpointing_changes_nothing_but_memory():
    x = images(32, batch=4)
    plain, ckpt = tiny("r18").train(), tiny("r18").train().set_gradient_checkpointing(True)
    out_plain, out_ckpt = plain(x), ckpt(x)
    out_plain.sum().backward()
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out_plain)
    torch.testing.assert_close(ckpt.layer2[0].conv1.weight.grad, plain.layer2[0].conv1.weight.grad)
    assert ckpt.state_dict().keys() == plain.state_dict().keys()


# ----------------------------------------------------------------------------- configuration errors
def test_unknown_name_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'r50'"):
        get_model("r5O")


def test_unknown_keyword_is_named():
    with pytest.raises(ConfigError, match="'num_feature'.*did you mean 'num_features'"):
        get_model("r18", num_feature=128)


@pytest.mark.parametrize("kwargs, text", [
    ({"input_size": 8}, "integer >= 16"),
    ({"input_size": 112.0}, "integer >= 16"),
    ({"input_size": "112"}, "integer >= 16"),
    ({"width": 0}, "width must be > 0"),
    ({"num_features": 0}, "num_features"),
    ({"dropout": 1.5}, "dropout"),
])
def test_bad_values_are_config_errors(kwargs, text):
    with pytest.raises(ConfigError, match=text):
        on_meta("r18", **kwargs)


def test_mbf_refuses_a_dropout_it_would_ignore():
    assert isinstance(on_meta("mbf", dropout=0.0), torch.nn.Module)  # what upstream's trainer passes
    with pytest.raises(ConfigError, match="no dropout"):
        on_meta("mbf", dropout=0.2)


def test_wrong_image_size_is_explained():
    with pytest.raises(ValueError, match=r"input_size=32 expects images \[B, 3, 32, 32\], got \[3, 3, 48, 48\]"):
        tiny("mbf")(images(48))


def test_construction_of_the_deep_resnets():
    for name, blocks in (("r100", (3, 13, 30, 3)), ("r200", (6, 26, 60, 6))):
        model = on_meta(name)
        assert tuple(len(getattr(model, f"layer{i}")) for i in range(1, 5)) == blocks
        assert model.fc.in_features == 512 * 7 * 7 and model.network == name


# ----------------------------------------------------------------------------- loading
def save(obj, path):
    torch.save(obj, path)
    return path


@pytest.fixture
def small_pair():
    """A trained-looking source model and a fresh target of the same architecture."""
    source = tiny("mbf").eval()
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
    return source, tiny("mbf").eval()


def assert_same_outputs(a, b):
    x = images(32)
    with torch.inference_mode():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


def test_plain_model_pt_round_trip(small_pair, tmp_path):
    source, target = small_pair
    result = load_backbone_weights(target, save(source.state_dict(), tmp_path / "model.pt"))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same_outputs(source, target)


def test_training_checkpoint_and_module_prefix(small_pair, tmp_path):
    source, target = small_pair
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    checkpoint = {"epoch": 3, "global_step": 120, "state_dict_backbone": wrapped,
                  "state_dict_softmax_fc": {"weight": torch.zeros(10, 64)},
                  "state_optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}
    load_backbone_weights(target, save(checkpoint, tmp_path / "checkpoint_gpu_0.pt"))
    assert_same_outputs(source, target)


def test_wrapped_model_receives_the_weights(small_pair):
    source, target = small_pair
    load_backbone_weights(torch.nn.DataParallel(target), source.state_dict())
    assert_same_outputs(source, target)


def test_missing_key_is_named_with_file_and_network(small_pair, tmp_path):
    source, target = small_pair
    state = source.state_dict()
    del state["conv_sep.layers.0.weight"]
    path = save(state, tmp_path / "backbone.pth")
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(target, path, what="teacher")
    text = str(info.value)
    for part in ("teacher weights", str(path), "mbf(num_features=64, input_size=32, width=0.25)",
                 "1 missing keys (conv_sep.layers.0.weight)"):
        assert part in text, text


def test_missing_key_tolerated_when_not_strict(small_pair):
    source, target = small_pair
    state = source.state_dict()
    del state["conv_sep.layers.0.weight"]
    state["extra.weight"] = torch.zeros(1)
    result = load_backbone_weights(target, state, strict=False)
    assert result.missing_keys == ["conv_sep.layers.0.weight"]
    torch.testing.assert_close(target.features.layers[2].weight, source.features.layers[2].weight)


def test_shape_mismatch_names_both_shapes(tmp_path):
    path = save(tiny("r18", num_features=128).state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(tiny("r18"), path)
    text = str(info.value)
    assert "fc.weight: file [128, 512] vs model [64, 512]" in text and "num_features" in text, text


def test_shape_mismatch_is_an_error_even_when_not_strict(tmp_path):
    path = save(tiny("r18", num_features=128).state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_backbone_weights(tiny("r18"), path, strict=False)


def test_other_network_is_recognised(small_pair, tmp_path):
    source, _ = small_pair
    with pytest.raises(CheckpointError, match="different network"):
        load_backbone_weights(tiny("r18"), save(source.state_dict(), tmp_path / "model.pt"))


def test_bad_files_are_checkpoint_errors(tmp_path):
    model = tiny("r18")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_backbone_weights(model, tmp_path / "nope.pt")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.txt is not a PyTorch checkpoint"):
        load_backbone_weights(model, text_file)
    truncated = save(model.state_dict(), tmp_path / "truncated.pt")
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated.pt is not a readable PyTorch checkpoint"):
        load_backbone_weights(model, truncated)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_backbone_weights(model, save(model, tmp_path / "whole_module.pt"))
    with pytest.raises(CheckpointError, match="without tensors"):
        load_backbone_weights(model, save({"epoch": 1, "global_step": 5}, tmp_path / "meta.pt"))
    with pytest.raises(CheckpointError, match="holds a list"):
        load_backbone_weights(model, save([1, 2], tmp_path / "list.pt"))
