"""One error hierarchy for the whole project; the CLI maps ``exit_code`` to the process exit status.

Messages follow one rule: say what is wrong and what to do about it, in one line.
Exit codes: 0 ok, 1 finished with warnings, 2 usage error, 3-99 errors (see docs/exit-codes.md).
"""

from __future__ import annotations


class IhbError(Exception):
    """Base class of every error the user may see."""

    exit_code = 3

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.__class__.__name__).strip())


class RepositoryNotFound(IhbError):
    """No repository exists at that location; create one with `ihb init`."""

    exit_code = 10


class RepositoryExists(IhbError):
    """A repository already exists at that location."""

    exit_code = 11


class WrongPassphrase(IhbError):
    """The passphrase does not unlock this repository's key; check IHB_PASSPHRASE or --passphrase-file."""

    exit_code = 12


class PassphraseRequired(IhbError):
    """This repository is encrypted; set IHB_PASSPHRASE, use --passphrase-file, or run on a terminal."""

    exit_code = 12


class UnsupportedFormat(IhbError):
    """The repository was written by a newer ihb; upgrade ihb to read it."""

    exit_code = 13


class RepositoryLocked(IhbError):
    """Another process holds the repository lock; wait for it to finish."""

    exit_code = 14


class SnapshotNotFound(IhbError):
    """No restore point matches that id; list them with `ihb snapshots`."""

    exit_code = 20


class PathNotFound(IhbError):
    """That path is not in the restore point; list it with `ihb ls`."""

    exit_code = 21


class NoSpace(IhbError):
    """The repository's disk is full; free space or prune old restore points, then retry."""

    exit_code = 30


class SourceError(IhbError):
    """A backup source cannot be read."""

    exit_code = 31


class RestoreTargetExists(IhbError):
    """The restore target already holds that file; pass --overwrite or choose an empty target."""

    exit_code = 40


class UnsafePath(IhbError):
    """A restore point holds a path that would escape the restore target; it was refused."""

    exit_code = 41


class InvalidArgument(IhbError):
    """An argument is not valid."""

    exit_code = 2


class IntegrityError(IhbError):
    """Stored data failed authentication or its digest; run `ihb check --read-data` to see what is affected."""

    exit_code = 90


class ChunkMissing(IntegrityError):
    """A chunk referenced by a restore point is missing from the repository."""

    exit_code = 91


class TicketRefused(IhbError):
    """This restore needs a valid restore ticket; ask for one with `ihb restore-request create`."""

    exit_code = 71


class RestoreRequestRefused(IhbError):
    """This restore request cannot be approved or denied by you now (see the message)."""

    exit_code = 72
