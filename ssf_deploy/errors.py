"""One exception type for every user-facing failure: the CLI prints it as one line and exits 2."""


class SSFDeployError(Exception):
    """A problem with the user's input or environment, explained in one line."""
