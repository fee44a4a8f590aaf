"""What the folder datasets (``image_folder``, ``audio_folder``) share: a folder of files,
labelled by subfolder and captioned by ``metadata.jsonl`` or ``NAME.txt`` files.

A dataset built on :class:`FolderDataset` names its file extensions and says how to load one
file; the root checks, file discovery, labels, captions, bad-file screening, indexing and
error messages are the same for every one of them.
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from unfog.errors import ConfigError, DataError
from unfog_datasets._common import check_choice, check_index, readable_files

Captions = Literal["auto", "optional", "none"]
CAPTION_MODES: tuple[str, ...] = ("auto", "optional", "none")
METADATA = "metadata.jsonl"
SIDECAR = ".txt"
SHOW_MISSING = 5  # files without a caption named in the error; the rest are counted
METADATA_FORM = (
    'Each line must be one JSON object such as {"file_name": "a.png", "text": "a red circle"}, '
    f"with file_name relative to the folder that holds {METADATA}."
)


class Listing(NamedTuple):
    """What one walk over a folder found."""

    files: list[Path]  # the data files, sorted
    sidecars: set[Path]  # every .txt file
    metadata: list[Path]  # every metadata.jsonl, sorted


def walk_folder(root: Path, extensions: Sequence[str]) -> Listing:
    """The data files (by extension, any letter case), ``.txt`` files and ``metadata.jsonl``
    files under ``root``, recursively; hidden files and folders (names starting with ``.``,
    such as macOS ``._x.jpg`` files or ``.ipynb_checkpoints``) are left out."""
    files: list[Path] = []
    sidecars: set[Path] = set()
    metadata: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if os.path.splitext(name)[1].lower() in extensions:
                files.append(path)
            elif name == METADATA:
                metadata.append(path)
            elif name.endswith(SIDECAR):
                sidecars.add(path)
    return Listing(sorted(files), sidecars, sorted(metadata))


def check_root(owner: str, root: Any, what: str) -> Path:
    """``root`` as a path to an existing folder: ConfigError when it is not a path, DataError
    when it does not exist or is a file."""
    if not isinstance(root, (str, os.PathLike)) or not str(root):
        raise ConfigError(
            f"{owner}: dataset.root must be the path of a folder of {what} files; got {root!r}. "
            "Set dataset.root=/path/to/folder."
        )
    path = Path(root).expanduser()
    named = f"dataset.root {str(path)!r}" + (f" (given as {str(root)!r})" if str(path) != str(root) else "")
    if not path.exists():
        raise DataError(f"{owner}: {named} does not exist. Set dataset.root to a folder that holds {what} files.")
    if not path.is_dir():
        raise DataError(
            f"{owner}: {named} is a file, not a folder. Set dataset.root to the folder that holds the {what} files."
        )
    return path


def no_files_error(owner: str, root: Path, what: str, extensions: Sequence[str]) -> DataError:
    """The error for a folder without a single data file."""
    return DataError(
        f"{owner}: no {what} files found under dataset.root {str(root)!r} (searched recursively for "
        f"{', '.join(extensions)}, any letter case; hidden files skipped). Put {what} files there or set "
        "dataset.root to the folder that holds them."
    )


def subfolder_labels(root: Path, files: Sequence[Path]) -> tuple[list[int] | None, tuple[str, ...] | None]:
    """Class ids and sorted class names from the immediate subfolders of ``root``, or
    ``(None, None)`` when any file lies directly in ``root``."""
    parts = [f.relative_to(root).parts for f in files]
    if not all(len(p) > 1 for p in parts):
        return None, None
    names = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(names)}
    return [index[p[0]] for p in parts], tuple(names)


# ------------------------------------------------------------------------------------ captions


def caption_table(owner: str, listing: Listing, mode: str, what: str) -> dict[Path, str] | None:
    """Each captioned data file's caption (a line of a ``metadata.jsonl`` wins over a
    ``NAME.txt``), or None when ``mode`` is ``"none"`` or the folder has neither kind."""
    if mode == "none":
        return None
    table = sidecar_captions(owner, listing)
    table.update(metadata_captions(owner, listing, what))
    return table if table or listing.metadata else None


def sidecar_captions(owner: str, listing: Listing) -> dict[Path, str]:
    """The contents (stripped) of ``NAME.txt`` beside each data file ``NAME.EXT`` that has one."""
    table: dict[Path, str] = {}
    for f in listing.files:
        text = f.with_suffix(SIDECAR)
        if text in listing.sidecars:
            table[f] = read_text(owner, text).strip()
    return table


def read_text(owner: str, path: Path) -> str:
    """A UTF-8 text file's contents, or a DataError naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{owner}: cannot read the caption file {str(path)!r} ({type(exc).__name__}: {exc}). "
            "Captions must be UTF-8 text; fix the file or set dataset.captions=none to ignore captions."
        ) from exc


