"""data.dataset beyond CIFAR-10: CIFAR-100 and SVHN in torchvision's file layout, the user's image folders and .npz
files, all made here (tiny, synthetic: no download, no real data). Every error is one line naming the file."""
import hashlib
import pickle

import numpy as np
import pytest
import torch

from pipeline.train.data import (CIFAR100_CLASSES, DATA_ROOT_ENV, FIXED_INFO, DataError, DatasetInfo, augment,
                                 load_dataset, resolve_root)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- CIFAR-100 (torchvision's layout)

def write_cifar100(root, n_train=20, n_test=10, seed=0):
    """cifar-100-python/{train,test,meta} as the release pickles them: dicts of filenames, data (rows of 3072 bytes:
    R plane, G plane, B plane), fine_labels and coarse_labels. The release was pickled by Python 2, whose str keys
    torchvision's ``pickle.load(encoding="latin1")`` reads as str (b'data' only with encoding="bytes"): str keys here."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    data = {}
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"filenames": [f"{name}_{i}.png" for i in range(n)],
                 "batch_label": f"{name}ing batch 1 of 1",
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                 "coarse_labels": [int(v) for v in rng.integers(0, 20, n)]}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        data[name] = entry
    meta = {"fine_label_names": [f"fine{i:02d}" for i in range(100)],
            "coarse_label_names": [f"coarse{i:02d}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, data


@pytest.fixture
def cifar100_files(tmp_path, monkeypatch):
    """Synthetic CIFAR-100 files, with the published MD5s that torchvision (and our own check) compare against
    replaced, for this test only, by the MD5s of these files: the integrity check itself still runs."""
    from torchvision.datasets import CIFAR100

    folder, data = write_cifar100(tmp_path)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5(folder / "meta")})
    return tmp_path, folder, data


def test_cifar100_loads_fine_labels_channels_first(cifar100_files):
    root, _, data = cifar100_files
    train, test, info = load_dataset("cifar100", str(root), download=False)
    assert tuple(train.images.shape) == (20, 3, 32, 32) and tuple(test.images.shape) == (10, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert train.labels.tolist() == data["train"]["fine_labels"]          # fine, not coarse
    assert test.labels.tolist() == data["test"]["fine_labels"]
    # row layout: 1024 red, 1024 green, 1024 blue bytes, each row-major 32x32
    assert torch.equal(train.images[3], torch.from_numpy(data["train"]["data"][3].reshape(3, 32, 32)))
    assert info == DatasetInfo("cifar100", 100, (3, 32, 32), tuple(f"fine{i:02d}" for i in range(100)))


def test_cifar100_damaged_and_missing_files_name_the_file(cifar100_files):
    root, folder, _ = cifar100_files
    expected = md5(folder / "test")
    (folder / "test").write_bytes((folder / "test").read_bytes()[:500])
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", str(root), download=False)
    msg = one_line(e)
    assert msg.startswith(f"{folder / 'test'}: damaged (md5 ") and f"expected {expected}, 500 bytes" in msg
    (folder / "meta").unlink()
    (folder / "test").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", str(root), download=False)
    assert one_line(e).startswith(f"{folder / 'test'}: missing from the CIFAR-100 folder (expected md5 {expected}); "
                                  "copy the complete cifar-100-python folder")


def test_cifar100_absent_offline(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", str(tmp_path), download=False)
    assert one_line(e) == (f"CIFAR-100 not found: {tmp_path}/cifar-100-python is missing and data.download = false "
                           "(set data.root or $PIPELINE_DATA_ROOT)")


def test_cifar100_fixed_info_is_the_release():
    info = FIXED_INFO["cifar100"]
    assert info.num_classes == len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)      # the release's names are in alphabetical order
    assert CIFAR100_CLASSES[:3] == ("apple", "aquarium_fish", "baby") and CIFAR100_CLASSES[-1] == "worm"


# --------------------------------------------------------------------------- SVHN (torchvision's layout)

def write_svhn(root, n_train=12, n_test=7, seed=1):
    """train_32x32.mat / test_32x32.mat as the release stores them: X [32, 32, 3, N] uint8, y [N, 1] with 10 for 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        savemat(str(root / f"{name}_32x32.mat"), {"X": x, "y": y})
        out[name] = (x, y)
    return out


@pytest.fixture
def svhn_files(tmp_path, monkeypatch):
    """Synthetic SVHN files, their MD5s put in place of the published ones for this test (see cifar100_files)."""
    from torchvision.datasets import SVHN

    data = write_svhn(tmp_path)
    split_list = {k: list(v) for k, v in SVHN.split_list.items()}
    for name in ("train", "test"):
        split_list[name][2] = md5(tmp_path / f"{name}_32x32.mat")
    monkeypatch.setattr(SVHN, "split_list", split_list)
    return tmp_path, data


def test_svhn_loads_digits_zero_to_nine(svhn_files):
    root, data = svhn_files
    train, test, info = load_dataset("svhn", str(root), download=False)
    assert tuple(train.images.shape) == (12, 3, 32, 32) and tuple(test.images.shape) == (7, 3, 32, 32)
    assert train.images.is_contiguous() and train.images.dtype == torch.uint8
    x, y = data["train"]
    assert train.labels.tolist() == [int(v) % 10 for v in y[:, 0]] and train.labels[0] == 0   # the files' 10 is 0
    assert 0 <= int(train.labels.min()) and int(train.labels.max()) <= 9
    # X[h, w, c, n] is images[n, c, h, w]
    assert torch.equal(train.images[5], torch.from_numpy(x[:, :, :, 5].transpose(2, 0, 1).copy()))
    assert info == DatasetInfo("svhn", 10, (3, 32, 32), tuple("0123456789")) == FIXED_INFO["svhn"]


def test_svhn_damaged_file(svhn_files):
    root, _ = svhn_files
    f = root / "train_32x32.mat"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError) as e:
        load_dataset("svhn", str(root), download=False)
    msg = one_line(e)
    assert msg.startswith(f"{f}: damaged (md5 ") and "remove it and set data.download = true" in msg


