"""A folder of a user's images as a dataset: one sub-folder per class, with or without ``train/``, ``val/``, ``test/``.

Images are decoded by torchvision (PNG, JPEG, WebP, GIF; see :func:`project.images.decode`), converted to the
configured channels and resized to the configured size, once: the result is cached under ``data_dir`` as the same
``uint8`` tensors the built-in datasets are held in, with each image's pixel sums for the mean and std of whatever the
train split turns out to be.
The cache is rebuilt when a file is added, removed or changed (its listing of names, sizes and times is the key).
A folder whose decoded images would take more than ``in_memory_max_mb`` is kept on disk instead: the cache then holds
only the sums, and DataLoader workers decode each batch with the same function, so both paths serve the same batches.
"""

import csv
import hashlib
import os
import sys
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import Dataset

from project.data import cache as caches
from project.data.sets import Files, Tensors, class_counts
from project.errors import ConfigError, DataError
from project.images import decode

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
# the names a split folder may have beside train/
SPLITS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


@dataclass(frozen=True)
class Layout:
    """What a folder holds, from its names alone: the class names and, per split folder found, files and labels.
    A folder without ``train/`` is one pool, under the key ``train``."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, tuple[list[Path], list[int]]]
    ignored: list[Path]  # files that are not images by their suffix
    loose: list[Path]  # files beside the class folders, in no class
    origin: Path | None = None  # what lists the files where that is not the folder (a CSV file)

    @property
    def source(self) -> Path:
        return self.origin or self.root


def _class_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(path: Path) -> tuple[list[Path], list[Path]]:
    """The image files under ``path`` (any depth, by suffix, sorted; hidden files and folders left out), and the other
    files."""
    files, seen = [], set()
    # linked folders are followed (images gathered from elsewhere), each real folder once, and never one that holds the
    # folder walked: a link to a parent would pull the other classes' images into this one
    top = os.path.realpath(path)
    for directory, dirs, names in os.walk(path, followlinks=True):
        seen.add(os.path.realpath(directory))
        real = {d: os.path.realpath(Path(directory) / d) for d in dirs}
        dirs[:] = [d for d in dirs if not d.startswith(".") and _enters(real[d], top, seen)]
        files += [Path(directory) / f for f in names if not f.startswith(".")]
    images = sorted(f for f in files if f.suffix.lower() in SUFFIXES)
    return images, sorted(f for f in files if f.suffix.lower() not in SUFFIXES)


def _enters(real: str, top: str, seen: set[str]) -> bool:
    """Whether a folder found by a walk from ``top`` is one to enter: not walked yet, and not ``top`` or a folder
    above it."""
    return real not in seen and not (top == real or top.startswith(real.rstrip(os.sep) + os.sep))


def classes_of(root: str | Path) -> tuple[str, ...]:
    """The class names of a folder (its ``train/`` sub-folders if it has one), read from names only."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise DataError(
            f"data.source.root {root} {what}: give the directory that holds one sub-folder of images per class."
        )
    base = root / "train" if (root / "train").is_dir() else root
    classes = tuple(d.name for d in _class_dirs(base))
    if len(classes) < 2:
        found = f"one class folder ({classes[0]})" if classes else "no class folders"
        split = f" ({base.name}/ is the train split: no class can be named {base.name})" if base != root else ""
        raise DataError(
            f"data.source.root {base} has {found}{split}: classification needs two or more, one sub-folder per class "
            f"named after it ({root}/cat/1.jpg, {root}/dog/2.png, ...), optionally inside train/, val/ and test/."
        )
    return classes


def scan(root: str | Path) -> Layout:
    """Every image of the folder with its class, per split folder; one DataError for a layout that cannot train."""
    root = Path(root)
    classes = classes_of(root)
    found = {split: next((root / n for n in names if (root / n).is_dir()), None) for split, names in SPLITS.items()}
    if found["train"] is None:
        found = {"train": root}
    else:
        known = {p for p in found.values() if p is not None}
        if others := [d.name for d in _class_dirs(root) if d not in known]:
            raise DataError(
                f"data.source.root {root} has train/ and also {', '.join(others)}/: beside train/, a folder holds only "
                "val/ (or valid/, validation/) and test/ (or testing/). Move or rename the others."
            )
    splits, ignored, loose = {}, [], []
    for split, base in found.items():
        if base is None:
            continue
        # files beside the class folders belong to no class
        loose += [f for f in base.iterdir() if f.is_file() and not f.name.startswith(".")]
        files, labels = [], []
        for class_dir in _class_dirs(base):
            if class_dir.name not in classes:
                raise DataError(
                    f"{class_dir} is not a class of the train split ({', '.join(classes)}): every split folder holds "
                    "the train split's class folders (some may be missing), no others."
                )
            images, others = _images(class_dir)
            ignored += others
            if not images and split == "train":
                raise DataError(
                    f"class folder {class_dir} holds no images ({', '.join(SUFFIXES)}): add some, or remove the folder."
                )
            files += images
            labels += [classes.index(class_dir.name)] * len(images)
        splits[split] = (files, labels)
    return Layout(root, classes, splits, ignored, loose)


