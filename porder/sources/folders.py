"""Image folders: one sub-folder per class (optionally under ``train/`` and ``test/``),
and the Kaggle flat layout ``<label>.<id>.<ext>``; scanning in natural file-name order."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..messages import one_line
from .base import SPLITS, SourceError, holdout, natural_key, printable, stored_name
from .cifar import cifar_kind
from .decode import FileSource
from .pillow import IMAGE_EXTENSIONS

# --------------------------------------------------------------------------
# Image folders


def _is_visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def _is_image_name(name: str) -> bool:
    return _is_visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_dir(folder: Path) -> tuple[list[str], list[str]]:
    """(visible sub-folder names, image names) directly inside ``folder``, sorted.

    Image names include entries that are not regular files (a FIFO named
    ``x.jpg``, a dangling link): they are refused when decoded, never dropped here.
    """
    dirs, images = [], []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as exc:
        raise SourceError(f"cannot list folder '{printable(folder)}': {one_line(exc)}") from None
    for entry in entries:
        if _is_dir(entry):
            if _is_visible(entry.name):
                dirs.append(entry.name)
        elif _is_image_name(entry.name):
            images.append(entry.name)
    return sorted(dirs), sorted(images, key=natural_key)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symbolic links
    except OSError:
        return False


def _images_below(folder: Path, on_error: str, unlisted: list) -> list[str]:
    """Image names anywhere below ``folder``, as sorted POSIX paths relative to it.

    Linked folders are followed (a link back to a folder above is a loop). A
    folder that cannot be listed, or a loop, raises :class:`SourceError` naming
    it; under ``on_error="skip"`` it is appended to ``unlisted`` as
    ``(relative path + "/", reason)`` instead.
    """
    found = []
    # (folder, its path relative to `folder` as "" or "a/b/", real paths above it);
    # plain strings: Path objects per file cost more than the listing itself
    todo = [(str(folder), "", frozenset())]
    while todo:
        path, rel, above = todo.pop()
        real = os.path.realpath(path)
        try:
            if real in above:
                raise OSError(f"it links back to a folder above it ('{printable(real)}')")
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as exc:
            if on_error != "skip":
                raise SourceError(f"cannot list folder '{printable(path)}': {one_line(exc)} "
                                  f"(use on_error='skip' to leave it out and list it)") from None
            unlisted.append((rel, f"cannot list folder: {one_line(exc)}"))
            continue
        for entry in entries:
            name = entry.name
            if _is_dir(entry):
                if _is_visible(name):
                    todo.append((os.path.join(path, name), f"{rel}{name}/", above | {real}))
            elif _is_image_name(name):
                found.append(rel + name)
    return sorted(found, key=natural_key)


def _class_folders(folder: Path, classes: list[str], prefix: str, on_error: str,
                   unlisted: list):
    """Samples of a class-folder tree -> (paths, labels (N,) int64, names).

    ``classes`` are the folder names as the OS gives them; names are stored
    with :func:`~porder.sources.base.stored_name`. Folders that cannot be listed
    go to ``unlisted`` (under ``on_error="skip"``) as ``(name, reason)``.
    """
    paths, labels, names = [], [], []
    for label, cls in enumerate(classes):
        below: list = []
        files = _images_below(folder / cls, on_error, below)
        unlisted.extend((stored_name(f"{prefix}{cls}/{rel}"), stored_name(reason))
                        for rel, reason in below)
        if not files and not below:
            try:
                looks_like_cifar = cifar_kind({p.name for p in (folder / cls).iterdir()})
            except OSError:
                looks_like_cifar = None
            if looks_like_cifar:
                raise SourceError(f"folder '{printable(folder / cls)}' looks like CIFAR: give "
                                  f"that folder itself as the source, not "
                                  f"'{printable(folder)}'")
            raise SourceError(f"class folder '{printable(folder / cls)}' holds no images "
                              f"({' '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        base = os.path.join(str(folder), cls)
        paths.extend(os.path.join(base, f) for f in files)
        names.extend(stored_name(f"{prefix}{cls}/{f}") for f in files)
        labels.extend([label] * len(files))
    return paths, np.asarray(labels, dtype=np.int64), names


def _select(files, idx: np.ndarray):
    paths, labels, names = files
    return [paths[i] for i in idx], labels[idx], [names[i] for i in idx]


def open_folder(description, folder: Path, size, test_fraction, seed, on_error, workers,
                 decoder):
    dirs, images = _list_dir(folder)
    if "train" in dirs or "test" in dirs:
        return _open_split_folder(description, folder, dirs, size, test_fraction, seed,
                                  on_error, workers, decoder)
    if images:
        class_dirs = [d for d in dirs if _images_below(folder / d, "skip", [])]
        if class_dirs:
            shown = ", ".join(printable(d) for d in class_dirs[:3])
            raise SourceError(f"folder '{printable(folder)}' holds both image files and class "
                              f"folders ({shown}); keep one layout")
        return _open_kaggle(description, folder, images, size, test_fraction, seed,
                            on_error, workers, decoder)
    if not dirs:
        raise SourceError(f"folder '{printable(folder)}' holds no images and no class folders")
    unlisted: list = []
    files = _class_folders(folder, dirs, "", on_error, unlisted)
    train, test = holdout(len(files[0]), test_fraction, seed)
    return FileSource("folder", description, [stored_name(d) for d in dirs], size,
                       test_fraction, {"train": _select(files, train),
                                       "test": _select(files, test)},
                       on_error, workers, decoder=decoder, unlisted={"train": unlisted})


def _open_split_folder(description, folder, dirs, size, test_fraction, seed, on_error,
                       workers, decoder):
    other = [d for d in dirs if d not in SPLITS]
    if other:
        raise SourceError(f"folder '{printable(folder)}' has train/ or test/ beside other "
                          f"folders ({', '.join(printable(d) for d in other[:3])}); put every "
                          f"class folder inside train/ and test/")
    if "train" not in dirs:
        raise SourceError(f"folder '{printable(folder)}' has test/ but no train/")
    train_classes, train_images = _list_dir(folder / "train")
    if train_images or not train_classes:
        raise SourceError(f"folder '{printable(folder / 'train')}' must hold one sub-folder "
                          f"per class and no image files")
    classes = [stored_name(c) for c in train_classes]
    unlisted: dict = {"train": [], "test": []}
    train_files = _class_folders(folder / "train", train_classes, "train/", on_error,
                                 unlisted["train"])
    if "test" not in dirs:  # no test/: hold out part of train/
        train, test = holdout(len(train_files[0]), test_fraction, seed)
        files = {"train": _select(train_files, train), "test": _select(train_files, test)}
        return FileSource("folder", description, classes, size, test_fraction, files,
                           on_error, workers, decoder=decoder, unlisted=unlisted)
    test_classes, test_images = _list_dir(folder / "test")
    if test_classes != train_classes:
        only_train = sorted(stored_name(c) for c in set(train_classes) - set(test_classes))
        only_test = sorted(stored_name(c) for c in set(test_classes) - set(train_classes))
        raise SourceError(printable(
            f"folder '{folder}': test/ and train/ must have the same class folders; only in "
            f"train/: {only_train}, only in test/: {only_test}"))
    if test_images:
        raise SourceError(f"folder '{printable(folder / 'test')}' must hold one sub-folder "
                          f"per class and no image files")
    files = {"train": train_files,
             "test": _class_folders(folder / "test", test_classes, "test/", on_error,
                                    unlisted["test"])}
    return FileSource("folder", description, classes, size, None, files, on_error,
                       workers, decoder=decoder, unlisted=unlisted)


def _open_kaggle(description, folder, images, size, test_fraction, seed, on_error, workers,
                 decoder):
    """Flat folder of '<label>.<id>.<ext>' files (Kaggle Dogs vs. Cats)."""
    prefixes = []
    for name in images:
        stem = name.rsplit(".", 1)[0]
        if "." not in stem:
            raise SourceError(f"cannot take a label from '{printable(folder / name)}': a flat "
                              f"image folder needs names '<label>.<id>.<ext>' such as "
                              f"'cat.12.jpg' (or use one sub-folder per class)")
        prefixes.append(stored_name(stem.split(".", 1)[0]))
    classes = sorted(set(prefixes))
    index = {c: i for i, c in enumerate(classes)}
    files = ([str(folder / n) for n in images],
             np.asarray([index[p] for p in prefixes], dtype=np.int64),
             [stored_name(n) for n in images])
    train, test = holdout(len(images), test_fraction, seed)
    return FileSource("kaggle", description, classes, size, test_fraction,
                       {"train": _select(files, train), "test": _select(files, test)},
                       on_error, workers, decoder=decoder)
