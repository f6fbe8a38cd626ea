"""Cache a teacher's embeddings of a training set once, for kd.teacher_backend='cache'.

The code is plugins.ukd.tools.cache_teacher (also `ukd-cache-teacher` and `python -m plugins.ukd.tools.cache_teacher` once the package is installed).
"""
import sys

from plugins.ukd.tools.cache_teacher import main

if __name__ == "__main__":
    sys.exit(main())
