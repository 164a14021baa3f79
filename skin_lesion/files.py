"""Files that appear whole or not at all: atomic writes of folders, text, JSON and CSV; checked CSV reads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from skin_lesion.errors import PipelineError


def _read_umask() -> int:
    # The umask can only be read by setting it; set it back at once. Read once, at import, not from
    # threads that write files.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # outputs get the permissions the user's umask gives new files


def repo_root() -> Path:
    """The repository that owns this run; DVC points DVC_ROOT at it even for queued experiments."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def in_main_repo(path: Path) -> Path:
    """`path` in the real repository: caches live there, not in a queued experiment's throw-away copy."""
    return repo_root() / path


@contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `final` and move it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    # A killed earlier run may have left its temp folder behind; it was never in place, so drop it.
    for stale in final.parent.glob(prefix + "*"):
        shutil.rmtree(stale)
    restore_interrupted_swap(final)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o777 & ~UMASK)  # mkdtemp's folder is private (0700); the output is not
    _replace_path(tmp, final)


@contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`, moved onto it only if the block succeeds.

    `suffix` ends the temp name, for writers that insist on an extension (Keras's `.keras`, numpy's `.npy`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~UMASK)  # mkstemp's file is private (0600); the output is not
        os.replace(tmp, path)  # fails when `path` is a folder: the temp must not stay behind then either
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temp name so that readers never see half of it."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv_atomic(path: Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV without its index, atomically."""
    write_text_atomic(path, frame.to_csv(index=False, lineterminator="\n"))


def read_table(path: Path, columns: Sequence[str], what: str, hint: str = "") -> pd.DataFrame:
    """A CSV as text (empty cells stay ""), checked to have `columns`; errors name `what` and the file.

    `what` says what the file is: a parameter (`download.local.metadata: <path>`) or a kind of file.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what}: {path} not found{hint}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PipelineError(f"{what}: {path} is not UTF-8 text; save it as a UTF-8 CSV") from err
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise PipelineError(f"{what}: {path} has no column(s) {', '.join(missing)}")
    return frame


def read_manifest(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """A manifest another stage wrote, checked to have the given columns."""
    return read_table(path, columns, what="manifest", hint=" (run the stage that writes it first)")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def restore_interrupted_swap(final: Path) -> None:
    """Put the previous output back if a kill fell between moving it aside and moving the new one in."""
    for trash in sorted(final.parent.glob(f".{final.name}.old-*")):
        if not final.exists() and (trash / final.name).exists():
            os.replace(trash / final.name, final)
        shutil.rmtree(trash)


def _replace_path(new: Path, final: Path) -> None:
    # Move the old output aside first so that `final` is either the old or the new one, never a mix.
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, trash / final.name)
        os.replace(new, final)
        shutil.rmtree(trash)
    else:
        os.replace(new, final)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs here: its temp files and MLflow runs are not yet stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def extract_zip_safely(
    archive_path: Path,
    dest: Path,
    max_bytes: int,
    param: str = "download.local.path",
    limit_param: str | None = "download.local.max_extract_mb",
) -> None:
    """Extract a zip after refusing absolute paths, '..', links and oversized contents.

    Errors name the parameter that pointed at the zip (`param`) and the one that sets the limit
    (`limit_param`; None for a fixed limit).
    """
    try:
        archive = zipfile.ZipFile(archive_path)
    except zipfile.BadZipFile as err:
        raise PipelineError(f"{param}: {archive_path} is not a valid zip ({err})") from err
    with archive:
        total = 0
        for entry in archive.infolist():
            name = PurePosixPath(entry.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or ":" in entry.filename:
                raise PipelineError(f"{param}: {archive_path} has unsafe entry {entry.filename!r}")
            if stat.S_ISLNK(entry.external_attr >> 16):
                raise PipelineError(f"{param}: {archive_path} has symbolic link {entry.filename!r}")
            total += entry.file_size
            if total > max_bytes:
                mib = max_bytes // 2**20
                limit = f"{limit_param}={mib}" if limit_param else f"the limit of {mib}"
                raise PipelineError(f"{param}: {archive_path} unpacks to more than {limit} MiB")
        for entry in archive.infolist():
            try:
                archive.extract(entry, dest)
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                # A bad CRC, or a header that understates a member's size, shows only while reading it.
                raise PipelineError(
                    f"{param}: {archive_path}: member {entry.filename!r} is damaged ({err})"
                ) from err
