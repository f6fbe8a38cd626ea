"""Generate procedural faces: training .rec, .bin pairs and an IJB-style folder.

The code is arcface.tools.make_synthetic (also `ukd-make-synthetic` and `python -m arcface.tools.make_synthetic` once the package is installed).
"""
import sys

from arcface.tools.make_synthetic import main

if __name__ == "__main__":
    sys.exit(main())
