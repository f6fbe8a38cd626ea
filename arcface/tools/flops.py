"""Parameters and multiply-adds of a backbone by name, at a given input size (arcface_torch's flops.py).

    python tools/flops.py r50                     # iResNet-50 at 112x112
    python tools/flops.py mbf --input-size 96 --network-kwargs '{"width": 0.5}'

Face-recognition papers and insightface's tables call multiply-adds "FLOPs"; so does this tool. The count is
taken by forward hooks during one forward pass of a single image, with these rules:

    Conv2d       output elements x (input channels / groups) x kernel height x kernel width, + output elements
                 when the layer has a bias
    Linear       input features x output features, + output features when it has a bias
    BatchNorm    one per element (at inference it is a scale and a shift)
    PReLU        one per element

Everything else (ReLU, pooling, dropout, residual additions, reshapes, attention's matrix products written
as functions) counts zero, so the figure for a transformer is a lower bound. Parameters are all the
network's parameters, buffers (BatchNorm statistics) excluded.
"""
import argparse
import json
import sys

import torch

from arcface.cli import exit_status
from arcface.errors import ConfigError

def _conv(module, output):
    per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return output.numel() * (per_output + (module.bias is not None))


def _linear(module, output):
    return output.numel() * (module.in_features + (module.bias is not None))


def _per_element(module, output):
    return output.numel()


def _rule(module):
    if isinstance(module, torch.nn.Conv2d):
        return "conv", _conv
    if isinstance(module, torch.nn.Linear):
        return "linear", _linear
    if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        return "batchnorm", _per_element
    if isinstance(module, torch.nn.PReLU):
        return "prelu", _per_element
    return None, None


@torch.no_grad()
def count_multiply_adds(model, input_size, channels=3):
    """{'conv': n, 'linear': n, 'batchnorm': n, 'prelu': n, 'total': n} for one [1, channels, S, S] image.

    The model runs once in eval mode on zeros (values do not change the count); its mode is restored after.
    """
    counts = {"conv": 0, "linear": 0, "batchnorm": 0, "prelu": 0}
    handles = []
    for module in model.modules():
        kind, rule = _rule(module)
        if rule is None:
            continue

        def hook(mod, inputs, output, kind=kind, rule=rule):
            counts[kind] += int(rule(mod, output))
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    try:
        model.eval()
        model(torch.zeros(1, channels, int(input_size), int(input_size), device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    counts["total"] = sum(counts.values())
    return counts


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="parameters and multiply-adds (FLOPs) of a backbone", allow_abbrev=False)
    p.add_argument("network", nargs="?", default=None, help="get_model name: r18 r34 r50 r100 r200 mbf vit_t ... "
                   "(default r50)")
    p.add_argument("--network", dest="network_option", default=None, help="the same, as the other tools spell it")
    p.add_argument("--input-size", default=112, type=int, help="side of the square input image")
    p.add_argument("--network-kwargs", default="{}", help='extra get_model keywords as JSON, e.g. \'{"width": 0.5}\'')
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    if args.network and args.network_option and args.network != args.network_option:
        raise ConfigError(f"two networks given: {args.network} and --network {args.network_option}")
    args.network = args.network or args.network_option or "r50"
    if args.input_size < 1:
        raise ConfigError(f"--input-size must be >= 1, got {args.input_size}")
    try:
        args.network_kwargs = json.loads(args.network_kwargs)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--network-kwargs is not valid JSON: {err}") from None
    if not isinstance(args.network_kwargs, dict):
        raise ConfigError("--network-kwargs must be a JSON object")
    return args


def run(argv=None):
    from arcface.backbones import get_model
    from arcface.eval.embedder import upstream_alias

    args = parse_args(argv)
    kwargs = {"dropout": 0.0, "fp16": False, **args.network_kwargs, "input_size": args.input_size}
    model = get_model(upstream_alias(args.network), **kwargs)
    counts = count_multiply_adds(model, args.input_size)
    result = {"network": args.network, "input_size": args.input_size, "parameters": count_parameters(model),
              "multiply_adds": counts}
    if args.json:
        print(json.dumps(result))
    else:
        parts = ", ".join(f"{kind} {n / 1e9:.3f}" for kind, n in counts.items() if kind != "total")
        print(f"{args.network} at {args.input_size}x{args.input_size}: {result['parameters'] / 1e6:.2f} M parameters, "
              f"{counts['total'] / 1e9:.3f} GFLOPs (multiply-adds; {parts})")
    return result


def main(argv=None):
    return exit_status(run, argv)


if __name__ == "__main__":
    sys.exit(main())
