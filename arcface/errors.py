"""One exception type per boundary, so a user sees what went wrong and where before harm is done."""
import difflib


def did_you_mean(name, candidates, cutoff=0.5):
    """"; did you mean 'x'?" for the closest known name, or "" when nothing is close enough."""
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=cutoff)
    return f"; did you mean '{match[0]}'?" if match else ""


class UKDError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(UKDError):
    """A config file, key or value is wrong. Deliberately not a KeyError: code that handles a missing dict key
    must never swallow a user's configuration mistake."""


class DataError(UKDError):
    """A data file (RecordIO, index, image, .bin, IJB meta) is missing or malformed."""


class CheckpointError(UKDError):
    """A checkpoint does not exist, does not match the network, or comes from another world size."""


class TrainingDiverged(UKDError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is intact."""


class DistributedError(UKDError):
    """Another rank of the job stopped, died or fell too far behind: a collective did not complete in time."""
