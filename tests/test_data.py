"""The data layer: Fashion-MNIST from IDX files, ImageFolder, held-out splits, batching."""

from __future__ import annotations

import gzip
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from depthcompress.data import (
    FASHION_MNIST_DEB,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    ImageTensors,
    augmentation,
    batches,
    cifar10,
    fashion_mnist,
    fetch,
    fingerprint,
    holdout_indices,
    image_folder,
    load_split,
    load_test,
    sample_shape,
    split_dataset,
)
from depthcompress.errors import DepthCompressError


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file of unsigned bytes (the MNIST format), gzipped."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(root: Path, n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte.gz", images)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels)
    return images, labels


def make_image_folder(root: Path, classes: int = 2, per_class: int = 6, size: int = 12) -> Path:
    """A tiny ImageFolder of random PNGs: root/<class>/<n>.png."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{k}.png")
    return root


def test_holdout_split_is_deterministic_disjoint_and_complete() -> None:
    train, held = holdout_indices(100, 30, seed=3)
    assert len(held) == 30 and len(train) == 70
    assert sorted(torch.cat([train, held]).tolist()) == list(range(100))
    assert torch.equal(held, held.sort().values)
    again = holdout_indices(100, 30, seed=3)
    assert torch.equal(again[1], held)
    assert not torch.equal(holdout_indices(100, 30, seed=4)[1], held)


@pytest.mark.parametrize("size", [0, 100, 101, -1])
def test_holdout_split_refuses_impossible_sizes(size: int) -> None:
    with pytest.raises(DataError, match="held-out split"):
        holdout_indices(100, size, seed=0)


def test_split_dataset_records_size_seed_and_fingerprint() -> None:
    x, y = torch.randn(40, 1, 4, 4), torch.arange(40) % 3
    split = split_dataset(TensorDataset(x, y), holdout=10, seed=1, name="mine")
    assert len(split.train) == 30 and len(split.holdout) == 10
    assert split.info["holdout"] == 10 and split.info["holdout_seed"] == 1
    assert split.info["name"] == "mine" and split.info["size"] == 40
    assert split.info["fingerprint"] == fingerprint(TensorDataset(x.clone(), y.clone()))
    assert split.info["fingerprint"] != fingerprint(TensorDataset(x + 1, y))
    held = set(split.holdout.indices.tolist())
    assert held.isdisjoint(split.train.indices.tolist())


def test_idx_reader_and_normalisation(tmp_path: Path) -> None:
    images, labels = fake_fashion(tmp_path)
    ds = fashion_mnist("train", root=tmp_path)
    assert len(ds) == 50 and ds.images.shape == (50, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and y == int(labels[3])
    expected = (images[3].astype(np.float32) / 255 - 0.2860) / 0.3530
    assert np.allclose(x[0].numpy(), expected, atol=1e-6)


def test_truncated_idx_file_is_reported(tmp_path: Path) -> None:
    fake_fashion(tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz") as fh:
        raw = fh.read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(raw[:-10])
    with pytest.raises(DataError, match="truncated"):
        fashion_mnist("train", root=tmp_path)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        fashion_mnist("train", root=tmp_path / "nothing")
    msg = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert "ImageFolder" in msg and "--download" in msg
    assert isinstance(err.value, DepthCompressError)


def test_fashion_mnist_from_the_debian_package() -> None:
    if not (FASHION_MNIST_DEB / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            "Debian package dataset-fashion-mnist is not installed (apt-get install -y ...)"
        )
    train = fashion_mnist("train")
    test = fashion_mnist("test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.num_classes == 10
    x, _ = train.batch(torch.arange(2000))
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05
    split = load_split("fashion-mnist", holdout=10000, seed=0)
    assert split.info["name"] == "fashion-mnist:train"
    assert len(split.train) == 50000 and len(split.holdout) == 10000


def test_image_folder_prefers_train_and_applies_views(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "set" / "train")
    make_image_folder(tmp_path / "set" / "val", per_class=1)
    ds = image_folder(tmp_path / "set")
    assert len(ds) == 12 and ds.classes == ["class0", "class1"]
    x, _ = ds[0]
    assert x.shape == (3, 12, 12)
    gray = image_folder(tmp_path / "set", channels=1, image_size=8, train=False)
    assert gray[0][0].shape == (1, 8, 8)
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "missing")


def test_small_images_train_on_padded_random_crops_and_flips(tmp_path: Path) -> None:
    """32×32 images: CIFAR's recipe (4 px padding, random crop, flip) for training, nothing for
    evaluation, and the recorded data description says so."""
    from PIL import Image
    from torchvision import transforms

    make_image_folder(tmp_path / "cifar", classes=2, per_class=4, size=32)
    split = load_split(str(tmp_path / "cifar"), holdout=2, seed=0)
    assert split.info["augmentation"] == (
        "random crop 32x32 with 4 px padding + horizontal flip (small images)"
    )
    path, _ = split.train.dataset.samples[int(split.train.indices[0])]
    with Image.open(path) as img:
        exact = transforms.ToTensor()(img.convert("RGB"))
    exact = (exact - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[
        :, None, None
    ]
    zero = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)  # a padded pixel
    torch.manual_seed(0)
    views = [split.train[0][0] for _ in range(40)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(v, exact) for v in views)
    padded = [
        v for v in views if torch.allclose(v[:, 0, 0], zero) or torch.allclose(v[:, -1, -1], zero)
    ]
    assert padded, "no view shows the zero padding of a shifted crop"
    held = split.holdout
    first = held[0][0]
    assert all(torch.equal(held[0][0], first) for _ in range(5))  # evaluation: no augmentation
    steps, text = augmentation((32, 32), 16, train=True)
    assert [type(t).__name__ for t in steps] == [
        "Resize",
        "CenterCrop",
        "RandomCrop",
        "RandomHorizontalFlip",
    ]
    assert steps[2].padding == 2 and "2 px padding" in text


def test_large_images_keep_the_imagenet_recipe() -> None:
    steps, text = augmentation((200, 300), None, train=True)
    assert [type(t).__name__ for t in steps] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert steps[0].size == (200, 300) and "large images" in text
    assert augmentation((200, 300), None, train=False) == ([], "none")
    steps, _ = augmentation((200, 300), 96, train=False)
    assert [type(t).__name__ for t in steps] == ["Resize", "CenterCrop"]
    assert steps[0].size == 96 * 256 // 224


def test_load_split_on_image_folder_is_path_independent(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    sa = load_split(str(tmp_path / "a"), holdout=4, seed=0, image_size=8)
    sb = load_split(str(tmp_path / "b"), holdout=4, seed=0, image_size=8)
    assert sa.info["name"] == "imagefolder" and sa.info["root"] != sb.info["root"]
    assert sa.info["fingerprint"] == sb.info["fingerprint"]
    assert len(sa.train) == 8 and len(sa.holdout) == 4
    assert sample_shape(sa.holdout) == (3, 8, 8)
    with pytest.raises(DataError, match="neither 'fashion-mnist' nor an ImageFolder"):
        load_split(str(tmp_path / "none"), holdout=4)


def test_batches_agree_across_dataset_kinds(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (20, 1, 5, 5), dtype=torch.uint8)
    labels = torch.arange(20) % 4
    fast = ImageTensors(images, labels, 0.5, 0.25)
    plain = TensorDataset((images.float() / 255 - 0.5) / 0.25, labels)
    order = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    a = list(batches(split_dataset(fast, holdout=5, seed=0).train, order, 3))
    b = list(batches(split_dataset(plain, holdout=5, seed=0).train, order, 3))
    assert [len(y) for _, y in a] == [3, 3, 2]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.allclose(xa, xb) and torch.equal(ya, yb)
    make_image_folder(tmp_path / "f")
    folder = split_dataset(image_folder(tmp_path / "f"), holdout=2, seed=0)
    x, y = fetch(folder.train, torch.tensor([0, 1]))
    assert x.shape == (2, 3, 12, 12) and y.dtype == torch.int64
    loaded = list(batches(folder.train, torch.arange(10), 4, num_workers=1))
    assert [len(y) for _, y in loaded] == [4, 4, 2]


def test_download_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    calls = []

    def fake_download(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        fake_fashion(Path(root) / "FashionMNIST" / "raw", n=7)

    monkeypatch.setenv("DEPTHCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    with pytest.raises(DataError):
        fashion_mnist("train", root=tmp_path / "none")
    assert calls == []
    ds = fashion_mnist("train", root=tmp_path / "none", download=True)
    assert calls == [(str(tmp_path / "cache"), True, True)] and len(ds) == 7


def make_cifar_archive(path: Path, work: Path) -> Path:
    """A tiny archive with the CIFAR-10 JPEG layout: cifar10/{train,test}/<class>/N.jpg, 2
    classes × 3 images of 32×32."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = work / "cifar10" / split / cls
            folder.mkdir(parents=True)
            for k in range(3):
                pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k:04d}.jpg")
    with tarfile.open(path, "w:gz") as tar:
        tar.add(work / "cifar10", arcname="cifar10")
    return path