def metadata_captions(owner: str, listing: Listing, what: str) -> dict[Path, str]:
    """Captions from every ``metadata.jsonl``, keyed by the data file each line names."""
    known = {os.path.abspath(f): f for f in listing.files}
    table: dict[Path, str] = {}
    where: dict[Path, str] = {}
    for meta in listing.metadata:
        for number, name, text in read_metadata(owner, meta):
            here = f"{str(meta)!r} line {number}"
            target = known.get(os.path.abspath(meta.parent / name))
            if target is None:
                raise DataError(f"{owner}: {here} names {name!r}, {_not_a_data_file(meta.parent / name, what)}")
            if target in where:
                raise DataError(
                    f"{owner}: {here} captions {name!r} again (first at {where[target]}); keep one line per file."
                )
            table[target], where[target] = text, here
    return table


def _not_a_data_file(path: Path, what: str) -> str:
    """Why a metadata line's file is not one of the dataset's files, and what to do."""
    if not path.exists():
        return (
            f"which does not exist ({str(path)!r}). file_name is relative to the folder that holds "
            f"{METADATA}; fix the line or remove it."
        )
    return (
        f"which is not one of the {what} files of the dataset (they lie under dataset.root, have a {what} file "
        "extension and are not hidden); fix the line or remove it."
    )


def read_metadata(owner: str, path: Path) -> list[tuple[int, str, str]]:
    """(line number, file_name, text) of each non-blank line of one ``metadata.jsonl``."""
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # not splitlines: JSON strings may hold U+2028
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{owner}: cannot read {str(path)!r} ({type(exc).__name__}: {exc}). It must be UTF-8 text; "
            "fix it or set dataset.captions=none to ignore captions."
        ) from exc
    return [(n, *metadata_entry(f"{owner}: {str(path)!r} line {n}", line))
            for n, line in enumerate(lines, 1) if line.strip()]


