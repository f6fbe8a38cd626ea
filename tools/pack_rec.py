"""Pack images into MXNet RecordIO (train.rec / train.idx), shuffle or re-index one.

The code is arcface.tools.pack_rec (also `ukd-pack-rec` and `python -m arcface.tools.pack_rec` once the package is installed).
"""
import sys

from arcface.tools.pack_rec import main

if __name__ == "__main__":
    sys.exit(main())
