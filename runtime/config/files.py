"""Reading and writing the operator's files without hanging, exhausting or truncating.

A careless path (a FIFO named ``*.yaml``, a symlink to ``/dev/zero``) must give an
error, not block the agent's start or fill its memory; a file the CLI writes is
either the old one or the complete new one, never half of either.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

# Far above any persona, policy, fleet or seed file; a bound so that a file grown by
# mistake (or a symlink to a device) is refused instead of filling memory.
MAX_FILE_BYTES = 1 << 20


class UnreadableError(Exception):
    """A path that is not a file we can read; the message says why (without the path)."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "a special file"


def read_regular(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, else UnreadableError.

    Opened non-blocking, so a FIFO cannot block the open, and checked with fstat on
    the open descriptor, so the file checked is the file read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path) and not path.exists():
            raise UnreadableError(f"a symlink to {os.readlink(path)}, "
                                  "which does not exist") from None
        raise UnreadableError(f"cannot read: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnreadableError(f"not a regular file ({_kind(mode)})")
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(limit + 1)
        except OSError as exc:
            raise UnreadableError(f"cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise UnreadableError(f"larger than {limit // 1024} KiB, far more than this file "
                              "can ever need")
    return data


def read_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """``read_regular`` decoded as UTF-8."""
    data = read_regular(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableError(f"not UTF-8 text (byte {exc.start})") from None


class Staged:
    """A complete new version of a file, written and synced beside it, not yet in place.

    Staging first lets a command that changes two files find out that it cannot
    write the second before it changes the first. ``commit`` renames it into place
    (readers see the old file or the whole new one); ``discard`` removes it.
    """

    def __init__(self, path: Path, data: bytes, *, mode: int = 0o644) -> None:
        self.path = path
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                         dir=path.parent)
        self.temporary = Path(temporary)
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), mode)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            self.discard()
            raise

    def commit(self, *, replace: bool = True) -> None:
        """Put the new version in place; without ``replace``, FileExistsError if one is there."""
        try:
            if replace:
                os.replace(self.temporary, self.path)
            else:
                os.link(self.temporary, self.path)  # atomic, and fails if the name exists
        finally:
            self.discard()
        _fsync_directory(self.path.parent)

    def discard(self) -> None:
        self.temporary.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, replace: bool = True) -> None:
    """Write ``path`` whole or not at all; a failure leaves the old file as it was.

    OSError propagates (the caller words it for its user); without ``replace``,
    FileExistsError if ``path`` exists.
    """
    Staged(path, data, mode=mode).commit(replace=replace)


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
