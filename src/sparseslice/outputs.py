"""Output folders a command owns: it deletes or overwrites only what it wrote itself.

Every command that writes a folder (``simulate``, ``interpolate``, ``predict``, ``synth``)
claims it with :func:`claim_output` before touching anything:

- an output that is, contains or lies inside one of the command's inputs (symbolic links
  resolved, so a linked image counts where its original lies) is refused;
- a folder that is not empty and holds no :data:`MARKER` written by the same command is
  refused (another command's output, a dataset, a home folder...);
- otherwise the marker is (re)written. Each file is registered in it *before* it is written
  (:meth:`OutputFolder.path`), so even an interrupted run leaves a complete list of what it
  may have written, and a rerun deletes (:meth:`OutputFolder.clear`) or overwrites only those.

The lock file of a folder a command locks while it writes (:data:`sparseslice.locking.LOCK_FILE`,
e.g. a training run folder) is the command's own: it does not make the folder "not empty".

Single files (``plan -o plan.json``, ``evaluate -o metrics.csv``) follow the same rule through
:func:`check_file_output`: an output file that is a folder, an input, or a file the command
does not recognise as its own earlier result is refused before anything is computed.

Nothing depends on file permissions: root gets no exception.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from sparseslice.atomic import write_json
from sparseslice.errors import UserError
from sparseslice.locking import LOCK_FILE

MARKER = ".sparseslice-output.json"
if TYPE_CHECKING:
    from sparseslice.datasets import Dataset

FIX = "choose an empty or new folder"


@dataclass
class OutputFolder:
    """A folder claimed by ``command``; ``files`` are the paths (relative, POSIX) it wrote there."""

    root: Path
    command: str
    argument: str = "--out"
    files: list[str] = field(default_factory=list)

    def path(self, relative: str | os.PathLike[str]) -> Path:
        """Register ``relative`` as this command's output and return its full path.

        A file already there that the command did not write is refused.
        """
        rel = PurePosixPath(Path(relative).as_posix())
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"output path must be relative and inside the folder, got {str(relative)!r}")
        name = str(rel)
        target = self.root / rel
        if name not in self.files:
            if os.path.lexists(target):
                raise UserError(f"{self.argument} {str(self.root)!r} holds {name!r}, which {self.command} did not "
                                f"write; {FIX}")
            self.files.append(name)
            self._save()
        return target

    def clear(self) -> None:
        """Delete every file this command wrote here (links, not their targets) and its emptied folders."""
        folders = set()
        for name in reversed(self.files):
            target = self.root / name
            if os.path.lexists(target) and not (target.is_dir() and not target.is_symlink()):
                target.unlink()
            folders.update(p for p in (self.root / name).parents if p != self.root and self.root in p.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
        self.files = []
        self._save()

    def forget_if_unused(self) -> None:
        """Remove the marker when none of the files it lists exists (a run that failed before writing).

        The folder is then as the claim found it (or empty, for a caller to remove when it made it).
        """
        if not any(os.path.lexists(self.root / name) for name in self.files):
            (self.root / MARKER).unlink(missing_ok=True)

    def _save(self) -> None:
        write_json(self.root / MARKER, {"command": self.command, "files": self.files})


def claim_output(out: str | os.PathLike[str], *, command: str, inputs: Iterable[str | os.PathLike[str]] = (),
                 argument: str = "--out", exclusive: bool = False) -> OutputFolder:
    """Claim ``out`` for ``command``, or refuse before anything is touched.

    Parameters
    ----------
    out : path
        Output folder: new, empty, or an earlier output of ``command`` (holding its marker).
    command : str
        The command's name, recorded in the marker.
    inputs : iterable of path
        Everything the command reads (folders and files); see :func:`check_apart`.
    argument : str
        How the user named ``out`` (for messages).
    exclusive : bool
        Also refuse an earlier output of ``command`` that holds other files beside its own
        (for commands that replace their earlier output as a whole).

    Returns
    -------
    OutputFolder
        With the files an earlier run of ``command`` recorded.
    """
    out = Path(out)
    check_apart(out, inputs, argument=argument)
    if out.exists() and not out.is_dir():
        raise UserError(f"{argument} {str(out)!r} is a file; pass a folder ({FIX})")
    files: list[str] = []
    if out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        record = _read_marker(out)
        if record is None:
            raise UserError(f"{argument} {str(out)!r} is not empty and was not written by sparseslice {command}; "
                            f"{FIX}")
        if record.get("command") != command:
            raise UserError(f"{argument} {str(out)!r} holds the output of sparseslice {record.get('command')}, not "
                            f"{command}; {FIX}")
        files = [str(f) for f in record.get("files", [])]
        if exclusive:
            ours = {MARKER, LOCK_FILE} | {PurePosixPath(f).parts[0] for f in files}
            foreign = sorted(p.name for p in out.iterdir() if p.name not in ours)
            if foreign:
                raise UserError(f"{argument} {str(out)!r} holds files {command} did not write, got {foreign[:3]}; "
                                f"{FIX}")
    out.mkdir(parents=True, exist_ok=True)
    folder = OutputFolder(out, command, argument, files)
    folder._save()
    return folder


def check_apart(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], *,
                argument: str = "--out", fix: str = FIX) -> None:
    """Refuse an output that is, contains or lies inside an input (paths resolved, links followed);
    ``fix`` (what to choose instead) ends the message with "outside the inputs"."""
    target = Path(out).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            how = "is"
        elif source.is_relative_to(target):
            how = "holds"
        elif source.is_dir() and target.is_relative_to(source):
            how = "lies inside"
        else:
            continue
        shown = f"{str(given)!r}" + ("" if Path(given).absolute() == source else f" ({source})")
        raise UserError(f"{argument} {str(out)!r} {how} the input {shown}; {fix} outside the inputs")


def check_file_output(paths: Sequence[str | os.PathLike[str]], *, command: str, ours: Callable[[Path], bool],
                      inputs: Iterable[str | os.PathLike[str]] = (), argument: str = "--out",
                      given: str | os.PathLike[str] | None = None) -> None:
    """Refuse single output files before anything is computed (the rule :func:`claim_output` is for folders).

    Parameters
    ----------
    paths : sequence of path
        Every file the command will write (``plan.json`` and ``plan.csv``...).
    command : str
        The command's name, for messages.
    ours : callable
        ``ours(path)`` tells whether an existing file is an earlier result of ``command`` (which
        it may replace); anything else is refused.
    inputs : iterable of path
        Everything the command reads (see :func:`check_apart`).
    argument : str
        How the user named the output (for messages).
    given : path, optional
        The path as the user gave it, when ``paths`` are derived from it (same stem...).

    Raises
    ------
    UserError
        A path is a folder, is, holds or lies inside an input, or would overwrite a file that
        is not an earlier result of ``command``.
    """
    inputs = list(inputs)
    for path in map(Path, paths):
        shown = str(given if given is not None else path)
        where = "" if given is None or Path(given) == path else f" ({str(path)!r})"
        if path.is_dir():
            raise UserError(f"cannot write {argument} {shown!r}: Is a directory{where}; it is a folder where a file "
                            "is expected: pass a file name")
        check_apart(path, inputs, argument=argument, fix="choose a file name")
        if os.path.lexists(path) and not _recognised(ours, path):
            raise UserError(f"{argument} {shown!r} would overwrite {str(path)!r}, which is not a result of "
                            f"sparseslice {command}; pass another {argument} or move that file")


def _recognised(ours: Callable[[Path], bool], path: Path) -> bool:
    try:
        return bool(ours(path))
    except (OSError, UnicodeDecodeError, ValueError, UserError):
        return False


def first_line_is(path: Path, line: str) -> bool:
    """Whether the text file ``path`` starts with the line ``line`` (a CSV's header)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return fh.readline().rstrip("\r\n") == line


def json_object_with(path: Path, keys: Iterable[str]) -> bool:
    """Whether ``path`` holds a JSON object with every one of ``keys``."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    return isinstance(record, dict) and set(keys) <= set(record)


def dataset_inputs(dataset: Dataset) -> list[Path]:
    """A dataset's root and every image and label file of its cases (for :func:`check_apart`)."""
    paths = [Path(dataset.root)]
    for case in dataset.cases:
        paths.extend(Path(p) for p in case.images)
        if case.label is not None:
            paths.append(Path(case.label))
    return paths


def _read_marker(out: Path) -> dict | None:
    path = out / MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None
