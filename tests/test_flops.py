"""The multiply-add counter on a network counted by hand, on the backbones against published figures, the CLI."""
import json

import pytest
import torch

from arcface.backbones import get_model
from arcface.tools import flops
from arcface.tools.flops import count_multiply_adds, count_parameters


def tiny_network():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, bias=False),            # 8x8 -> 4x8x8
        torch.nn.BatchNorm2d(4),
        torch.nn.PReLU(4),
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),    # -> 6x4x4, with bias
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(96, 5),
        torch.nn.BatchNorm1d(5),
    )


def test_hand_computed_tiny_network():
    net = tiny_network().train()
    counts = count_multiply_adds(net, 8)
    # conv 1: 4*8*8 = 256 outputs x (3 channels x 3 x 3 = 27) = 6912
    # conv 2: 6*4*4 = 96 outputs x (4/2 channels x 3 x 3 = 18, + 1 bias) = 1824
    assert counts["conv"] == 6912 + 1824
    # linear: 5 outputs x (96 inputs + 1 bias) = 485
    assert counts["linear"] == 485
    assert counts["batchnorm"] == 256 + 5 and counts["prelu"] == 256
    assert counts["total"] == 6912 + 1824 + 485 + 261 + 256
    # parameters: 108 + (4 + 4) + 4 + (108 + 6) + (480 + 5) + (5 + 5); running statistics are not parameters
    assert count_parameters(net) == 729
    # the model is left as it was: mode restored, no hook left behind
    assert net.training and all(not m._forward_hooks for m in net.modules())
    assert count_multiply_adds(net, 8) == counts


def test_counts_follow_the_input_size_of_convolutions():
    net = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_multiply_adds(net, 16)["total"] == 4 * count_multiply_adds(net, 8)["total"] == 4 * 8 * 64 * 27


@pytest.mark.parametrize("name,gflops,mparams", [
    ("r50", (6.2, 6.4), (43.5, 43.7)),     # insightface: 6.3 GFLOPs, 43.6 M
    ("r100", (12.0, 12.2), (65.1, 65.2)),  # insightface: 12.1 GFLOPs
    ("mbf", (0.44, 0.46), (2.0, 2.1)),     # insightface: 0.45 GFLOPs (its mbf is the 2x-wide MobileFaceNet)
])
def test_backbones_match_published_figures(name, gflops, mparams):
    model = get_model(name)
    total = count_multiply_adds(model, 112)["total"] / 1e9
    params = count_parameters(model) / 1e6
    assert gflops[0] < total < gflops[1] and mparams[0] < params < mparams[1]


def test_cli_prints_and_returns_the_counts(capsys):
    args = ["r18", "--input-size", "32", "--network-kwargs", '{"width": 0.25, "num_features": 16}']
    result = flops.run(args + ["--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result
    model = get_model("r18", input_size=32, width=0.25, num_features=16)
    assert result["parameters"] == count_parameters(model)
    assert result["multiply_adds"] == count_multiply_adds(model, 32)
    assert flops.main(args) == 0
    assert "GFLOPs" in capsys.readouterr().out


def test_cli_errors_name_the_option(capsys):
    assert flops.main(["r18", "--network-kwargs", "[1]"]) == 2
    assert "--network-kwargs must be a JSON object" in capsys.readouterr().err
    assert flops.main(["r51"]) == 2
    assert "unknown backbone 'r51'; did you mean 'r50'?" in capsys.readouterr().err


def test_network_may_be_given_as_an_option_like_the_other_tools(capsys):
    assert flops.main(["--network", "mbf", "--input-size", "32"]) == 0
    assert capsys.readouterr().out.startswith("mbf at 32x32")
    assert flops.main(["r18", "--network", "mbf"]) == 2  # two different networks: a clear error, not a guess
