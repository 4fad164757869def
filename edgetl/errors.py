"""User-facing errors.

Anything the user can fix (a wrong path, an empty folder, a file that is not a model) is raised as
an `EdgetlError`; the CLI prints its message on one line and exits with its code. Anything else is a
bug and keeps its traceback.
"""


class EdgetlError(Exception):
    """A problem with the user's input, reported as one line and a non-zero exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class TrainingInterrupted(Exception):
    """Ctrl-C during training, raised after the last good checkpoint has been saved."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(run_dir)
        self.run_dir = run_dir


class PeerFailed(EdgetlError):
    """Another training process (rank 0) failed and said why itself: this one exits quietly."""
