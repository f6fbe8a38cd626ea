"""Compare KD methods over a grid of weights and several seeds, selected on validation, reported on test.

The code is plugins.ukd.tools.kd_study (also `python -m plugins.ukd.tools.kd_study` once the package is installed).
"""
import sys

from plugins.ukd.tools.kd_study import main

if __name__ == "__main__":
    sys.exit(main())
