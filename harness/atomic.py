"""Atomic writes: a file or directory appears complete under its name, or not at all.

    with atomic_file(path) as tmp:    # write tmp; renamed to path when the block succeeds
        tmp.write_text(...)
    with atomic_dir(path) as tmp:     # fill the directory tmp; it replaces path on success
        ...

The temporary sibling is `.<name>.tmp-<pid>`, so two processes never share one, and a crash
leaves only a dot-file that readers ignore and the next write removes. A directory that
replaces an older one is swapped through `.<name>.old`, so readers see the old or the new,
never a mixture. Every writer in the harness goes through these two.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from harness.errors import HarnessError


def temporary_sibling(path: Path, tag: str | None = None) -> Path:
    """`.<name>.tmp-<tag>` beside `path`; the tag defaults to this process id."""
    return path.parent / f".{path.name}.tmp-{os.getpid() if tag is None else tag}"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, tag: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; publish it as `path` on success.

    `tag` names the temporary directory when several processes fill it together (the ranks of
    one launch pass the same tag); by default it is this process id."""
    path = Path(path)
    tmp = temporary_sibling(path, tag)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory into place, replacing an older one."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- outputs that keep their inputs

class OutputError(HarnessError, ValueError):
    """An output that would write over an input, or that cannot be written; checked before any work."""


def check_output(flag: str, output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]], *,
                 is_file: bool = True) -> None:
    """Refuse, before any work: a file output (`is_file`) that is a folder; an output that would
    destroy or change an input: the same path, a path inside an input folder, or a folder (replaced
    whole) that holds an input, compared as resolved paths (links, "..", "~"), the files of folders
    and globs included; and an output whose folder cannot be written (probed: root passes any
    permission test, not a read-only file system).
    `inputs` are (flag, value) pairs; None, "" and hub ids are skipped, as are names of nothing local."""
    if is_file and Path(output).expanduser().is_dir():
        raise OutputError(f"{flag} {output} is a folder: give a file name, e.g. {Path(output) / 'results.json'}")
    written = Path(output).expanduser().resolve()
    for input_flag, value in inputs:
        if _matched_by_glob(written, value):
            raise OutputError(f"{flag} {output} matches the input {input_flag} {value}: the next run would read "
                              f"it as input; choose a {flag} the pattern does not match")
        for path in _input_paths(value):
            if written.is_relative_to(path) or path.is_relative_to(written):
                raise OutputError(f"{flag} {output} would overwrite the input {input_flag} {value} "
                                  f"({_overlap(written, path)}): choose a {flag} outside every input")
    _check_writable(flag, Path(output).expanduser())


def _input_paths(value) -> list[Path]:
    """Resolved paths an input names: itself where it exists, and every file of a folder or glob."""
    if not value or str(value).startswith("hub:"):  # "" would be the working directory
        return []
    from harness.fingerprint import data_files  # the one rule for what a data path names

    given = Path(value).expanduser()
    return [path.resolve() for path in ([given] if given.exists() else []) + data_files(str(value))]


def _matched_by_glob(written: Path, value) -> bool:
    """Whether an input given as a glob ("data/a*.jsonl") names the output too, existing or not."""
    text = str(value or "")
    if not any(char in text for char in "*?["):
        return False
    pattern = Path(text).expanduser()
    return fnmatch.fnmatch(str(written), str(pattern.parent.resolve() / pattern.name))


def _overlap(written: Path, path: Path) -> str:
    if written == path:
        return "the same file" if path.is_file() else "the same folder"
    return "it lies inside that folder" if written.is_relative_to(path) else "it holds that input"


def _check_writable(flag: str, path: Path) -> None:
    """Something can be created in the output's folder, or in the nearest existing one above it (the
    writers make the missing folders)."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    probe = temporary_sibling(folder / path.name, "probe")
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise OutputError(f"{flag} {path}: cannot write in {folder} ({error.strerror or error}): choose a "
                          f"writable place") from None
