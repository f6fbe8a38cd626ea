"""Write docs/configs.md from the config key tables.

The code is arcface.tools.gen_config_docs (also `ukd-gen-config-docs` and `python -m arcface.tools.gen_config_docs` once the package is installed).
"""
import sys

from arcface.tools.gen_config_docs import main

if __name__ == "__main__":
    sys.exit(main())
