"""Train a face-recognition model (optionally distilled); arcface_torch's train_v2.py entry point.

The code is arcface.tools.train (also `ukd-train` and `python -m arcface.tools.train` once the package is installed).
"""
import sys

from arcface.tools.train import main

if __name__ == "__main__":
    sys.exit(main())