class Decoded(Dataset):
    """Each file as ``(its image, -1)``, or ``(None, -1)`` where it cannot be decoded: the items of
    :func:`project.data.cache.decode_all`, whose labels a folder takes from its class folders' names instead."""

    def __init__(self, files: list[Path], size: tuple[int, int], channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        try:
            return decode(self.files[i], self.size, self.channels), -1
        except DataError:
            return None, -1


def listing_key(layout: Layout, size: tuple[int, int], channels: int) -> str:
    digest = hashlib.sha256(f"{caches.VERSION} {size} {channels}".encode())
    for files, _ in layout.splits.values():
        for f in files:
            try:
                stat = f.stat()
                size, mtime = stat.st_size, stat.st_mtime_ns
            except OSError:  # a dangling link: decoding skips it and names it
                size = mtime = -1
            digest.update(f"{os.path.relpath(f, layout.root)}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


@dataclass
class FolderImages:
    """A scanned, decoded folder: per split folder found, a dataset (in memory or on disk) and each image's sums."""

    layout: Layout
    sets: dict[str, Tensors | Files]
    sums: dict[str, torch.Tensor]  # split -> (N, 2, channels) sum and sum of squares per image
    paths: dict[str, list[Path]]  # split -> each image's file, in the set's order
    skipped: list[Path]


def cache(
    layout: Layout, size: tuple[int, int], channels: int, cache_dir: str | Path, in_memory_max_mb: int, workers: int
) -> dict:
    """The cache of a layout's files (written first, if the files changed since or there is none): ``images``
    (``uint8 (N, channels, *size)``, or ``None`` for a folder kept on disk), ``sums`` and ``ok``, in layout order."""
    files = [f for fs, _ in layout.splits.values() for f in fs]
    in_memory = len(files) * channels * size[0] * size[1] <= in_memory_max_mb * 2**20
    key = listing_key(layout, size, channels)
    # one cache file per folder (or CSV), size, channels and kind: a changed folder's replaces its earlier one
    which = hashlib.sha256(f"{layout.source.resolve()} {size} {channels} {in_memory}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / "folders" / f"{layout.source.resolve().name}-{which}.pt"
    cached = caches.read(path, key)
    if cached is None:
        images, _, sums, ok = caches.decode_all(Decoded(files, size, channels), (channels, *size), workers, in_memory)
        cached = caches.write(path, {"key": key, "images": images, "sums": sums, "ok": ok})
    return cached


def load(
    layout: Layout, size: tuple[int, int], channels: int, cache_dir: str | Path, in_memory_max_mb: int, workers: int
) -> FolderImages:
    """A layout's images per split, from :func:`cache`; says on stderr which files were skipped."""
    cached = cache(layout, size, channels, cache_dir, in_memory_max_mb, workers)
    files = [f for fs, _ in layout.splits.values() for f in fs]
    labels = torch.tensor([label for _, ls in layout.splits.values() for label in ls], dtype=torch.int64)
    ok = cached["ok"]
    skipped = [f for f, good in zip(files, ok.tolist(), strict=True) if not good]
    sets, sums, paths, start = {}, {}, {}, 0
    for split, (split_files, _) in layout.splits.items():
        span = torch.arange(start, start + len(split_files))
        start += len(split_files)
        span = span[ok[span]]
        if split == "train":
            _check_classes(layout, labels[span], skipped)
        paths[split] = [files[i] for i in span.tolist()]
        if cached["images"] is not None:
            sets[split] = Tensors(cached["images"][span], labels[span])
        else:
            sets[split] = Files(paths[split], labels[span], size, channels)
        sums[split] = cached["sums"][span]
    if layout.ignored and rank_zero_only.rank == 0:
        kinds = sorted({f.suffix.lower() or f.name for f in layout.ignored})
        print(f"note: ignored {len(layout.ignored)} files of {layout.root} that are not images by their suffix "
              f"({', '.join(kinds[:8])}); images are {', '.join(SUFFIXES)}.", file=sys.stderr)  # fmt: skip
    if layout.loose and rank_zero_only.rank == 0:
        shown = ", ".join(str(f) for f in layout.loose[:3]) + (", ..." if len(layout.loose) > 3 else "")
        print(f"note: ignored {len(layout.loose)} files of {layout.root} that are in no class folder ({shown}): an "
              "image's class is the name of the folder it is in.", file=sys.stderr)  # fmt: skip
    warn_skipped(skipped, len(files), f" of {layout.source}")
    return FolderImages(layout, sets, sums, paths, skipped)


def _check_classes(layout: Layout, labels: torch.Tensor, skipped: list[Path]) -> None:
    counts = class_counts(labels, len(layout.classes))
    empty = [layout.classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
    if empty and layout.origin is not None:  # a CSV's classes are its labels, not folders
        raise DataError(
            f"the classes {', '.join(empty)} of {layout.origin} have no train image that torchvision can decode "
            f"({len(skipped)} files skipped, e.g. {skipped[0] if skipped else 'none'}): replace the files, or their "
            "rows."
        )
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty)} of {layout.root} hold no image that torchvision can decode "
            f"({len(skipped)} files skipped, e.g. {skipped[0]}): replace the files, or remove the folder."
        )


def warn_skipped(skipped: list[Path], total: int, where: str = "") -> None:
    """One line on stderr (from the first process only) naming the files that could not be decoded."""
    if skipped and rank_zero_only.rank == 0:
        names = ", ".join(str(f) for f in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} of {total} files{where} that cannot be read or decoded as images: "
              f"{names}", file=sys.stderr)  # fmt: skip


