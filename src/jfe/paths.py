"""Where JFE keeps its cache, and the atomic writes every layer uses.

Guarantees (docs/reliability.md):

* :func:`atomic_write` writes a file under a temporary name and renames it into place: a kill at any instant
  leaves the old file or the new one, never a partial one.
* :func:`atomic_dir` builds a folder under a temporary name and swaps it into place. On Linux the swap is one
  ``renameat2(RENAME_EXCHANGE)``: the path always holds the old folder or the new one. Elsewhere it is two
  renames (old aside, new in); a kill between them leaves the old folder at ``.NAME.old``, which the next
  :func:`recover_dir` (every JFE loader and writer calls it) renames back.
* Temporaries carry their writer's pid (``.NAME.pid123.x8k2.tmp``): a later :func:`atomic_dir` of the same
  path removes those whose process is gone, and nothing else (file writes do not scan their folder: a
  dataset build writes thousands of files into one).
* :func:`check_out_dir` refuses to write over a folder that is not a JFE artefact of the same kind (unless the
  user says ``overwrite``), so ``--out`` pointed at a dataset never wipes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from jfe.errors import ConfigError


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once: os.umask can only be read by setting it, which must not race with other threads later
_UMASK = _process_umask()
# temporaries of killed writers from before names carried a pid are removed once they are this old
_LEGACY_TMP_AGE_S = 24 * 3600


def cache_dir() -> Path:
    """The cache root: ``$JFE_CACHE`` if set, else ``~/.cache/jfe``. Created on demand."""
    root = Path(os.environ.get("JFE_CACHE") or Path.home() / ".cache" / "jfe").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under this process's umask (0644 usually)."""
    return 0o666 & ~_UMASK


# ------------------------------------------------------------------------------------------ temporaries
def _tmp_prefix(name: str) -> str:
    return f".{name}.pid{os.getpid()}."


_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.pid(?P<pid>\d+)\.[^./]+\.tmp$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers of ``path`` left beside it; returns what was removed.

    Only JFE's own names for ``path`` are touched (``.NAME.pid<PID>.<x>.tmp`` whose process is gone, and
    pid-less ``.NAME.<x>.tmp`` of older versions once a day old); a live writer's temporaries stay.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    legacy = re.compile(r"^\." + re.escape(path.name) + r"\.[A-Za-z0-9_]{6,12}\.tmp$")
    for entry in path.parent.iterdir():
        match = _TMP_NAME.match(entry.name)
        if match and match["name"] == path.name:
            stale = not _alive(int(match["pid"]))
        elif legacy.match(entry.name):
            with contextlib.suppress(FileNotFoundError):
                stale = time.time() - entry.lstat().st_mtime > _LEGACY_TMP_AGE_S
        else:
            continue
        if stale:
            _remove(entry)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write to a temporary file beside ``path`` and rename it into place only on success.

    A crash or an exception leaves the old file (or no file) behind, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (or the one it replaces), so an
        # index or a report stays readable by the service or the group that read the old one
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else file_mode())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------ folders
@dataclass(frozen=True)
class ArtefactKind:
    """What a folder JFE writes is, and the files that identify one (any of them)."""

    what: str
    markers: tuple[str, ...]

    def holds(self, folder: Path) -> bool:
        return any((folder / marker).is_file() for marker in self.markers)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically (the benchmarks' and reports' result files)."""
    with atomic_write(path) as handle:
        handle.write(json.dumps(obj, indent=2, default=str) + "\n")


def check_out_dir(path: str | os.PathLike, kind: ArtefactKind, *, overwrite: bool = False,
                  option: str = "--out") -> None:
    """Refuse ``path`` as the place to write a ``kind`` folder unless it is absent, empty, a ``kind`` artefact
    already (JFE replaces its own), or ``overwrite`` is set; a file there is always refused.

    Called before any work, so a wrong ``--out`` costs nothing and never removes anything.
    """
    path = Path(path)
    recover_dir(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise ConfigError(f"{option} {path} exists and is not a folder; choose a new or empty folder for the "
                          f"{kind.what}")
    if overwrite or kind.holds(path) or not any(path.iterdir()):
        return
    raise ConfigError(f"{option} {path} exists and is not a {kind.what} (it holds none of "
                      f"{', '.join(kind.markers)}); JFE replaces only what it wrote, so choose a new or empty "
                      f"folder, or pass --overwrite to replace it and everything in it")


def check_writable_path(path: str | os.PathLike, *, folder: bool, option: str = "--out") -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder is wanted (or the
    reverse), or a parent path that runs through a file. Creating what is missing is left to the writer."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ConfigError(f"{option} {path} is a {'file' if folder else 'folder'}; give "
                          f"{'a folder' if folder else 'a file path'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
            break


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover_dir(path: str | os.PathLike) -> bool:
    """Finish an :func:`atomic_dir` swap that a kill interrupted between its two renames (where the platform
    has no atomic exchange): the previous folder, left at ``.NAME.old``, goes back to ``path``. True if so."""
    path = Path(path)
    old = _old_name(path)
    if not path.exists() and old.is_dir() and not old.is_symlink():
        with contextlib.suppress(FileNotFoundError, FileExistsError, OSError):
            os.rename(old, path)
            return True
    return False


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_RENAMEAT2 = _renameat2()


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``). False where the platform or
    the file system cannot, so the caller falls back; other failures raise OSError."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    if exchange(tmp, path):  # path now holds the new folder, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = _old_name(path)
    _remove(old)
    os.rename(path, old)  # a kill here leaves the old folder at .NAME.old: recover_dir puts it back
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: ArtefactKind | None = None, *,
               overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it into place as a whole.

    ``kind`` names what the folder is: an existing folder at ``path`` that is not one is refused
    (:func:`check_out_dir`) unless ``overwrite``. ``None`` is for JFE's own folders (caches, checkpoints).
    A kill at any instant leaves the old folder or the new one at ``path`` (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind is not None:
        check_out_dir(path, kind, overwrite=overwrite)  # recovers an interrupted swap first
    else:
        recover_dir(path)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path.name), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a plain mkdir would not
    try:
        yield tmp
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fix_modes(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Give files that a library wrote with mkstemp's 0600 (safetensors, torch) the mode a plain open()
    would, so every file of one artefact is readable alike."""
    for name in names:
        target = Path(folder) / name
        if target.is_file():
            os.chmod(target, file_mode())


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """A JSON file that must hold one object (``meta.json``, ``shards.json``, a manifest): every way it can be
    wrong (missing, unreadable, not UTF-8, malformed, not an object) is a DataError naming the file."""
    from jfe.errors import DataError

    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} is missing", path=str(path)) from None
    except OSError as exc:
        raise DataError(f"cannot read the {what} ({exc.strerror})", path=str(path)) from None
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"the {what} is not UTF-8 (bad byte at {exc.start})", path=str(path)) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed {what} ({exc.msg} at line {exc.lineno})", path=str(path)) from None
    except RecursionError:
        raise DataError(f"the {what} is nested too deeply", path=str(path)) from None
    if not isinstance(value, dict):
        raise DataError(f"the {what} must be a JSON object, got {type(value).__name__}", path=str(path))
    return value
