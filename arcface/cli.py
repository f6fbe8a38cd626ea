"""What every command-line tool does at its entry point: log to stderr, turn a UKDError into one clear line."""
import logging
import sys

from .errors import UKDError


def run_cli(main, argv=None):
    """Run main(argv); a UKDError (bad config, data or checkpoint) prints 'error: ...' and exits with status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        main(argv)
    except UKDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
