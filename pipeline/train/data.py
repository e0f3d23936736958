"""Datasets as uint8 tensors: loaded once, split once, augmented in batches on the training device.

``data.dataset`` picks the source (``load_dataset``):

* ``cifar10``, ``cifar100``, ``svhn``: torchvision's files under ``data.root`` (else ``$PIPELINE_DATA_ROOT``, else
  ``~/.cache/pipeline/data``), each file checked against its published MD5 before it is read, downloaded only when
  absent and ``data.download`` allows it.
* ``imagefolder``: the user's images, ``root/train/<class>/<images>`` and ``root/test/<class>/<images>``; class names
  are the sorted class folder names (hidden entries, starting with ".", are skipped; images may sit in subfolders
  of a class folder), every image is read with PIL as RGB and, with ``image_size`` > 0, resized (bilinear, not
  cropped) once to image_size x image_size; without it every image must already have one size.
* ``npz``: ``root`` is one ``.npz`` file (``numpy.savez``) with uint8 ``x_train``, ``x_test`` and integer
  ``y_train``, ``y_test`` (optionally ``classes``: one name per class index). Images are [N, H, W, C] (NHWC, as
  Keras gives them) or [N, C, H, W], told apart by where the 1- or 3-channel axis is (the last axis wins when both
  are 1 or 3), or [N, H, W] (grayscale). Labels are [N] (or Keras' [N, 1]); the class count is the largest label + 1
  over both splits (or the length of ``classes``).

Every problem with the data is one line (``DataError``, a ``UserError``: ``pipeline: error: ...``, exit 2) naming the
file or folder, what was expected and what was found."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.paths import home_cache

DATA_ROOT_ENV = "PIPELINE_DATA_ROOT"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper",
    "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm")
SVHN_CLASSES = tuple("0123456789")
DATASETS = ("cifar10", "cifar100", "svhn", "imagefolder", "npz")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_LAYOUT = "uint8 x_train, x_test and integer y_train, y_test"


class DataError(UserError, RuntimeError):
    pass


@dataclass
class Split:
    images: torch.Tensor   # uint8 [N, C, H, W]
    labels: torch.Tensor   # int64 [N]

    def __len__(self):
        return len(self.labels)

    def subset(self, n: int, seed: int) -> "Split":
        if n <= 0 or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.images[idx], self.labels[idx])


@dataclass(frozen=True)
class DatasetInfo:
    name: str                      # data.dataset
    num_classes: int
    shape: tuple[int, int, int]    # (C, H, W) of every image
    classes: tuple[str, ...]       # one name per class index


# The datasets whose info is known without reading a file (what load_dataset reports for the real release).
FIXED_INFO = {
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), CLASSES),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), CIFAR100_CLASSES),
    "svhn": DatasetInfo("svhn", 10, (3, 32, 32), SVHN_CLASSES),
}

# what a missing home folder leaves without a default, and what $PIPELINE_DATA_ROOT should then hold
_ROOT_HINTS = {
    "cifar10": ("CIFAR-10 folder", "a folder holding cifar-10-batches-py (or set data.root)"),
    "cifar100": ("CIFAR-100 folder", "a folder holding cifar-100-python (or set data.root)"),
    "svhn": ("SVHN folder", "a folder holding train_32x32.mat and test_32x32.mat (or set data.root)"),
    "imagefolder": ("image folder", "a folder holding train/<class>/ and test/<class>/ (or set data.root)"),
}


def resolve_root(root: str, dataset: str = "cifar10") -> Path:
    """data.root, else $PIPELINE_DATA_ROOT, else ~/.cache/pipeline/data (HomeMissing without a home folder). The
    npz dataset has no default: its root is the file."""
    if root:
        return Path(root).expanduser()
    if dataset == "npz":
        raise DataError('data.dataset = "npz" needs data.root = the path of the .npz file (with '
                        f"{NPZ_LAYOUT})")
    what, hint = _ROOT_HINTS.get(dataset, _ROOT_HINTS["cifar10"])
    return home_cache(DATA_ROOT_ENV, "data", what=what, hint=hint)


def load_dataset(dataset: str, root: str = "", download: bool = True,
                 image_size: int = 0) -> tuple[Split, Split, DatasetInfo]:
    """(train, test, info) of ``data.dataset`` (see the module's docstring); images uint8 [N, C, H, W], labels int64
    in [0, info.num_classes). ``download``: torchvision datasets only; ``image_size``: imagefolder only."""
    if image_size and dataset != "imagefolder":
        raise ValueError(f"image_size applies to imagefolder only, not {dataset!r}")
    if dataset in ("cifar10", "cifar100"):
        return _load_cifar(dataset, root, download)
    if dataset == "svhn":
        return _load_svhn(root, download)
    if dataset == "imagefolder":
        return _load_imagefolder(root, image_size)
    if dataset == "npz":
        return _load_npz(root)
    raise DataError(f"data.dataset: unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")


def load_cifar10(root: str = "", download: bool = True) -> tuple[Split, Split]:
    """(train 50k, test 10k) through torchvision, whose integrity check guards the files."""
    train, test, _ = _load_cifar("cifar10", root, download)
    return train, test


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _load_cifar(dataset: str, root: str, download: bool) -> tuple[Split, Split, DatasetInfo]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, label = {"cifar10": (CIFAR10, "CIFAR-10"), "cifar100": (CIFAR100, "CIFAR-100")}[dataset]
    folder = cls.base_folder
    path = resolve_root(root, dataset)
    have = (path / folder).is_dir()
    if not have and not download:
        raise DataError(f"{label} not found: {path}/{folder} is missing and data.download = false "
                        f"(set data.root or ${DATA_ROOT_ENV})")
    if have:
        verify_cifar10_files(path / folder, cls.train_list + cls.test_list + [[cls.meta["filename"], cls.meta["md5"]]],
                             what=label)
    try:
        splits = [cls(str(path), train=t, download=not have and download) for t in (True, False)]
    except Exception as e:  # torchvision raises URLError/RuntimeError variants; one line is what the user needs
        raise DataError(f"{label} could not be loaded from {path} (download={'yes' if not have else 'no'}): "
                        f"{type(e).__name__}: {_first_line(e)} "
                        f"(set data.root or ${DATA_ROOT_ENV} to a folder holding {folder})") from None
    out = []
    for ds in splits:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out.append(Split(images, torch.tensor(ds.targets, dtype=torch.int64)))
    classes = tuple(str(c) for c in splits[0].classes)
    return out[0], out[1], DatasetInfo(dataset, len(classes), tuple(out[0].images.shape[1:]), classes)


def _md5(f: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _check_md5(f: Path, md5: str, remedy: str) -> None:
    digest = _md5(f)
    if digest != md5:
        raise DataError(f"{f}: damaged (md5 {digest}, expected {md5}, {f.stat().st_size:,} bytes); {remedy}")


def verify_cifar10_files(folder: Path, expected: list, what: str = "CIFAR-10") -> None:
    """Every file of the release present with its published MD5; else one line naming the file. ``what``: the
    release's name (CIFAR-10, CIFAR-100); ``folder`` is its folder (cifar-10-batches-py, cifar-100-python)."""
    for name, md5 in expected:
        f = folder / name
        if not f.is_file():
            raise DataError(f"{f}: missing from the {what} folder (expected md5 {md5}); copy the complete "
                            f"{folder.name} folder, or remove it and set data.download = true")
        _check_md5(f, md5, "replace it from an intact copy, or remove the folder and set data.download = true")


def _load_svhn(root: str, download: bool) -> tuple[Split, Split, DatasetInfo]:
    """SVHN's train_32x32.mat and test_32x32.mat (not 'extra'), digits 0-9 (torchvision maps the files' 10 to 0)."""
    from torchvision.datasets import SVHN

    path = resolve_root(root, "svhn")
    files = {split: (path / SVHN.split_list[split][1], SVHN.split_list[split][2]) for split in ("train", "test")}
    for f, md5 in files.values():
        if not f.is_file() and not download:
            raise DataError(f"SVHN not found: {f} is missing and data.download = false "
                            f"(set data.root or ${DATA_ROOT_ENV})")
    out = []
    for split, (f, md5) in files.items():
        have = f.is_file()
        if have:
            _check_md5(f, md5, "replace it from an intact copy, or remove it and set data.download = true")
        try:
            ds = SVHN(str(path), split=split, download=not have)
        except Exception as e:  # download failures, scipy missing: one line
            raise DataError(f"SVHN could not be loaded from {path} (download={'yes' if not have else 'no'}): "
                            f"{type(e).__name__}: {_first_line(e)} (set data.root or ${DATA_ROOT_ENV} to a folder "
                            "holding train_32x32.mat and test_32x32.mat)") from None
        out.append(Split(torch.from_numpy(np.ascontiguousarray(ds.data)),
                         torch.from_numpy(np.asarray(ds.labels, dtype=np.int64).reshape(-1))))
    return out[0], out[1], DatasetInfo("svhn", 10, tuple(out[0].images.shape[1:]), SVHN_CLASSES)


def _names(names, limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "") if names else "none"


def _visible(entry: Path) -> bool:
    return not entry.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    """The images in ``folder`` and its subfolders (by extension, hidden entries skipped), in a fixed order."""
    found = []
    for here, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(here) / f for f in sorted(files)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _load_imagefolder(root: str, image_size: int) -> tuple[Split, Split, DatasetInfo]:
    from PIL import Image

    path = resolve_root(root, "imagefolder")
    layout = f"{path}/train/<class>/<images> and {path}/test/<class>/<images>"
    classes = {}
    for split in ("train", "test"):
        d = path / split
        if not d.is_dir():
            raise DataError(f"image folder: {d} is {'not a folder' if d.exists() else 'missing'} "
                            f'(data.dataset = "imagefolder" reads {layout})')
        classes[split] = sorted(c.name for c in d.iterdir() if c.is_dir() and _visible(c))
    names = classes["train"]
    if len(names) < 2:
        raise DataError(f"image folder: {path}/train holds {len(names)} class folder{'' if len(names) == 1 else 's'} "
                        f"({_names(names)}); a classifier needs at least 2 ({layout})")
    if names != classes["test"]:
        only_train = sorted(set(names) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(names))
        diff = "; ".join([f"only in train: {_names(only_train)}"] * bool(only_train) +
                         [f"only in test: {_names(only_test)}"] * bool(only_test))
        raise DataError(f"image folder: the class folders of {path}/train and {path}/test differ ({diff}); both "
                        "need the same class folders")
    wanted = f"looked for {', '.join(IMAGE_EXTENSIONS)} files, also in subfolders"
    reference = None   # (size, file): without image_size every image must have the first one's size
    out = []
    for split in ("train", "test"):
        images, labels = [], []
        for label, name in enumerate(names):
            files = _image_files(path / split / name)
            if not files and split == "train":
                raise DataError(f"image folder: {path}/train/{name} holds no images ({wanted}); every class needs "
                                "training images")
            for f in files:
                try:
                    with Image.open(f) as opened:
                        im = opened.convert("RGB")
                    if image_size:
                        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
                    pixels = np.asarray(im, dtype=np.uint8)
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    raise DataError(f"{f}: not a readable image ({type(e).__name__}: {_first_line(e)}); remove it "
                                    "or replace it") from None
                if reference is None:
                    reference = (im.size, f)
                elif not image_size and im.size != reference[0]:
                    (w, h), (rw, rh) = im.size, reference[0]
                    raise DataError(f"image folder: {f} is {w}x{h} pixels (width x height) but {reference[1]} is "
                                    f"{rw}x{rh}; without data.image_size every image must have one size (set "
                                    "data.image_size to resize all of them once to that square size)")
                images.append(pixels)
                labels.append(label)
        if not images:
            raise DataError(f"image folder: {path}/{split} holds no images in its class folders ({wanted})")
        out.append(Split(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                         torch.tensor(labels, dtype=torch.int64)))
    return out[0], out[1], DatasetInfo("imagefolder", len(names), tuple(out[0].images.shape[1:]), tuple(names))


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _npz_images(f: Path, key: str, x: np.ndarray) -> np.ndarray:
    """uint8 [N, C, H, W] from [N, H, W, C], [N, C, H, W] (the 1- or 3-channel axis; the last wins) or [N, H, W]."""
    if x.dtype != np.uint8:
        raise DataError(f"{f}: {key} is {x.dtype}, expected uint8 pixel values 0..255 (from floats in [0, 1]: "
                        "(x * 255).round().astype(numpy.uint8))")
    shape = x.shape
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        x = None
    if x is None or min(x.shape[2:]) == 0:
        raise DataError(f"{f}: {key} has shape {_shape_text(shape)}; expected [N, H, W, C] or [N, C, H, W] with "
                        "C = 1 or 3 channels, or [N, H, W] (grayscale)")
    if len(x) == 0:
        raise DataError(f"{f}: {key} holds no images (shape {_shape_text(shape)})")
    return np.ascontiguousarray(x)


def _npz_labels(f: Path, key: str, y: np.ndarray, n: int, images_key: str) -> np.ndarray:
    """int64 [N] from integer [N] or Keras' [N, 1]."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dtype.kind not in "iu":
        raise DataError(f"{f}: {key} is {y.dtype}, expected integer class indices 0, 1, 2, ... "
                        "(y.astype(numpy.int64) if they are whole numbers)")
    if y.ndim != 1:
        raise DataError(f"{f}: {key} has shape {_shape_text(y.shape)}, expected [N] class indices (one-hot "
                        "labels: store y.argmax(1))")
    if len(y) != n:
        raise DataError(f"{f}: {key} has {len(y):,} labels but {images_key} has {n:,} images; expected one label "
                        "per image")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{f}: {key} holds negative labels (min {int(y.min())}); expected class indices 0 .. "
                        "num_classes - 1")
    return y.astype(np.int64)


def _load_npz(root: str) -> tuple[Split, Split, DatasetInfo]:
    f = resolve_root(root, "npz")
    if f.is_dir():
        raise DataError(f'{f}: is a folder; data.dataset = "npz" reads data.root as the .npz file (with '
                        f"{NPZ_LAYOUT})")
    if not f.is_file():
        raise DataError(f'{f}: no such .npz file (data.dataset = "npz" reads data.root as the file, with '
                        f"{NPZ_LAYOUT})")
    try:
        archive = np.load(f, allow_pickle=False)
    except Exception as e:   # not a zip / npy, truncated: one line
        raise DataError(f"{f}: not a readable .npz file ({type(e).__name__}: {_first_line(e)}); write it with "
                        "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{f}: holds one array (a .npy file), expected an .npz archive with {NPZ_LAYOUT} "
                        "(numpy.savez)")
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise DataError(f"{f}: no array '{missing[0]}' (expected {', '.join(NPZ_KEYS)}; the file holds "
                            f"{_names(archive.files)})")
        arrays = {}
        for k in NPZ_KEYS + (("classes",) if "classes" in archive.files else ()):
            try:
                arrays[k] = archive[k]
            except Exception as e:   # object arrays (pickles) are refused, truncated members
                raise DataError(f"{f}: array '{k}' could not be read ({type(e).__name__}: {_first_line(e)})") from None
    x = {s: _npz_images(f, f"x_{s}", arrays[f"x_{s}"]) for s in ("train", "test")}
    y = {s: _npz_labels(f, f"y_{s}", arrays[f"y_{s}"], len(x[s]), f"x_{s}") for s in ("train", "test")}
    if x["train"].shape[1:] != x["test"].shape[1:]:
        raise DataError(f"{f}: x_train images are {'x'.join(map(str, x['train'].shape[1:]))} (CxHxW) but x_test "
                        f"images are {'x'.join(map(str, x['test'].shape[1:]))}; both splits need one image shape")
    top = max(int(y["train"].max()), int(y["test"].max()))
    if "classes" in arrays:
        names = arrays["classes"]
        if names.ndim != 1:
            raise DataError(f"{f}: classes has shape {_shape_text(names.shape)}, expected [num_classes] names")
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
        if len(classes) <= top:
            raise DataError(f"{f}: the labels go up to {top} but classes names {len(classes)}; expected one name per "
                            "class index 0 .. largest label")
    else:
        classes = tuple(str(i) for i in range(top + 1))
    if len(classes) < 2:
        raise DataError(f"{f}: {len(classes)} class (every label is 0); a classifier needs at least 2")
    train, test = (Split(torch.from_numpy(x[s]), torch.from_numpy(y[s])) for s in ("train", "test"))
    return train, test, DatasetInfo("npz", len(classes), tuple(int(v) for v in x["train"].shape[1:]), classes)


def train_val_split(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    if val_size >= len(train):
        raise DataError(f"data.val_size = {val_size} leaves no training images (have {len(train)})")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    return (Split(train.images[train_idx], train.labels[train_idx]),
            Split(train.images[val_idx], train.labels[val_idx]))


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(255.0)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and horizontal flip, for a whole batch at once."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    # One gather for the whole batch: row/column indices per image.
    rows = (dy.view(n, 1) + torch.arange(h, device=images.device).view(1, h))      # [n, h]
    cols = (dx.view(n, 1) + torch.arange(w, device=images.device).view(1, w))      # [n, w]
    flip = torch.rand(n, generator=generator).to(images.device) < 0.5
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    idx_r = rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, idx_r)
    idx_c = cols.view(n, 1, 1, w).expand(n, c, h, w)
    return out.gather(3, idx_c)


def batches(split: Split, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            augment_images: bool = False, device="cpu"):
    """Yield (float images in [0,1], labels) on ``device``; the last partial batch is kept."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        x = to_float(split.images[idx].to(device, non_blocking=True))
        if augment_images:
            x = augment(x, generator)
        yield x, split.labels[idx].to(device, non_blocking=True)
