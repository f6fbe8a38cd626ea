"""What every command-line tool does at its entry point: one clear line for a UKDError, exit status 2."""
import functools
import logging
import sys

from .errors import UKDError


def report_errors(main):
    """Decorator of a tool's main(argv): a UKDError (bad config, data or checkpoint) prints 'error: ...' on
    stderr and main returns 2; anything else propagates with its traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UKDError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return wrapper


def exit_status(run, argv=None):
    """Console entry of tools whose run(argv) raises (so that tests see the exception) and returns results:
    logging to stderr, a UKDError as one line with status 2, otherwise status 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    status = report_errors(run)(argv)
    return status if isinstance(status, int) else 0
