"""IJB-B / IJB-C 1:1 verification and 1:N identification of a model.

The code is arcface.tools.eval_ijb (also `ukd-eval-ijb` and `python -m arcface.tools.eval_ijb` once the package is installed).
"""
import sys

from arcface.tools.eval_ijb import main

if __name__ == "__main__":
    sys.exit(main())