def expand(patterns: list[str]) -> list[Path]:
    """Image files from files, folders (any depth) and glob patterns, in the order given, each once."""
    if not patterns or not all(str(p).strip() for p in patterns):  # "" would be the current directory
        raise ConfigError(
            "data.predict_files is empty: give image files, folders or glob patterns (quoted, e.g. 'photos/*.jpg')."
        )
    found: dict[Path, None] = {}
    for pattern in patterns:
        # a path that exists is itself, even with glob characters in its name ("photo [1].jpg")
        pattern = os.path.expanduser(pattern)
        is_glob = not os.path.lexists(pattern) and any(c in pattern for c in "*?[")
        matches = sorted(glob(pattern, recursive=True)) if is_glob else [pattern]
        if not matches:
            raise DataError(f"data.predict_files: {pattern} matches no files (in {Path.cwd()}).")
        for match in map(Path, matches):
            if match.is_dir():
                found.update(dict.fromkeys(_images(match)[0]))
            elif match.is_file() or match.is_symlink():  # a dangling link is skipped and named, as in a folder
                found[match] = None
            else:
                raise DataError(f"data.predict_files: {match} does not exist (in {Path.cwd()}).")
    if not found:
        raise DataError(
            f"data.predict_files {', '.join(patterns)} matches no files: give image files, folders or glob patterns "
            f"(quoted, e.g. 'photos/*.jpg')."
        )
    # each file once, by what it is: a ** pattern follows a linked folder that holds itself round and round
    once: dict[str, Path] = {}
    for path in found:
        once.setdefault(os.path.realpath(path), path)
    return list(once.values())


