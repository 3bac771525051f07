"""Finding training images and labelled test samples on disk.

Two layouts are understood:

* MVTec-AD style category folder: ``train/good/*`` (normal images), ``test/good/*``,
  ``test/<defect>/*`` and ``ground_truth/<defect>/<stem>_mask.png``.
* A plain folder of normal images (training only), read non-recursively.

Hidden files (names starting with ".") and files without an image extension are ignored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from anomap.data.images import IMAGE_EXTENSIONS, image_size, is_grey_file
from anomap.errors import ConfigError, DataError
from anomap.types import Sample, Split

_LAYOUT_HINT = (
    "lay the category folder out as test/good/*, test/<defect>/* and ground_truth/<defect>/<stem>_mask.png"
)


def _list_images(folder: Path) -> list[Path]:
    """Sorted (by file name) non-hidden files directly in ``folder`` with an image extension."""
    files = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    return sorted(files, key=lambda p: p.name)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
    )


def _require_dir(path: Path, fix: str) -> None:
    if not path.exists():
        raise DataError("folder not found.", path=path, fix=fix)
    if not path.is_dir():
        raise DataError("is not a folder.", path=path, fix=fix)


def is_mvtec_layout(root: str | Path) -> bool:
    """Whether ``root`` is an MVTec-style category folder (it has ``train/good``)."""
    return (Path(root) / "train" / "good").is_dir()


def train_images(root: str | Path) -> list[Path]:
    """Normal training images: ``root/train/good/*`` for the MVTec layout, else ``root/*``.

    Raises:
        DataError: the folder is missing, not a folder, or holds no images.
    """
    root = Path(root)
    _require_dir(root, "give the category folder (with train/good) or a folder of normal images")
    folder = root / "train" / "good" if is_mvtec_layout(root) else root
    images = _list_images(folder)
    if not images:
        subs = _subfolders(folder)
        hint = ""
        if subs and folder == root:
            names = ", ".join(p.name for p in subs[:5]) + (", ..." if len(subs) > 5 else "")
            hint = f" (it has subfolders: {names}; is this a dataset root rather than one category?)"
        raise DataError(
            f"no training images found{hint}.",
            path=folder,
            fix=f"put normal images ({', '.join(IMAGE_EXTENSIONS)}) directly in the folder, "
            "or give the category folder that contains train/good",
        )
    return images


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    """Map file stem -> mask file in ``gt_dir``; a .png wins over other extensions with the same stem."""
    if not gt_dir.is_dir():
        return {}
    index: dict[str, Path] = {}
    for p in _list_images(gt_dir):
        if p.stem not in index or p.suffix.lower() == ".png":
            index[p.stem] = p
    return index


def test_samples(root: str | Path) -> list[Sample]:
    """Labelled test images of an MVTec-style category folder, paired with their masks by file stem.

    Every subfolder of ``root/test`` is a class: "good" (label 0, no mask) or a defect type (label 1,
    mask ``ground_truth/<defect>/<stem>_mask.png``, or ``<stem>.png`` there when no ``_mask`` file
    exists). Mask sizes are checked against image sizes from the file headers.

    Returns:
        Samples sorted by class name, then file name.

    Raises:
        DataError: ``test`` is missing, a class folder is empty, there is no "good" class or no defect
            class, a defect image has no mask, or a mask does not match its image's size.
    """
    root = Path(root)
    _require_dir(root, "give the category folder that contains test/ and ground_truth/")
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DataError("has no test folder, so there is nothing to evaluate.", path=root, fix=_LAYOUT_HINT)
    classes = _subfolders(test_dir)
    if not any(c.name == "good" for c in classes):
        raise DataError(
            "has no good/ class folder; image AUROC needs normal and defective test images.",
            path=test_dir,
            fix=_LAYOUT_HINT,
        )
    if not any(c.name != "good" for c in classes):
        raise DataError(
            "has no defect class folder (only good/); image AUROC needs normal and defective test images.",
            path=test_dir,
            fix=_LAYOUT_HINT,
        )
    samples: list[Sample] = []
    for cls in classes:
        images = _list_images(cls)
        if not images:
            raise DataError(
                f"class folder has no images (accepted: {', '.join(IMAGE_EXTENSIONS)}).",
                path=cls,
                fix="add images to the folder or delete it",
            )
        if cls.name == "good":
            samples.extend(Sample(path=p, label=0, defect_type="good", mask_path=None) for p in images)
            continue
        gt_dir = root / "ground_truth" / cls.name
        masks = _mask_index(gt_dir)
        for img in images:
            mask = masks.get(f"{img.stem}_mask") or masks.get(img.stem)
            if mask is None:
                expected = gt_dir / f"{img.stem}_mask.png"
                raise DataError(
                    f"defect image has no mask (expected {expected}).",
                    path=img,
                    fix=f"add the mask {expected} (white = defect) or remove the image",
                )
            img_wh, mask_wh = image_size(img), image_size(mask)
            if img_wh != mask_wh:
                raise DataError(
                    f"mask is {mask_wh[0]}x{mask_wh[1]} pixels but its image {img} is "
                    f"{img_wh[0]}x{img_wh[1]} (width x height).",
                    path=mask,
                    fix="masks must have the same size as their image; re-export the mask at the image size",
                )
            samples.append(Sample(path=img, label=1, defect_type=cls.name, mask_path=mask))
    return samples


test_samples.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name


def split_train(
    paths: Sequence[str | Path], val_fraction: float = 0.1, min_heldout: int = 5, seed: int = 0
) -> Split:
    """Seeded split of normal images into images to fit on and held-out normal images.

    ``max(min_heldout, round(val_fraction * n))`` images are held out; the result does not depend on
    the order of ``paths``. Both lists are sorted.

    Raises:
        DataError: fewer than two images would remain to fit on.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), not {val_fraction!r}.", fix="use e.g. 0.1")
    if min_heldout < 0:
        raise DataError(f"min_heldout must be >= 0, not {min_heldout!r}.", fix="use e.g. 5")
    ordered = sorted(Path(p) for p in paths)
    n = len(ordered)
    k = max(int(min_heldout), round(val_fraction * n))
    if n - k < 2:
        parents = {p.parent for p in ordered}
        where = parents.pop() if len(parents) == 1 else None
        raise DataError(
            f"too few training images ({n}); anomap needs at least {min_heldout + 2} "
            f"({k} held out for calibration + 2 to fit on).",
            path=where,
            fix="add more normal images to the training folder",
        )
    perm = np.random.default_rng(seed).permutation(n)
    held = sorted(ordered[i] for i in perm[:k])
    fit = sorted(ordered[i] for i in perm[k:])
    return Split(fit=fit, heldout=held, seed=seed)


def file_fingerprint(path: str | Path) -> str:
    """The first 16 hex digits of the file's SHA-256: tells a model's held-out images from others of the same name.

    A check against mix-ups (MVTec folders all number their images 000.png, 001.png, ...), not a
    security measure.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def find_heldout(data: str | Path, names: Sequence[str] | None, digests: Sequence[str] | None) -> list[Path]:
    """A model's held-out normal images in ``data``'s ``train/good``, sorted: found by name, then compared
    by content with the model's fingerprints (``digests``, :func:`file_fingerprint`, in the order of
    ``names``), because MVTec-style folders of different categories use the same names.

    Raises:
        ConfigError: ``data`` is not the folder the model was trained on (not all of them are there, or
            one of them has other content), or the model does not record its held-out images (None).
    """
    if not names or digests is None:
        raise ConfigError("this model does not record its held-out images (file names and fingerprints).",
                          fix="retrain it with `anomap fit` (this anomap version stores them)")
    wanted = set(names)
    found = {p.name: p for p in train_images(data) if p.name in wanted}
    if len(found) != len(wanted):
        raise ConfigError(f"the model's {len(names)} held-out images were not all found in this folder.",
                          path=data, fix="give the folder the model was trained on")
    changed = [n for n, d in zip(names, digests, strict=True) if file_fingerprint(found[n]) != d]
    if changed:
        raise ConfigError(
            f"{len(changed)} of the model's {len(names)} held-out images have other content here than "
            f"when it was trained (first: {changed[0]}).", path=data,
            fix="give the folder the model was trained on, with its images unchanged")
    return sorted(found.values())


def detect_channels(paths: Iterable[str | Path]) -> int:
    """1 if every file is grey according to its header, else 3 (also 3 for no files)."""
    seen = False
    for p in paths:
        seen = True
        if not is_grey_file(p):
            return 3
    return 1 if seen else 3


def check_min_size(paths: Iterable[str | Path], min_side: int, fix: str | None = None
                   ) -> dict[str | Path, tuple[int, int]]:
    """Raise a DataError naming the first image whose width or height is below ``min_side`` pixels; else
    return every image's (width, height), keyed by its path as given.

    Only headers are read. ``fix`` replaces the default advice (the caller knows why ``min_side`` is what it is).
    """
    sizes: dict[str | Path, tuple[int, int]] = {}
    for p in paths:
        w, h = sizes[p] = image_size(p)
        if min(w, h) < min_side:
            raise DataError(
                f"image is {w}x{h} pixels, smaller than the {min_side} px anomap needs on each side.",
                path=p,
                fix=fix or f"use images of at least {min_side} px per side or remove this one",
            )
    return sizes
