"""CIFAR-10 as uint8 tensors: loaded once, split once, augmented in batches on the training device."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.paths import home_cache

DATA_ROOT_ENV = "PIPELINE_DATA_ROOT"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(UserError, RuntimeError):
    pass


@dataclass
class Split:
    images: torch.Tensor   # uint8 [N, 3, 32, 32]
    labels: torch.Tensor   # int64 [N]

    def __len__(self):
        return len(self.labels)

    def subset(self, n: int, seed: int) -> "Split":
        if n <= 0 or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return Split(self.images[idx], self.labels[idx])


def resolve_root(root: str) -> Path:
    """data.root, else $PIPELINE_DATA_ROOT, else ~/.cache/pipeline/data (HomeMissing without a home folder)."""
    if root:
        return Path(root).expanduser()
    return home_cache(DATA_ROOT_ENV, "data", what="CIFAR-10 folder",
                      hint="a folder holding cifar-10-batches-py (or set data.root)")


def load_cifar10(root: str = "", download: bool = True) -> tuple[Split, Split]:
    """(train 50k, test 10k) through torchvision, whose integrity check guards the files."""
    from torchvision.datasets import CIFAR10

    path = resolve_root(root)
    have = (path / "cifar-10-batches-py").is_dir()
    if not have and not download:
        raise DataError(f"CIFAR-10 not found: {path}/cifar-10-batches-py is missing and data.download = false "
                        f"(set data.root or ${DATA_ROOT_ENV})")
    if have:
        verify_cifar10_files(path / CIFAR10.base_folder, CIFAR10.train_list + CIFAR10.test_list +
                             [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]])
    try:
        splits = [CIFAR10(str(path), train=t, download=not have and download) for t in (True, False)]
    except Exception as e:  # torchvision raises URLError/RuntimeError variants; one line is what the user needs
        raise DataError(f"CIFAR-10 could not be loaded from {path} (download={'yes' if not have else 'no'}): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                        f"(set data.root or ${DATA_ROOT_ENV} to a folder holding cifar-10-batches-py)") from None
    out = []
    for ds in splits:
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out.append(Split(images, torch.tensor(ds.targets, dtype=torch.int64)))
    return out[0], out[1]


def verify_cifar10_files(folder: Path, expected: list) -> None:
    """Every file of the release present with its published MD5; else one line naming the file."""
    import hashlib

    for name, md5 in expected:
        f = folder / name
        if not f.is_file():
            raise DataError(f"{f}: missing from the CIFAR-10 folder (expected md5 {md5}); copy the complete "
                            "cifar-10-batches-py folder, or remove it and set data.download = true")
        digest = hashlib.md5(f.read_bytes()).hexdigest()
        if digest != md5:
            raise DataError(f"{f}: damaged (md5 {digest}, expected {md5}, {f.stat().st_size:,} bytes); replace it "
                            "from an intact copy, or remove the folder and set data.download = true")


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
