"""CIFAR-10 loading, splitting and augmentation on the real files ($PIPELINE_DATA_ROOT; see conftest.cifar_root)."""
import hashlib
import os

import pytest
import torch

from pipeline.train.data import DataError, Split, augment, batches, load_cifar10, train_val_split


@pytest.fixture(scope="module")
def cifar(cifar_root):
    return load_cifar10(str(cifar_root), download=False)


def digest(img: torch.Tensor) -> bytes:
    return hashlib.sha1(img.contiguous().numpy().tobytes()).digest()


def indexed(n: int) -> Split:
    """A Split whose 'images' are their own indices, so a split's membership can be read off exactly."""
    return Split(torch.arange(n), torch.arange(n))


# --------------------------------------------------------------------------- loading

def test_load_cifar10_shapes_and_labels(cifar):
    train, test = cifar
    assert train.images.dtype == torch.uint8 and test.images.dtype == torch.uint8
    assert tuple(train.images.shape) == (50000, 3, 32, 32)
    assert tuple(test.images.shape) == (10000, 3, 32, 32)
    assert train.images.is_contiguous()
    assert train.labels.dtype == torch.int64 and train.labels.shape == (50000,)
    assert test.labels.shape == (10000,)
    # CIFAR-10 is balanced: 5000 / 1000 per class, labels exactly 0..9
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # channels-first RGB: the three channels are different images, and values use the full range
    assert not torch.equal(train.images[:100, 0], train.images[:100, 2])
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0


def test_missing_root_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path / "nowhere"), download=False)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg


def test_root_from_environment(cifar_root, monkeypatch, cifar):
    # conftest / CI point $PIPELINE_DATA_ROOT at the data; root "" must use it.
    monkeypatch.setenv("PIPELINE_DATA_ROOT", str(cifar_root))
    from pipeline.train.data import resolve_root
    assert resolve_root("") == cifar_root
    assert resolve_root("/some/where") == type(cifar_root)("/some/where")


# --------------------------------------------------------------------------- train/val split

def test_train_val_split_sizes_and_disjoint_real(cifar):
    train, _ = cifar
    tr, va = train_val_split(train, 5000, seed=0)
    assert (len(tr), len(va)) == (45000, 5000)
    assert tr.images.shape == (45000, 3, 32, 32) and va.images.shape == (5000, 3, 32, 32)
    # together they are exactly the training set: per-class counts add up ...
    assert (torch.bincount(tr.labels, minlength=10) + torch.bincount(va.labels, minlength=10)).tolist() == [5000] * 10
    # ... and (by image content) no validation image appears in the training part
    train_hashes = {digest(img) for img in tr.images}
    val_hashes = [digest(img) for img in va.images[:1000]]
    assert not any(h in train_hashes for h in val_hashes)


def test_train_val_split_is_a_partition():
    full = indexed(1000)
    tr, va = train_val_split(full, 100, seed=3)
    tri, vai = set(tr.images.tolist()), set(va.images.tolist())
    assert len(tri) == 900 and len(vai) == 100
    assert not tri & vai and tri | vai == set(range(1000))
    assert torch.equal(tr.images, tr.labels)   # images and labels move together


def test_train_val_split_deterministic_per_seed():
    full = indexed(1000)
    a = train_val_split(full, 100, seed=0)
    b = train_val_split(full, 100, seed=0)
    c = train_val_split(full, 100, seed=1)
    assert torch.equal(a[1].images, b[1].images) and torch.equal(a[0].images, b[0].images)
    assert set(a[1].images.tolist()) != set(c[1].images.tolist())


def test_train_val_split_rejects_everything_held_out():
    with pytest.raises(DataError):
        train_val_split(indexed(10), 10, seed=0)


def test_subset_deterministic():
    s = indexed(500)
    a, b, c = s.subset(50, 0), s.subset(50, 0), s.subset(50, 1)
    assert len(a) == 50 and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert len(set(a.images.tolist())) == 50          # without replacement
    assert s.subset(0, 0) is s and s.subset(500, 0) is s and s.subset(10_000, 0) is s


# --------------------------------------------------------------------------- augmentation

def _candidates(img: torch.Tensor, pad: int = 4) -> list[torch.Tensor]:
    c, h, w = img.shape
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out += [crop, crop.flip(-1)]
    return out