def scan_csv(path: str | Path, classes: list[str] | None = None, multilabel: bool = False) -> Layout:
    """The images a CSV file lists with their labels: columns ``path`` (relative to the CSV's folder, or absolute),
    ``label``, and optionally ``split`` (``train``, ``val``, ``test``, or their folder names' other spellings; empty:
    ``train``). The classes are ``classes`` where given (label order), else the train rows' labels, sorted. Missing
    files, unknown labels or splits, and rows that name a file twice each stop it with one message naming their rows
    (line numbers, the header being line 1).

    ``multilabel``: an image has any number of the labels, given as ``label`` ``a|b|c`` (empty: none), or as one
    column of 0 or 1 per label (every column besides path and split, in their order, without a ``label`` column);
    each image's labels are then a 0/1 row of the classes."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: the byte-order mark a spreadsheet may write
            reader = csv.DictReader(f)
            # the column names as a spreadsheet may spell them ("Path", " label"); the cells as they are
            header = [(name or "").strip().lower() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"data.source.csv {path} cannot be read as a CSV file: {err}") from None
    wide = [c for c in header if c not in ("path", "split")] if multilabel and "label" not in header else []
    if "path" not in header or not ("label" in header or len(wide) >= 2):
        wanted = "path, and label or a column per label" if multilabel else "path and label"
        raise DataError(f"data.source.csv {path} has the columns {', '.join(header) or 'none'}; it needs a header with "
                        f"{wanted} (and optionally split).")  # fmt: skip
    if not rows:
        raise DataError(f"data.source.csv {path} lists no images.")
    if classes and len(set(classes)) < len(classes):
        twice = sorted({c for c in classes if list(classes).count(c) > 1})
        raise ConfigError(f"data.source.classes names {', '.join(twice)} more than once: give each class once.")
    spellings = {name: split for split, names in SPLITS.items() for name in names}
    problems: dict[str, list[str]] = {"missing": [], "split": [], "empty": [], "label": [], "value": [], "twice": []}
    seen: dict[Path, int] = {}
    listed = []
    for line, row in rows:
        split = spellings.get((row.get("split") or "train").strip().lower())
        if split is None:
            problems["split"].append(f"line {line} ({row['split']!r})")
            continue
        file = (path.parent / (row["path"] or "").strip()).absolute()
        if not (row["path"] or "").strip() or not file.is_file():
            problems["missing"].append(f"line {line} ({row['path']})")
            continue
        if (real := file.resolve()) in seen:
            problems["twice"].append(f"line {line} ({row['path']}, as line {seen[real]})")
            continue
        seen[real] = line
        if wide:
            cells = {c: (row[c] or "").strip() for c in wide}
            if bad := [f"{c}={v!r}" for c, v in cells.items() if v not in ("0", "1")]:
                problems["value"].append(f"line {line} ({', '.join(bad)})")
                continue
            labels = tuple(c for c, v in cells.items() if v == "1")
        elif multilabel:
            labels = tuple(part.strip() for part in (row["label"] or "").split("|") if part.strip())
        elif not (row.get("label") or "").strip():  # one class an image: a row without one is a mistake
            problems["empty"].append(f"line {line}")
            continue
        else:
            labels = ((row["label"] or "").strip(),)
        listed.append((line, split, file, labels))
    given = tuple(classes) if classes else tuple(wide)
    names = given or tuple(sorted({label for _, split, _, labels in listed if split == "train" for label in labels}))
    splits: dict[str, tuple[list[Path], list]] = {}
    for line, split, file, labels in listed:
        if unknown := [label for label in labels if label not in names]:
            problems["label"].append(f"line {line} ({', '.join(map(repr, unknown))})")
            continue
        files, targets = splits.setdefault(split, ([], []))
        files.append(file)
        targets.append([int(n in labels) for n in names] if multilabel else names.index(labels[0]))
    what = {"missing": "a file that does not exist", "split": "a split that is not train, val or test",
            "label": f"a label that is none of the classes ({', '.join(names)})", "value": "a label cell not 0 or 1",
            "empty": "no label",
            "twice": "a file that an earlier line names"}  # fmt: skip
    said = []
    for kind, found in problems.items():
        if found:
            shown = ", ".join(found[:5]) + (f", and {len(found) - 5} more" if len(found) > 5 else "")
            said.append(f"{len(found)} {'row has' if len(found) == 1 else 'rows have'} {what[kind]}: {shown}")
    if said:
        raise DataError(f"data.source.csv {path}: {'; '.join(said)}. Correct the CSV file (a spreadsheet's line "
                        "numbers, the header being line 1).")  # fmt: skip
    if "train" not in splits or len(names) < 2:
        raise DataError(f"data.source.csv {path} has {len(splits.get('train', ([], []))[0])} train rows of "
                        f"{len(names)} classes: it needs train rows of two classes or more.")  # fmt: skip
    counts = class_counts(torch.tensor(splits["train"][1]), len(names))
    empty = [n for n, count in zip(names, counts.tolist(), strict=True) if not count]
    if empty:
        raise DataError(f"data.source.csv {path}: the classes {', '.join(empty)} have no train rows.")
    return Layout(path.parent.absolute(), names, splits, [], [], origin=path.absolute())
