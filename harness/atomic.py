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
import os
import shutil
from pathlib import Path
from typing import Iterator


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
