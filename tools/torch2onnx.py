"""Export a backbone checkpoint to ONNX.

The code is arcface.tools.torch2onnx (also `ukd-torch2onnx` and `python -m arcface.tools.torch2onnx` once the package is installed).
"""
import sys

from arcface.tools.torch2onnx import main

if __name__ == "__main__":
    sys.exit(main())
