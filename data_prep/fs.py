"""Filesystem helpers: output directories that appear whole or not at all, and only where nothing
the user keeps would be lost.

A command writes its output into a new or empty directory. Every directory it writes holds
OUTPUT_MARKER naming the command, so a later run of the same command may replace it (overwrite=True,
`--overwrite` on the command line); anything else that is not empty is refused. What a command reads
(inputs, tokenizer, model directories) never lies inside, equals or contains its output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_prep.errors import CometInputError

OUTPUT_MARKER = ".comet_ds-output.json"


class OutputDirectoryError(CometInputError):
    """An output directory that must not or cannot be written; the message says what to change."""


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies under it, symlinks resolved."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def _owner(directory: Path) -> str | None:
    """The command whose output `directory` is, from its marker; None for anything else."""
    try:
        return json.loads((directory / OUTPUT_MARKER).read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output(target: str | Path, command: str, *, overwrite: bool = False,
                 inputs: Iterable[str | Path] = ()) -> None:
    """Raise OutputDirectoryError unless `command` may write the directory `target`: it is outside
    every path in `inputs` and they are outside it, its location is writable, and it is new, empty
    or (with `overwrite`) an earlier output of `command`. Cheap: callers run it before any work."""
    target = Path(target)
    for path in inputs:
        holds, within = is_inside(path, target), is_inside(target, path)
        if holds or within:
            where = "is the same as" if holds and within else "would hold" if holds else "lies inside"
            raise OutputDirectoryError(f"the output {target} {where} {path}, which {command} reads: choose an "
                                       "output directory outside it")
    if target.exists() and not target.is_dir():
        raise OutputDirectoryError(f"{target} is a file: name a directory to write")
    location = target.absolute().parent
    while not location.exists():
        location = location.parent
    if not location.is_dir():
        raise OutputDirectoryError(f"{location} is a file, so {target} cannot be created: "
                                   "name a directory to write")
    if not os.access(location, os.W_OK | os.X_OK):
        raise OutputDirectoryError(f"cannot write in {location}: choose a writable place for {target}")
    if target.is_dir() and any(p.name != OUTPUT_MARKER for p in target.iterdir()):
        owner = _owner(target)
        if owner is None:
            raise OutputDirectoryError(f"{target} is not empty and was not written by {command}: "
                                       "choose a new or empty directory")
        if owner != command:
            raise OutputDirectoryError(f"{target} holds a {owner} output, not a {command} one: "
                                       "choose a new or empty directory")
        if not overwrite:
            raise OutputDirectoryError(f"{target} holds an earlier {command} output: pass --overwrite "
                                       "to replace it")


def check_output_file(target: str | Path, option: str, inputs: Iterable[str | Path] = ()) -> None:
    """Raise OutputDirectoryError unless the file `target` (given as `option`) can be written and is none
    of `inputs`: checked before the work whose result it holds, not after it."""
    target = Path(target)
    if target.is_dir():
        raise OutputDirectoryError(f"{option} {target} is a directory: name the file to write")
    for path in inputs:
        if target.exists() and target.resolve() == Path(path).resolve():
            raise OutputDirectoryError(f"{option} {target} is also an input of this command: name another file")
    parent = target.absolute().parent
    if parent.exists() and not parent.is_dir():
        raise OutputDirectoryError(f"{option} {target}: {parent} is a file, not a directory; name another place")
    if not parent.is_dir():
        raise OutputDirectoryError(f"{option} {target}: the directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirectoryError(f"{option} {target}: cannot write in {parent}; choose a writable place")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _mark(directory: Path, command: str) -> None:
    (directory / OUTPUT_MARKER).write_text(json.dumps({"command": command}) + "\n")


@contextlib.contextmanager
def output_directory(target: str | Path, command: str, *, overwrite: bool = False,
                     inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a scratch directory that becomes `target`, marked as `command`'s output, once the block
    finishes; check_output runs before the block and again just before the swap, so a long run never
    replaces a directory that appeared meanwhile."""
    inputs = list(inputs)
    check_output(target, command, overwrite=overwrite, inputs=inputs)
    with atomic_directory(target) as scratch:
        yield scratch
        _mark(scratch, command)
        check_output(target, command, overwrite=overwrite, inputs=inputs)


def claim_directory(target: str | Path, command: str, *, overwrite: bool = False,
                    inputs: Iterable[str | Path] = ()) -> Path:
    """Create and mark `target` for a command that writes files into it in place (not atomically),
    after the same checks as output_directory; its own earlier files are all it may replace."""
    target = Path(target)
    check_output(target, command, overwrite=overwrite, inputs=inputs)
    target.mkdir(parents=True, exist_ok=True)
    _mark(target, command)
    return target


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces `target` only once the block finishes.

    A crash inside the block leaves any previous `target` untouched (the scratch directory
    is removed); the swap itself is two renames on the same filesystem. Whether `target` may be
    replaced at all is the caller's question: output_directory asks it.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield scratch
        fsync_tree(scratch)
        retired = None
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
        os.replace(scratch, target)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under `root` to disk: call it before the rename that publishes `root`, or a crash
    soon after may leave the new name pointing at files whose contents never reached the disk."""
    for path in Path(root).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Inside the block SIGTERM raises KeyboardInterrupt as Ctrl-C does, so a command killed by `kill`,
    a job scheduler or a timeout unwinds through atomic_directory and leaves no scratch directory behind."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
