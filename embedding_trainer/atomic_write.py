"""The project's one atomic file writer: readers never see a half-written file, and an existing file is replaced
only when asked."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import EmbeddingFileError


def write_atomically(path: Path, write: Callable[[IO[bytes]], None], overwrite: bool) -> None:
    """Write via a temporary file in the target folder, so readers never see a half-written file.

    ``write`` receives the open temporary file; an existing ``path`` is replaced only when ``overwrite``.

    The temporary name ends in ``.tmp``, which the WebUI's embedding scanner ignores.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
        _fsync_dir(path.parent)
    finally:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def already_exists_error(path: Path) -> EmbeddingFileError:
    """The error for a target that exists while replacing it was not allowed."""
    return EmbeddingFileError(
        f"{path}: file already exists; choose another name or allow replacing it (--overwrite; overwrite in the API)"
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _place_new(tmp: Path, path: Path) -> None:
    # A hard link fails if the target appeared meanwhile, unlike os.replace; fall back where links are unsupported.
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        raise already_exists_error(path) from None
    except (OSError, NotImplementedError):
        pass
    if path.exists():
        raise already_exists_error(path)
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename durable on POSIX; folders cannot be opened this way on Windows.
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
