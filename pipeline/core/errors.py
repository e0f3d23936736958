"""Errors a user (or the machine) causes: the CLI prints them as one line and exits 2, never a traceback."""


class UserError(Exception):
    """Base of every error whose message alone tells the user what to fix."""


class ManifestError(UserError, RuntimeError):
    """A run folder's manifest.json is damaged or not one of ours."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite."""
