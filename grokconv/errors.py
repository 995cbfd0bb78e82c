"""Error types. Each subclasses the built-in it resembles and names the file and what is wrong."""
from __future__ import annotations

__all__ = [
    "GrokconvError", "CheckpointFormatError", "UnsafePickleError", "MissingTensorError",
    "ShapeMismatchError", "TruncatedFileError", "LayoutError", "DownloadError", "ParityError",
    "EngineUnavailableError", "DiskFullError", "OutputMismatchError", "OutputLockedError",
]


class GrokconvError(Exception):
    """Base of every error grokconv raises on purpose. ``hint`` is a one-line advice for the CLI."""

    hint: str | None = None

    def __init__(self, message: str, *, path: object = None, hint: str | None = None):
        self.path = None if path is None else str(path)
        if hint is not None:
            self.hint = hint
        super().__init__(f"{self.path}: {message}" if self.path else message)


class CheckpointFormatError(GrokconvError, ValueError):
    """A file is not what its format says it must be."""


class UnsafePickleError(CheckpointFormatError):
    """A pickle names a global or opcode outside the allow-list. Nothing in it was run."""

    def __init__(self, message: str, *, path: object = None, global_name: str | None = None):
        self.global_name = global_name
        super().__init__(message, path=path,
                         hint="this file is not part of a Grok-1 checkpoint; do not load it with pickle")


class MissingTensorError(GrokconvError, FileNotFoundError):
    """A file or tensor the config requires is absent (or an unexpected one is present)."""


class ShapeMismatchError(CheckpointFormatError):
    def __init__(self, message: str, *, path: object = None, expected=None, got=None):
        self.expected, self.got = expected, got
        super().__init__(message, path=path)


class TruncatedFileError(CheckpointFormatError):
    """A file ends before its declared payload does."""


class LayoutError(GrokconvError, ValueError):
    """A mapping, layout or parallel split that cannot be applied."""


class DownloadError(GrokconvError, OSError):
    """The hub could not give what was asked (missing repo, auth, network, checksum, disk)."""


class DiskFullError(GrokconvError, OSError):
    """An output could not be written: no space left on its device (or the quota is used up)."""

    hint = "free space and re-run the same command: finished files are kept and it resumes"


class ParityError(GrokconvError, AssertionError):
    """A parity threshold was exceeded."""


class EngineUnavailableError(GrokconvError, ImportError):
    """``parity --engine`` asked for an engine whose library is not installed."""


class OutputMismatchError(GrokconvError, FileExistsError):
    """The output already holds files another source or other options made (``--overwrite`` replaces them)."""


class OutputLockedError(GrokconvError, BlockingIOError):
    """Another live run is writing the same output."""
