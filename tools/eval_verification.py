"""Verification accuracy of a model on .bin pair sets (lfw, cfp_fp, agedb_30, ...).

The code is arcface.tools.eval_verification (also `ukd-eval-verification` and `python -m arcface.tools.eval_verification` once the package is installed).
"""
import sys

from arcface.tools.eval_verification import main

if __name__ == "__main__":
    sys.exit(main())
