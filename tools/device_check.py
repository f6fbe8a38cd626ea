"""Check every CUDA path and speed claim in one short run on a lent GPU machine (report.json, report.md).

The code is plugins.ukd.tools.device_check (also `ukd-device-check` once the package is installed; from a checkout
that is not installed, run it with PYTHONPATH set to the checkout: see docs/device_check.md).
"""
import sys

from plugins.ukd.tools.device_check import main

if __name__ == "__main__":
    sys.exit(main())
