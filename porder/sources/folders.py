"""Image folders: one sub-folder per class (optionally under ``train/`` and ``test/``),
and the Kaggle flat layout ``<label>.<id>.<ext>``; scanning in natural file-name order."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import SPLITS, SourceError, _holdout, _natural_key, _one_line
from .cifar import _cifar_kind
from .decode import IMAGE_EXTENSIONS, _FileSource

# --------------------------------------------------------------------------
# Image folders


def _is_visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def _is_image_name(name: str) -> bool:
    return _is_visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_dir(folder: Path) -> tuple[list[str], list[str]]:
    """(visible sub-folder names, image file names) directly inside ``folder``, sorted."""
    dirs, images = [], []
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise SourceError(f"cannot list folder '{folder}': {_one_line(exc)}") from None
    for entry in entries:
        if entry.is_dir() and _is_visible(entry.name):
            dirs.append(entry.name)
        elif entry.is_file() and _is_image_name(entry.name):
            images.append(entry.name)
    return sorted(dirs), sorted(images, key=_natural_key)


def _images_below(folder: Path) -> list[str]:
    """Image files anywhere below ``folder``, as sorted POSIX paths relative to it."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if _is_visible(d)]
        rel = Path(root).relative_to(folder)
        found.extend((rel / f).as_posix() for f in files if _is_image_name(f))
    return sorted(found, key=_natural_key)


def _class_folders(folder: Path, classes: list[str], prefix: str):
    """Samples of a class-folder tree -> (paths, labels (N,) int64, names)."""
    paths, labels, names = [], [], []
    for label, cls in enumerate(classes):
        files = _images_below(folder / cls)
        if not files:
            if _cifar_kind({p.name for p in (folder / cls).iterdir()}):
                raise SourceError(f"folder '{folder / cls}' looks like CIFAR: give that "
                                  f"folder itself as the source, not '{folder}'")
            raise SourceError(f"class folder '{folder / cls}' holds no images "
                              f"({' '.join(IMAGE_EXTENSIONS)}); remove it or add images")
        paths.extend(str(folder / cls / f) for f in files)
        names.extend(f"{prefix}{cls}/{f}" for f in files)
        labels.extend([label] * len(files))
    return paths, np.asarray(labels, dtype=np.int64), names


def _select(files, idx: np.ndarray):
    paths, labels, names = files
    return [paths[i] for i in idx], labels[idx], [names[i] for i in idx]


def _open_folder(description, folder: Path, size, test_fraction, seed, on_error, workers):
    dirs, images = _list_dir(folder)
    if "train" in dirs or "test" in dirs:
        return _open_split_folder(description, folder, dirs, size, test_fraction, seed,
                                  on_error, workers)
    if images:
        class_dirs = [d for d in dirs if _images_below(folder / d)]
        if class_dirs:
            raise SourceError(f"folder '{folder}' holds both image files and class folders "
                              f"({', '.join(class_dirs[:3])}); keep one layout")
        return _open_kaggle(description, folder, images, size, test_fraction, seed,
                            on_error, workers)
    if not dirs:
        raise SourceError(f"folder '{folder}' holds no images and no class folders")
    classes = dirs
    files = _class_folders(folder, classes, "")
    train, test = _holdout(len(files[0]), test_fraction, seed)
    return _FileSource("folder", description, classes, size, test_fraction,
                       {"train": _select(files, train), "test": _select(files, test)},
                       on_error, workers)


def _open_split_folder(description, folder, dirs, size, test_fraction, seed, on_error,
                       workers):
    other = [d for d in dirs if d not in SPLITS]
    if other:
        raise SourceError(f"folder '{folder}' has train/ or test/ beside other folders "
                          f"({', '.join(other[:3])}); put every class folder inside train/ "
                          f"and test/")
    if "train" not in dirs:
        raise SourceError(f"folder '{folder}' has test/ but no train/")
    train_classes, train_images = _list_dir(folder / "train")
    if train_images or not train_classes:
        raise SourceError(f"folder '{folder / 'train'}' must hold one sub-folder per class "
                          f"and no image files")
    train_files = _class_folders(folder / "train", train_classes, "train/")
    if "test" not in dirs:  # no test/: hold out part of train/
        train, test = _holdout(len(train_files[0]), test_fraction, seed)
        files = {"train": _select(train_files, train), "test": _select(train_files, test)}
        return _FileSource("folder", description, train_classes, size, test_fraction, files,
                           on_error, workers)
    test_classes, test_images = _list_dir(folder / "test")
    if test_classes != train_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise SourceError(f"folder '{folder}': test/ and train/ must have the same class "
                          f"folders; only in train/: {only_train}, only in test/: {only_test}")
    if test_images:
        raise SourceError(f"folder '{folder / 'test'}' must hold one sub-folder per class "
                          f"and no image files")
    files = {"train": train_files,
             "test": _class_folders(folder / "test", test_classes, "test/")}
    return _FileSource("folder", description, train_classes, size, None, files, on_error,
                       workers)


def _open_kaggle(description, folder, images, size, test_fraction, seed, on_error, workers):
    """Flat folder of '<label>.<id>.<ext>' files (Kaggle Dogs vs. Cats)."""
    prefixes = []
    for name in images:
        stem = name.rsplit(".", 1)[0]
        if "." not in stem:
            raise SourceError(f"cannot take a label from '{folder / name}': a flat image "
                              f"folder needs names '<label>.<id>.<ext>' such as 'cat.12.jpg' "
                              f"(or use one sub-folder per class)")
        prefixes.append(stem.split(".", 1)[0])
    classes = sorted(set(prefixes))
    index = {c: i for i, c in enumerate(classes)}
    files = ([str(folder / n) for n in images],
             np.asarray([index[p] for p in prefixes], dtype=np.int64), list(images))
    train, test = _holdout(len(images), test_fraction, seed)
    return _FileSource("kaggle", description, classes, size, test_fraction,
                       {"train": _select(files, train), "test": _select(files, test)},
                       on_error, workers)