def test_augment_is_a_padded_crop_maybe_flipped(cifar):
    train, _ = cifar
    x = train.images[:12].float() / 255
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    flips = 0
    for i in range(len(x)):
        cands = _candidates(x[i])
        hits = [k for k, cand in enumerate(cands) if torch.equal(out[i], cand)]
        assert hits, f"image {i}: output is no crop/flip of the zero-padded input"
        flips += all(k % 2 == 1 for k in hits)
    assert 0 < flips < len(x)   # both flipped and unflipped outputs occur


def _coded_batch(n: int) -> torch.Tensor:
    """Every pixel of channel 0 encodes its own (row, col) as 1 + 32*row + col, so crops can be decoded."""
    code = 1 + torch.arange(32).view(32, 1) * 32 + torch.arange(32).view(1, 32)
    img = torch.stack([code, -code, code * 2]).float()
    return img.expand(n, 3, 32, 32).contiguous()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_augment_offsets_and_flips_are_uniform(seed):
    n = 4000
    out = augment(_coded_batch(n), torch.Generator().manual_seed(seed))
    # Output pixel (16, 16) always comes from inside the original image (offsets move it by at most 4).
    v = out[:, 0, 16, 16].long() - 1
    row, col = v // 32, v % 32
    flipped = out[:, 0, 16, 17] < out[:, 0, 16, 16]
    assert set((row - 16).tolist()) == set(range(-4, 5))            # all 9 vertical offsets
    frac = flipped.float().mean().item()
    assert 0.45 < frac < 0.55, frac                                 # ~50% flips
    # per-offset frequency ~ 1/9 (binomial, n = 4000)
    counts = torch.bincount(row - 12, minlength=9).float() / n
    assert (counts - 1 / 9).abs().max() < 0.03, counts
    # unflipped: output col 16 reads original col 16 + dx - 4; flipped: col 15 + dx - 4; both in [11, 20]
    dx = torch.where(flipped, col - 15 + 4, col - 16 + 4)
    assert set(dx.tolist()) == set(range(9))
    assert (torch.bincount(dx, minlength=9).float() / n - 1 / 9).abs().max() < 0.03
    # the other channels went through the same crop
    assert torch.equal(out[:, 1], -out[:, 0]) and torch.equal(out[:, 2], 2 * out[:, 0])


def test_augment_deterministic_per_generator_seed():
    x = _coded_batch(64)
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_batches_cover_split_once(cifar):
    train, _ = cifar
    s = train.subset(130, 0)
    seen = []
    for x, y in batches(s, 64, shuffle=True, generator=torch.Generator().manual_seed(0)):
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        seen.append(y)
    assert [len(y) for y in seen] == [64, 64, 2]
    assert sorted(torch.cat(seen).tolist()) == sorted(s.labels.tolist())


@pytest.mark.parametrize("ci,outcome", [("true", "error"), ("", "skipped")])
def test_missing_data_fails_under_ci_and_skips_elsewhere(tmp_path, ci, outcome):
    """The cifar_root fixture (conftest) must never let CI pass silently without the data."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "CI": ci, "PIPELINE_DATA_ROOT": str(tmp_path / "absent")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           f"{Path(__file__).name}::test_load_cifar10_shapes_and_labels"],
                          cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=120)
    assert f"1 {outcome}" in proc.stdout, proc.stdout[-2000:]
    assert (proc.returncode != 0) == (outcome == "error")   # a fixture failure is reported as an error
    assert repo.is_dir()


@pytest.mark.parametrize("damage", ["truncate", "random", "swap", "missing"])
def test_damaged_batch_file_names_the_file_and_checksum(cifar_root, tmp_path, damage):
    """A copy of the release with one file damaged: one line naming that file and its published md5."""
    src = cifar_root / "cifar-10-batches-py"
    dst = tmp_path / "cifar-10-batches-py"
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    target = dst / "data_batch_3"
    target.unlink()
    if damage == "truncate":
        target.write_bytes((src / "data_batch_3").read_bytes()[:1000])
    elif damage == "random":
        target.write_bytes(os.urandom(2000))
    elif damage == "swap":
        target.symlink_to(src / "data_batch_4")     # an intact file of the release, under the wrong name
    with pytest.raises(DataError) as e:
        load_cifar10(str(tmp_path), download=False)
    msg = str(e.value)
    assert "\n" not in msg and str(target) in msg and "54ebc095f3ab1f0389bbae665268c751" in msg
    assert ("missing" if damage == "missing" else "damaged") in msg
