"""Train a face-recognition model (optionally distilled): the arcface_torch train_v2.py entry point.

    torchrun --nproc_per_node=8 tools/train.py configs/ms1mv3_mbf_ukd.py
    python tools/train.py configs/synth_mbf.py --set lr=0.05 num_epoch=2
"""
import argparse
import sys


from arcface.config import load_config
from arcface.engine.trainer import train
from arcface.cli import report_errors


@report_errors
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="python config file, e.g. configs/ms1mv3_mbf.py")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config keys, e.g. --set lr=0.05 kd.enabled=True")
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # torch.distributed.launch
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)  # plugin sections and names checked before any data work
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