def metadata_entry(where: str, line: str) -> tuple[str, str]:
    """``file_name`` and ``text`` of one ``metadata.jsonl`` line; ``where`` names it in errors."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not valid JSON ({exc.msg} at column {exc.colno}). {METADATA_FORM}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds {reprlib.repr(obj)}, not a JSON object. {METADATA_FORM}")
    missing = [key for key in ("file_name", "text") if key not in obj]
    if missing:
        has = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(f"{where} has no {' and no '.join(map(repr, missing))} key (its keys: {has}). {METADATA_FORM}")
    name, text = obj["file_name"], obj["text"]
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: file_name must be a non-empty string; got {name!r}. {METADATA_FORM}")
    if not isinstance(text, str):
        raise DataError(f"{where}: text must be a string (the caption; \"\" for none); got {reprlib.repr(text)}.")
    return name, text


def assign_captions(owner: str, root: Path, files: Sequence[Path], table: dict[Path, str], mode: str,
                    what: str) -> list[str]:
    """One caption per file: ``""`` for files without one with ``mode`` ``"optional"``, else
    a DataError naming the first few of them."""
    missing = [f for f in files if f not in table]
    if missing and mode != "optional":
        names = ", ".join(repr(str(f.relative_to(root))) for f in missing[:SHOW_MISSING])
        more = f" and {len(missing) - SHOW_MISSING} more" if len(missing) > SHOW_MISSING else ""
        raise DataError(
            f"{owner}: {len(missing)} of {len(files)} {what} files under {str(root)!r} have no caption: {names}{more}. "
            f"The folder has captions ({METADATA} or NAME{SIDECAR} beside NAME.EXT), so each file needs one: add "
            "them, or set dataset.captions=optional to give those files the empty caption '' "
            "(dataset.captions=none ignores all captions)."
        )
    return [table.get(f, "") for f in files]


# ---------------------------------------------------------------------------------- the dataset


class FolderDataset(Dataset):
    """Every file with one of ``extensions`` under ``root`` (searched recursively), one item each.

    Items are dicts with ``x`` (what :meth:`load` returns), ``label`` when every file lies in
    a subfolder of ``root`` (the sorted immediate subfolder names are the classes 0..K-1) and
    ``caption`` (a str) when the folder has captions: lines ``{"file_name": ..., "text": ...}``
    of a ``metadata.jsonl`` (file_name relative to its folder) or a ``NAME.txt`` beside
    ``NAME.EXT``, the metadata line winning where both exist. ``captions``: ``"auto"`` uses
    them when there are any and refuses files without one, ``"optional"`` gives those files
    ``""``, ``"none"`` ignores captions.

    A subclass sets ``name`` (its registry key), ``what`` (``"image"``), ``extensions``,
    ``data_shape`` and ``data_range``, implements :meth:`load` (and :meth:`check` where a
    cheaper test of a file exists), and sets its own settings before calling ``__init__``,
    which may already load files (``skip_bad_files``).
    """

    name: ClassVar[str] = "folder"
    what: ClassVar[str] = "data"
    extensions: ClassVar[tuple[str, ...]] = ()
    data_shape: tuple[int, ...]
    data_range: tuple[float, float] | None

    def __init__(self, root: str, *, skip_bad_files: bool = False, captions: Captions = "auto") -> None:
        check_choice(self.name, "captions", captions, CAPTION_MODES)
        path = check_root(self.name, root, self.what)
        listing = walk_folder(path, self.extensions)
        if not listing.files:
            raise no_files_error(self.name, path, self.what, self.extensions)
        table = caption_table(self.name, listing, captions, self.what)
        self.root = str(path)
        self.skip_bad_files = skip_bad_files
        self.caption_mode = captions
        self.skipped: list[str] = []
        files = listing.files
        if skip_bad_files:
            files = readable_files(self.name, files, self.root, self.what, self.check, self.skipped)
        self.files: list[str] = [str(f) for f in files]
        self.labels, self.class_names = subfolder_labels(path, files)
        self.num_classes: int | None = None if self.class_names is None else len(self.class_names)
        self.captions: list[str] | None = (
            None if table is None else assign_captions(self.name, path, files, table, captions, self.what))
        self.fields: tuple[str, ...] = self._fields()

    def _fields(self) -> tuple[str, ...]:
        fields = ["x"]
        if self.labels is not None:
            fields.append("label")
        if self.captions is not None:
            fields.append("caption")
        return tuple(fields)

    def load(self, path: str, index: int) -> Tensor:
        """The sample of item ``index``, read from ``path``; raises whatever the decoder raises."""
        raise NotImplementedError(f"{type(self).__name__} must say how to load one file")

    def check(self, path: Path) -> None:
        """Raise when ``path`` cannot be read (used by ``skip_bad_files``)."""
        self.load(str(path), 0)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(self.name, index, len(self.files))
        item: dict[str, Any] = {"x": self._read(i)}
        if self.labels is not None:
            item["label"] = torch.tensor(self.labels[i], dtype=torch.long)
        if self.captions is not None:
            item["caption"] = self.captions[i]
        return item

    def _read(self, i: int) -> Tensor:
        path = self.files[i]
        try:
            return self.load(path, i)
        except ConfigError:
            raise
        except Exception as exc:  # decoders report broken files with many error types
            hint = (
                "The file was readable when the dataset was built; check whether it changed."
                if self.skip_bad_files
                else "Fix or remove it, or pass `dataset.skip_bad_files=true` to skip unreadable files."
            )
            raise DataError(
                f"{self.name}: cannot read {self.what} file {path!r} ({type(exc).__name__}: {exc}). {hint}"
            ) from exc

    def settings_repr(self) -> list[str]:
        """``key=value`` strings of the subclass's own settings, for ``repr``."""
        return []

    def __repr__(self) -> str:
        parts = [f"root={self.root!r}", f"n={len(self)}", *self.settings_repr(), f"shape={self.data_shape}"]
        parts.append(f"{self.num_classes} classes" if self.num_classes is not None else "unlabelled")
        if self.captions is not None:
            parts.append("captioned")
        return f"{type(self).__name__}({', '.join(parts)})"