def test_cifar10_is_extracted_once_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_cifar_archive(tmp_path / "cifar10-jpeg.tar.gz", tmp_path / "src")
    monkeypatch.setenv("DEPTHCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DEPTHCOMPRESS_CIFAR10", str(tmp_path))
    train = cifar10("train")
    assert len(train) == 6 and train.classes == ["cat", "dog"]
    assert train[0][0].shape == (3, 32, 32)
    assert Path(train.root).is_relative_to(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["cifar10-jpeg"]  # no temp left
    archive.unlink()  # a second call must not need (or re-extract) the archive
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("extracted twice"))
    test = cifar10("test")
    assert len(test) == 6 and all(torch.equal(test[0][0], test[0][0]) for _ in range(3))
    split = load_split("cifar10", holdout=2, seed=0)
    assert split.info["name"] == "cifar10:train" and len(split.train) == 4
    assert "random crop 32x32 with 4 px padding" in split.info["augmentation"]
    assert len(load_test("CIFAR-10")) == 6


def test_missing_cifar10_archive_names_the_env_var_and_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEPTHCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DEPTHCOMPRESS_CIFAR10", str(tmp_path / "elsewhere"))
    monkeypatch.setattr("depthcompress.data.SHARED_DATA", tmp_path / "shared" / "data")
    with pytest.raises(DataError) as err:
        cifar10("train")
    msg = str(err.value)
    assert "cifar10-jpeg.tar.gz" in msg and "$DEPTHCOMPRESS_CIFAR10" in msg
    assert str(tmp_path / "elsewhere") in msg and str(tmp_path / "shared" / "data") in msg
    assert not (tmp_path / "cache" / "cifar10-jpeg").exists()


def test_a_wrong_cifar10_archive_leaves_nothing_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image_folder(tmp_path / "other")
    with tarfile.open(tmp_path / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "other", arcname="other")
    monkeypatch.setenv("DEPTHCOMPRESS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no cifar10/train/ folder"):
        cifar10("train", root=tmp_path)
    assert list((tmp_path / "cache").iterdir()) == []
