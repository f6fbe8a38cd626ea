"""One training step of ViT-T next to MobileFaceNet and iResNet-50, at the same batch and input size.

A step is what the trainer does per batch for the backbone: forward, a loss on the embeddings, backward, and an
optimizer step (AdamW for the ViT as upstream's ViT configs, SGD for the CNNs as theirs). The networks are
timed in turns (a, b, c, a, b, c, ...) so a change in the machine's load falls on all of them alike; the
printed figure is each network's median. Forward GFLOPs come from torch's FLOP counter on one image.
    python benchmarks/bench_backbone_step.py [--batch 32] [--input-size 112] [--repeat 3] [--fp16]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NETWORKS = ("vit_t", "mbf", "r50")


def forward_gflops(model, input_size):
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    model.train()
    return counter.get_total_flops() / 1e9


def make_step(name, batch, input_size, fp16):
    import torch

    from arcface.backbones import get_model
    torch.manual_seed(0)
    model = get_model(name, fp16=fp16, input_size=input_size).train()
    if name.startswith("vit"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    images = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
    targets = torch.nn.functional.normalize(torch.randn(batch, 512, generator=torch.Generator().manual_seed(2)))

    def step():
        optimizer.zero_grad(set_to_none=True)
        embeddings = torch.nn.functional.normalize(model(images))
        (1 - (embeddings * targets).sum(dim=1)).mean().backward()
        optimizer.step()

    params = sum(p.numel() for p in model.parameters()) / 1e6
    return step, params, forward_gflops(model, input_size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per network (after one warm-up step)")
    parser.add_argument("--fp16", action="store_true", help="the backbones' autocast (bf16 on CPU)")
    args = parser.parse_args(argv)
    from benchmarks.common import machine

    steps, info = {}, {}
    for name in NETWORKS:
        steps[name], params, gflops = make_step(name, args.batch, args.input_size, args.fp16)
        info[name] = (params, gflops)
        steps[name]()  # warm-up: allocator, optimizer state
    times = {name: [] for name in NETWORKS}
    for _ in range(args.repeat):
        for name in NETWORKS:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}

    print(machine())
    print(f"training step (forward + loss + backward + optimizer), batch {args.batch}, "
          f"{args.input_size}x{args.input_size}, {'bf16 autocast' if args.fp16 else 'fp32'}, "
          f"median of {args.repeat} interleaved steps")
    print(f"{'network':>8} {'params M':>9} {'fwd GFLOPs/img':>15} {'step s':>8} {'images/s':>9} {'vs vit_t':>9}")
    for name in NETWORKS:
        params, gflops = info[name]
        print(f"{name:>8} {params:>9.2f} {gflops:>15.3f} {median[name]:>8.3f} {args.batch / median[name]:>9.1f} "
              f"{median[name] / median['vit_t']:>9.2f}")
    print(f"ratio step time vit_t / mbf = {median['vit_t'] / median['mbf']:.2f}")
    print(f"ratio step time vit_t / r50 = {median['vit_t'] / median['r50']:.2f}")
    print(f"ratio fwd GFLOPs vit_t / mbf = {info['vit_t'][1] / info['mbf'][1]:.2f}, "
          f"vit_t / r50 = {info['vit_t'][1] / info['r50'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
