"""Opening files named by a checkpoint, and creating files in an output directory, safely.

Reading (a source checkpoint, a prepared directory): names taken from an index or a manifest must
be plain file names inside the directory (`check_plain_name`: no separators, no `..`, no glob
characters, which also keeps them out of download patterns); a file is opened only if it is a
regular file (`open_regular`: a FIFO or device would block or never end; the open itself is
non-blocking so a FIFO cannot hang it). Symlinks in a *source* are followed (the Hugging Face
cache is made of them); a loop is an error.

Writing (an output directory): a file is created with O_CREAT | O_EXCL | O_NOFOLLOW
(`create_new`), so a symlink planted at its name is refused, never followed; a stale regular file
of ours (a `.partial` left by a killed run) is removed first. `refuse_symlinks` rejects an output
directory holding any symlink, and `DirectoryLock` keeps two writers out of one directory
(flock on the directory: released by the kernel when the holder dies, so a SIGKILL never leaves
it stuck).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import stat
import time

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def check_plain_name(name, error: type[Exception], where: str) -> str:
    """`name` if it is a plain file name (letters, digits, `._+-`, not starting with `.` or `-`,
    no `..`); else `error` naming `where` and the name."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise error(f"{where}: file name {name!r} is not a plain file name inside the directory "
                    "(path separators, '..', leading dots and glob characters are refused)")
    return name


def _describe(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def os_error_text(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symlink loop (or a symlink where none is allowed)"
    return err.strerror or str(err)


def open_regular(path: str, error: type[Exception], what: str = "file", mode: str = "rb"):
    """Open `path` for reading if it is a regular file (symlinks followed); otherwise raise `error`
    naming the path: missing, a directory, a FIFO, a device, a symlink loop, unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as err:
        raise error(f"{path}: cannot open the {what} ({os_error_text(err)})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise error(f"{path}: the {what} is {_describe(info.st_mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode)


def regular_file_size(path: str, error: type[Exception], what: str = "file") -> int:
    with open_regular(path, error, what) as f:
        return os.fstat(f.fileno()).st_size


def create_new(path: str, error: type[Exception], mode: str = "wb"):
    """Create `path` for writing, never through a symlink: an existing regular file there (a stale
    partial of ours) is replaced; a symlink or anything else is refused with `error`."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            kind = "a symlink" if stat.S_ISLNK(info.st_mode) else _describe(info.st_mode)
            raise error(f"{path}: is {kind}; refusing to write through it (remove it, or choose "
                        "another output directory)")
        os.remove(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise error(f"{path}: cannot create ({os_error_text(err)}); another process may be writing "
                    "this directory") from None
    return os.fdopen(fd, mode)


def refuse_symlinks(directory: str, error: type[Exception]) -> None:
    """Raise `error` if `directory` holds a symlink (an output directory never should)."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_symlink():
                raise error(f"{entry.path}: is a symlink (to {os.readlink(entry.path)!r}); an output "
                            "directory must hold only its own files: remove it")


class DirectoryLock:
    """An exclusive lock on a directory, naming its holder to whoever is refused.

    The lock is a flock on the directory itself (released by the kernel when the holder exits or
    is killed); the holder's description sits in `<dir>/.lock` while it is held."""
    NAME = ".lock"

    def __init__(self, directory: str, error: type[Exception], purpose: str):
        self.directory = directory
        self.info_path = os.path.join(directory, self.NAME)
        self.error = error
        self.purpose = purpose
        self._fd = None

    def __enter__(self):
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                with open_regular(self.info_path, self.error, "lock file", "r") as f:
                    holder = f.read(512).strip()
            except self.error:
                holder = ""
            raise self.error(f"{self.directory}: locked by {holder or 'another process'}; wait for it to "
                             "finish (a killed holder releases the lock)") from None
        self._fd = fd
        try:
            with create_new(self.info_path, self.error, "w") as f:
                f.write(f"pid {os.getpid()} on {socket.gethostname()} ({self.purpose}, since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        except BaseException:
            self._release()
            raise
        return self

    def _release(self) -> None:
        os.close(self._fd)      # closing releases the flock
        self._fd = None

    def __exit__(self, *exc):
        try:
            os.remove(self.info_path)
        except FileNotFoundError:
            pass
        self._release()
        return False
