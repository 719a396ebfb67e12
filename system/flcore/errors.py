"""Errors that reach the user as one line: what is wrong, and how to fix it."""


class FedA2VError(Exception):
    """Base of every error caused by the user's input rather than by a bug."""


class ConfigError(FedA2VError):
    """A config value is out of range, of the wrong type, or inconsistent with another."""


class DataError(FedA2VError):
    """A dataset folder, metadata file or audio file is missing or unusable."""


class TrainingError(FedA2VError):
    """Training diverged (a NaN or infinite loss); names the node, round and epoch."""


class CheckpointError(FedA2VError):
    """A checkpoint is missing, corrupted, or was written by a different config."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; the message names the last round and how to resume.
    A KeyboardInterrupt, so that it also stops a sweep instead of moving to the next job."""


class ResourceError(FedA2VError):
    """The machine lacks what the config asks for: device memory, GPUs, a reachable cluster."""
