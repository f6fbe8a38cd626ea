"""Print the layout of a RecordIO data set and dump a few images.

The code is arcface.tools.inspect_rec (also `ukd-inspect-rec` and `python -m arcface.tools.inspect_rec` once the package is installed).
"""
import sys

from arcface.tools.inspect_rec import main

if __name__ == "__main__":
    sys.exit(main())
