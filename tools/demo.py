"""The main job end to end on procedural faces (what `make demo` runs).

The code is plugins.ukd.tools.demo (also `ukd-demo` and `python -m plugins.ukd.tools.demo` once the package is installed).
"""
import sys

from plugins.ukd.tools.demo import main

if __name__ == "__main__":
    sys.exit(main())
