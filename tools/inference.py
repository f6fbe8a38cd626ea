"""Embed one face image with a trained backbone.

The code is arcface.tools.inference (also `ukd-inference` and `python -m arcface.tools.inference` once the package is installed).
"""
import sys

from arcface.tools.inference import main

if __name__ == "__main__":
    sys.exit(main())
