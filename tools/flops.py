"""Parameters and multiply-adds (FLOPs) of a backbone.

The code is arcface.tools.flops (also `ukd-flops` and `python -m arcface.tools.flops` once the package is installed).
"""
import sys

from arcface.tools.flops import main

if __name__ == "__main__":
    sys.exit(main())
