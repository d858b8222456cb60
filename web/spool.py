"""
Files that receive a request body while it arrives.

A L{Spool} writes chunks to a file (a new temp file, or the end of a partial
upload kept between requests), hashing them as they pass, so the md5 of a
multi-gigabyte upload is known the moment its last byte lands and nothing is
ever held in memory. This module does no network I/O and does not import
Twisted.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any


class Spool:
    """
    A file being written: its path, size so far and running md5.

    @ivar path: the file.
    @ivar size: bytes in the file.
    @ivar closed: no more writes are accepted.
    """

    def __init__(self, path: str, fd: int, size: int = 0, digest: Any = None) -> None:
        """
        Use L{Spool.create} or L{Spool.append} rather than this.

        @param path: the file's path.
        @param fd: a descriptor open for writing at the end of the file.
        @param size: bytes already in the file.
        @param digest: a C{hashlib.md5} object fed with those bytes;
            C{None} starts a new one, C{False} disables hashing.
        """
        self.path = path
        self.size = size
        self.closed = False
        self._fd: int | None = fd
        self._md5 = hashlib.md5() if digest is None else (digest or None)

    @classmethod
    def create(cls, directory: str, prefix: str = "upload-") -> "Spool":
        """
        A new, empty temp file in C{directory}, mode 0644 like every file
        the store writes (it becomes an attachment by hard link).
        """
        fd, path = tempfile.mkstemp(prefix=prefix, dir=directory)
        try:
            os.fchmod(fd, 0o644)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return cls(path, fd)

    @classmethod
    def append(cls, path: str, size: int, digest: Any = None) -> "Spool":
        """
        Continue the file C{path} (created, with its directory, if missing)
        after its first C{size} bytes; anything beyond them is cut off.

        @param digest: a C{hashlib.md5} object fed with those C{size} bytes,
            if the caller has one; without it the spool does not hash
            (L{md5} is C{None}) and the caller hashes the finished file.
        """
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            os.lseek(fd, size, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, digest if digest is not None else False)

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the file and the md5.
        """
        if self._fd is None:
            raise ValueError("write to a closed spool")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if self._md5 is not None:
            self._md5.update(data)
        self.size += len(data)

    def md5(self) -> str | None:
        """
        The lowercase hex md5 of everything in the file so far (C{None} if
        this spool does not hash).
        """
        return None if self._md5 is None else self._md5.hexdigest()

    def digest(self) -> Any:
        """
        A copy of the running md5 object, to continue it later (C{None} if
        this spool does not hash).
        """
        return None if self._md5 is None else self._md5.copy()

    def close(self) -> None:
        """
        Close the descriptor; the file stays.
        """
        self.closed = True
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def discard(self) -> None:
        """
        Close and remove the file. Idempotent.
        """
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