@pytest.mark.parametrize("present", [(), ("train",)])
def test_svhn_absent_offline_names_the_file(tmp_path, present):
    for name in present:
        (tmp_path / f"{name}_32x32.mat").write_bytes(b"x")
    missing = "test" if present else "train"
    with pytest.raises(DataError) as e:
        load_dataset("svhn", str(tmp_path), download=False)
    assert one_line(e) == (f"SVHN not found: {tmp_path}/{missing}_32x32.mat is missing and data.download = false "
                           "(set data.root or $PIPELINE_DATA_ROOT)")


# --------------------------------------------------------------------------- image folders

def png(path, size=(8, 8), color=(0, 0, 0), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)


def image_tree(root, classes=("cat", "dog", "emu"), per_class=(3, 2), size=(8, 8)):
    """root/{train,test}/<class>/<i>.png; class k's images are filled with the colour (10k, 20k, 30k)."""
    for split, n in zip(("train", "test"), per_class):
        for k, name in enumerate(classes):
            for i in range(n):
                png(root / split / name / f"{i}.png", size, (10 * k, 20 * k, 30 * k))
    return root


def test_imagefolder_three_classes(tmp_path):
    root = image_tree(tmp_path / "imgs")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")          # other files are ignored
    (root / "train" / ".cache").mkdir()                                         # hidden entries are no class
    png(root / "train" / "dog" / "more" / "deep.png", color=(10, 20, 30))       # subfolders of a class count
    png(root / "train" / "cat" / "gray.png", mode="L", color=(7,))              # grayscale is read as RGB
    train, test, info = load_dataset("imagefolder", str(root))
    assert info == DatasetInfo("imagefolder", 3, (3, 8, 8), ("cat", "dog", "emu"))
    assert tuple(train.images.shape) == (3 + 1 + 3 + 1 + 3, 3, 8, 8) and tuple(test.images.shape) == (6, 3, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 3
    assert test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # channels-first, the class colour in each channel
    assert train.images[-1, :, 4, 4].tolist() == [20, 40, 60] and test.images[2, :, 0, 0].tolist() == [10, 20, 30]
    gray = train.images[3]   # cat/gray.png sorts after cat/0-2.png
    assert gray.unique().tolist() == [7]


def test_imagefolder_mixed_sizes_need_image_size(tmp_path):
    root = image_tree(tmp_path)
    png(root / "test" / "dog" / "big.png", size=(12, 10))
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", str(root))
    assert one_line(e) == (f"image folder: {root}/test/dog/big.png is 12x10 pixels (width x height) but "
                           f"{root}/train/cat/0.png is 8x8; without data.image_size every image must have one size "
                           "(set data.image_size to resize all of them once to that square size)")
    train, test, info = load_dataset("imagefolder", str(root), image_size=5)
    assert tuple(train.images.shape[1:]) == tuple(test.images.shape[1:]) == (3, 5, 5) == info.shape
    assert test.images[4, :, 2, 2].tolist() == [0, 0, 0] and test.images[3, :, 2, 2].tolist() == [10, 20, 30]
    assert len(test) == 7


def test_imagefolder_one_class(tmp_path):
    root = image_tree(tmp_path, classes=("only",))
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", str(root))
    assert one_line(e) == (f"image folder: {root}/train holds 1 class folder (only); a classifier needs at least 2 "
                           f"({root}/train/<class>/<images> and {root}/test/<class>/<images>)")


def test_imagefolder_class_sets_differ(tmp_path):
    root = image_tree(tmp_path)
    png(root / "test" / "fox" / "0.png")
    import shutil
    shutil.rmtree(root / "test" / "cat")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", str(root))
    assert one_line(e) == (f"image folder: the class folders of {root}/train and {root}/test differ (only in train: "
                           "cat; only in test: fox); both need the same class folders")


def test_imagefolder_missing_split_and_empty_class(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", str(tmp_path))
    assert one_line(e).startswith(f"image folder: {tmp_path}/train is missing (data.dataset = \"imagefolder\" reads ")
    root = image_tree(tmp_path)
    for f in (root / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", str(root))
    assert one_line(e) == (f"image folder: {root}/train/dog holds no images (looked for .bmp, .gif, .jpeg, .jpg, "
                           ".pgm, .png, .ppm, .tif, .tiff, .webp files, also in subfolders); every class needs "
                           "training images")


def test_imagefolder_unreadable_image(tmp_path):
    root = image_tree(tmp_path)
    bad = root / "train" / "emu" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", str(root))
    msg = one_line(e)
    assert msg.startswith(f"{bad}: not a readable image (UnidentifiedImageError: ") and msg.endswith("replace it")


# --------------------------------------------------------------------------- .npz files

def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def nhwc(n, h=6, w=5, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def good(**changes):
    arrays = {"x_train": nhwc(9), "y_train": np.array([0, 1, 2] * 3), "x_test": nhwc(4, seed=1),
              "y_test": np.array([2, 1, 0, 1], dtype=np.uint8)}
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


def test_npz_nhwc_three_classes(tmp_path):
    arrays = good()
    train, test, info = load_dataset("npz", str(npz(tmp_path / "d.npz", **arrays)))
    assert info == DatasetInfo("npz", 3, (3, 6, 5), ("0", "1", "2"))
    assert tuple(train.images.shape) == (9, 3, 6, 5) and train.images.is_contiguous()
    assert torch.equal(train.images, torch.from_numpy(arrays["x_train"]).permute(0, 3, 1, 2))
    assert test.labels.dtype == torch.int64 and test.labels.tolist() == [2, 1, 0, 1]


def test_npz_other_layouts_and_names(tmp_path):
    x = nhwc(9).transpose(0, 3, 1, 2)                          # NCHW
    f = npz(tmp_path / "nchw.npz", **good(x_train=x, x_test=x[:4], y_train=np.arange(9).reshape(9, 1) % 4,
                                           classes=np.array(["a", "b", "c", "d"])))
    train, _, info = load_dataset("npz", str(f))
    assert torch.equal(train.images, torch.from_numpy(x)) and info.classes == ("a", "b", "c", "d")
    assert info.num_classes == 4 and train.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0]   # Keras' [N, 1] labels
    gray = nhwc(9, c=1)[..., 0]                                # [N, H, W]
    train, test, info = load_dataset("npz", str(npz(tmp_path / "g.npz", **good(x_train=gray, x_test=gray[:4]))))
    assert info.shape == (1, 6, 5) and tuple(test.images.shape) == (4, 1, 6, 5)
    assert torch.equal(train.images[:, 0], torch.from_numpy(gray))


def npz_error(tmp_path, **changes):
    f = npz(tmp_path / "d.npz", **good(**changes))
    with pytest.raises(DataError) as e:
        load_dataset("npz", str(f))
    return f, one_line(e)


def test_npz_missing_key(tmp_path):
    f, msg = npz_error(tmp_path, y_test=None)
    assert msg == f"{f}: no array 'y_test' (expected x_train, y_train, x_test, y_test; the file holds x_train, " \
                  "y_train, x_test)"


def test_npz_negative_labels(tmp_path):
    f, msg = npz_error(tmp_path, y_train=np.array([0, 1, 2, -1, 0, 1, 2, 0, 1]))
    assert msg == f"{f}: y_train holds negative labels (min -1); expected class indices 0 .. num_classes - 1"


def test_npz_not_uint8(tmp_path):
    f, msg = npz_error(tmp_path, x_test=nhwc(4).astype(np.float32) / 255)
    assert msg == (f"{f}: x_test is float32, expected uint8 pixel values 0..255 (from floats in [0, 1]: "
                   "(x * 255).round().astype(numpy.uint8))")


def test_npz_labels_not_integers_or_wrong_length(tmp_path):
    f, msg = npz_error(tmp_path, y_test=np.array([2.0, 1.0, 0.0, 1.0]))
    assert msg == (f"{f}: y_test is float64, expected integer class indices 0, 1, 2, ... (y.astype(numpy.int64) if "
                   "they are whole numbers)")
    f, msg = npz_error(tmp_path, y_train=np.array([0, 1, 2]))
    assert msg == f"{f}: y_train has 3 labels but x_train has 9 images; expected one label per image"
    f, msg = npz_error(tmp_path, y_train=np.eye(3, dtype=np.int64)[[0, 1, 2] * 3])
    assert msg == f"{f}: y_train has shape [9, 3], expected [N] class indices (one-hot labels: store y.argmax(1))"


def test_npz_shapes_differ_and_bad_layout(tmp_path):
    f, msg = npz_error(tmp_path, x_test=nhwc(4, h=7))
    assert msg == f"{f}: x_train images are 3x6x5 (CxHxW) but x_test images are 3x7x5; both splits need one image shape"
    f, msg = npz_error(tmp_path, x_train=nhwc(9, c=4))
    assert msg == (f"{f}: x_train has shape [9, 6, 5, 4]; expected [N, H, W, C] or [N, C, H, W] with C = 1 or 3 "
                   "channels, or [N, H, W] (grayscale)")


def test_npz_classes_and_single_class(tmp_path):
    f, msg = npz_error(tmp_path, classes=np.array(["a", "b"]))
    assert msg == f"{f}: the labels go up to 2 but classes names 2; expected one name per class index 0 .. largest label"
    f, msg = npz_error(tmp_path, y_train=np.zeros(9, dtype=np.int64), y_test=np.zeros(4, dtype=np.int64))
    assert msg == f"{f}: 1 class (every label is 0); a classifier needs at least 2"


def test_npz_file_problems(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("npz", str(tmp_path / "absent.npz"))
    assert one_line(e) == (f'{tmp_path / "absent.npz"}: no such .npz file (data.dataset = "npz" reads data.root as '
                           "the file, with uint8 x_train, x_test and integer y_train, y_test)")
    with pytest.raises(DataError) as e:
        load_dataset("npz", str(tmp_path))
    assert one_line(e).startswith(f"{tmp_path}: is a folder; ")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip at all")
    with pytest.raises(DataError) as e:
        load_dataset("npz", str(tmp_path / "junk.npz"))
    assert one_line(e).startswith(f"{tmp_path / 'junk.npz'}: not a readable .npz file (")
    f = npz(tmp_path / "obj.npz", **good(classes=np.array(["a", None, "c"], dtype=object)))
    with pytest.raises(DataError) as e:
        load_dataset("npz", str(f))
    assert one_line(e).startswith(f"{f}: array 'classes' could not be read (ValueError: ")
    with pytest.raises(DataError) as e:
        load_dataset("npz", "")
    assert one_line(e).startswith('data.dataset = "npz" needs data.root = the path of the .npz file')


# --------------------------------------------------------------------------- the stages' view (setup.py)

def cfg_for(*overrides):
    from pipeline.config import load_config

    return load_config(None, list(overrides))


def test_data_splits_and_info_from_npz(tmp_path):
    from pipeline.train import setup

    arrays = good(x_train=nhwc(40, c=1), y_train=np.arange(40) % 3, x_test=nhwc(10, c=1), y_test=np.arange(10) % 3)
    f = npz(tmp_path / "d.npz", **arrays)
    cfg = cfg_for("data.dataset=npz", f"data.root={str(f)!r}", "data.val_size=8", "data.test_subset=6")
    train, val, test = setup.data_splits(cfg)
    assert (len(train), len(val), len(test)) == (32, 8, 6)
    assert tuple(train.images.shape[1:]) == (1, 6, 5)
    assert setup.data_info(cfg) == DatasetInfo("npz", 3, (1, 6, 5), ("0", "1", "2"))
    images, labels, _ = setup.eval_images(cfg)
    assert images.dtype == torch.float32 and images.shape[1:] == (1, 6, 5) and len(labels) == len(images)
    # the val_size check is against the file's real training-set size
    with pytest.raises(DataError) as e:
        setup.data_splits(cfg_for("data.dataset=npz", f"data.root={str(f)!r}", "data.val_size=40"))
    assert one_line(e) == "data.val_size = 40 leaves no training images (have 40)"


def test_cache_is_keyed_by_dataset_and_resolved_root(tmp_path, monkeypatch):
    from pipeline.train import setup

    a = image_tree(tmp_path / "a")
    b = image_tree(tmp_path / "b", classes=("x", "y"))
    monkeypatch.setenv(DATA_ROOT_ENV, str(a))
    cfg = cfg_for("data.dataset=imagefolder", "data.val_size=1")
    assert setup.data_info(cfg).classes == ("cat", "dog", "emu")
    monkeypatch.setenv(DATA_ROOT_ENV, str(b))                   # same setting (root ""), another folder now
    assert setup.data_info(cfg).classes == ("x", "y")
    assert setup.data_info(cfg_for("data.dataset=imagefolder", "data.val_size=1", "data.image_size=4")).shape == \
        (3, 4, 4)


def test_fixed_info_reads_no_files(tmp_path, monkeypatch):
    from pipeline.train import setup

    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "nothing-here"))
    for name in ("cifar10", "cifar100", "svhn"):
        info = setup.data_info(cfg_for(f"data.dataset={name}", "data.download=false"))
        assert info == FIXED_INFO[name] and info.shape == (3, 32, 32)
    assert FIXED_INFO["cifar10"].classes[0] == "airplane" and FIXED_INFO["svhn"].num_classes == 10


def test_home_missing_names_the_dataset(tmp_path, monkeypatch):
    from pipeline.core.paths import HomeMissing

    monkeypatch.setenv("HOME", str(tmp_path / "no-home"))
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    with pytest.raises(HomeMissing) as e:
        resolve_root("")
    assert "no default CIFAR-10 folder" in one_line(e) and "cifar-10-batches-py" in str(e.value)
    with pytest.raises(HomeMissing) as e:
        resolve_root("", "svhn")
    assert "no default SVHN folder" in one_line(e) and "train_32x32.mat and test_32x32.mat" in str(e.value)


def test_augment_any_size_and_channels():
    x = torch.arange(2 * 1 * 5 * 7, dtype=torch.float32).view(2, 1, 5, 7) + 1
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):   # a zero-padded crop (maybe flipped) of its own image: every non-zero value is from it
        vals = set(out[i].flatten().tolist()) - {0.0}
        assert vals and vals <= set(x[i].flatten().tolist())
