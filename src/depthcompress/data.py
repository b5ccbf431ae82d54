"""Training data for importance tables: Fashion-MNIST (the default, from the Debian package
``dataset-fashion-mnist``), CIFAR-10 (a JPEG archive extracted once into the cache), torchvision
``ImageFolder`` directories, or any ``Dataset``, with a
deterministic held-out split of the *training* data that scores importance (never the test set).

Nothing is downloaded unless asked for (``download=True``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from .errors import DataError

FASHION_MNIST_DEB = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "DEPTHCOMPRESS_FASHION_MNIST"
CACHE_ENV = "DEPTHCOMPRESS_CACHE"
CIFAR10_ENV = "DEPTHCOMPRESS_CIFAR10"
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"
# the shared data folder beside a source checkout (repo/../shared/data)
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def cache_dir() -> Path:
    """Where depthcompress keeps downloaded or derived data: ``$DEPTHCOMPRESS_CACHE`` or
    ``~/.cache/depthcompress``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "depthcompress"


def _per_channel(value: Sequence[float] | float | torch.Tensor, c: int, what: str) -> torch.Tensor:
    """One value per channel, shaped (1, C, 1, 1) to broadcast over a batch."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() not in (1, c):
        raise DataError(f"{what} needs 1 or {c} values, got {t.numel()}")
    return t.expand(c).clone().reshape(1, c, 1, 1)


class ImageTensors(Dataset):
    """Images held in memory as uint8 ``(N, C, H, W)`` with int64 labels, normalised on access.

    ``batch(indices)`` returns a whole normalised batch at once (the fast path of ``batches``).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float] | float | torch.Tensor,
        std: Sequence[float] | float | torch.Tensor,
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise DataError(f"images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.mean = _per_channel(mean, images.shape[1], "mean")
        self.std = _per_channel(std, images.shape[1], "std")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.batch(torch.tensor([index]))
        return x[0], int(y[0])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and labels at ``indices``, as one batch."""
        x = self.images[indices].float().div_(255.0)
        return (x - self.mean) / self.std, self.labels[indices]

    @property
    def num_classes(self) -> int:
        """Number of distinct labels (the largest label + 1)."""
        return int(self.labels.max()) + 1 if len(self) else 0


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (plain or .gz): the format of the MNIST-family files."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def _fashion_mnist_dirs(root: str | Path | None) -> list[Path]:
    if root is not None:
        root = Path(root)
        return [root, root / "FashionMNIST" / "raw"]
    dirs = []
    if os.environ.get(FASHION_MNIST_ENV):
        dirs.append(Path(os.environ[FASHION_MNIST_ENV]))
    dirs += [FASHION_MNIST_DEB, cache_dir() / "FashionMNIST" / "raw"]
    return dirs


def fashion_mnist(
    split: str = "train", root: str | Path | None = None, download: bool = False
) -> ImageTensors:
    """Fashion-MNIST from the Debian package's IDX files (or ``root``, ``$DEPTHCOMPRESS_
    FASHION_MNIST``, or the cache); ``download=True`` fetches it with torchvision into the cache
    when no copy is found. Images are 1×28×28, normalised with the dataset's mean and std."""
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    dirs = _fashion_mnist_dirs(root)
    for d in dirs:
        images, labels = _find_idx(d, image_stem), _find_idx(d, label_stem)
        if images is not None and labels is not None:
            x = torch.from_numpy(_read_idx(images).copy()).unsqueeze(1)
            y = torch.from_numpy(_read_idx(labels).astype(np.int64))
            return ImageTensors(x, y, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache_dir()), train=split == "train", download=True)
        return fashion_mnist(split, cache_dir() / "FashionMNIST" / "raw")
    looked = ", ".join(str(d) for d in dirs)
    raise DataError(
        f"Fashion-MNIST not found (looked in {looked}). Install it with "
        "'apt-get install -y dataset-fashion-mnist' (Debian/Ubuntu, as root), set "
        f"${FASHION_MNIST_ENV} to a folder holding the IDX files, pass --download to fetch it "
        "with torchvision, or use your own data as an ImageFolder directory (--data PATH)"
    )


SMALL_IMAGE = 64  # px: images this small get CIFAR-style augmentation, larger ones ImageNet's


def _first_image_size(folder: Path) -> tuple[int, int] | None:
    """(height, width) of the first image of an ImageFolder (its first class, in the order
    ``ImageFolder`` uses), None when there is none; reads one file, not the whole listing."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not folder.is_dir():
        return None
    for cls in sorted(d for d in folder.iterdir() if d.is_dir()):
        for root, _, files in sorted(os.walk(cls, followlinks=True)):
            for name in sorted(files):
                if name.lower().endswith(IMG_EXTENSIONS):
                    with Image.open(Path(root) / name) as img:
                        return img.height, img.width
    return None


def augmentation(
    native: tuple[int, int] | None, image_size: int | None, train: bool
) -> tuple[list[Any], str]:
    """The transforms (before ToTensor) of one view of an ImageFolder, and their description.

    Small images (≤ ``SMALL_IMAGE`` px on the shorter side of the crop) train with a random crop
    of the same size from the image padded by 4 px per 32 px (CIFAR's recipe) and horizontal
    flips; larger ones with a random-resized crop and flips (ImageNet's). Evaluation views are
    only resized and centre-cropped to ``image_size`` when it is given, else left as they are.
    """
    from torchvision import transforms

    crop: int | tuple[int, int] | None = image_size if image_size is not None else native
    if crop is None:
        return [], "none"
    size = crop if isinstance(crop, int) else min(crop)
    steps: list[Any] = []
    if image_size is not None and (size <= SMALL_IMAGE or not train):
        resize = image_size if size <= SMALL_IMAGE else image_size * 256 // 224
        steps += [transforms.Resize(resize), transforms.CenterCrop(image_size)]
    shown = str(crop) if isinstance(crop, int) else "x".join(map(str, crop))
    prefix = f"resize + centre crop {shown}" if steps else ""
    if not train:
        return steps, prefix or "none"
    if size <= SMALL_IMAGE:
        pad = max(1, round(4 * size / 32))
        steps += [transforms.RandomCrop(crop, padding=pad), transforms.RandomHorizontalFlip()]
        text = f"random crop {shown} with {pad} px padding + horizontal flip (small images)"
    else:
        steps += [transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip()]
        text = f"random-resized crop {shown} + horizontal flip (large images)"
    return steps, f"{prefix}, {text}" if prefix else text


def image_folder(
    root: str | Path,
    *,
    train: bool = True,
    image_size: int | None = None,
    channels: int = 3,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Dataset:
    """A torchvision ``ImageFolder`` (``root/<class>/<image>``; ``root/train`` is used when it
    exists, the test/val folders never are). The training view is augmented as ``augmentation``
    says (small images: padded random crop + flip; large: random-resized crop + flip); without
    ``image_size`` images keep their size, which all of them must share."""
    from torchvision import datasets, transforms

    folder = Path(root)
    if (folder / "train").is_dir():
        folder = folder / "train"
    if not folder.is_dir():
        raise DataError(f"ImageFolder directory {root} does not exist")
    steps: list[Any] = []
    if channels == 1:
        steps.append(transforms.Grayscale(1))
        mean, std = mean[:1], std[:1]
    elif channels != 3:
        raise DataError(f"ImageFolder images are RGB or grayscale; got channels={channels}")
    steps += augmentation(_first_image_size(folder), image_size, train)[0]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    try:
        return datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{folder} is not an ImageFolder directory: {exc}") from None


def _cifar10_archive(root: str | Path | None) -> Path:
    """The CIFAR-10 JPEG archive: ``root`` (the archive or its folder), else
    ``$DEPTHCOMPRESS_CIFAR10`` (likewise), else ``../shared/data/`` beside the repository."""
    if root is not None:
        places = [Path(root)]
    else:
        env = os.environ.get(CIFAR10_ENV)
        places = ([Path(env)] if env else []) + [SHARED_DATA]
    candidates = [p / CIFAR10_ARCHIVE if p.is_dir() else p for p in places]
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise DataError(
        f"CIFAR-10 archive {CIFAR10_ARCHIVE} not found (looked in {looked}). Set ${CIFAR10_ENV} "
        f"to the archive or its folder, put it in {SHARED_DATA}, or use your own copy as an "
        "ImageFolder directory (--data PATH with train/ and test/)"
    )


def _extract_once(archive: Path, target: Path) -> None:
    """Extract ``archive`` into ``target`` atomically: into a temporary folder beside it, then
    one rename, so a killed extraction never leaves a half-filled ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"cannot extract {archive}: {exc}") from None
        if not (tmp / "cifar10" / "train").is_dir():
            raise DataError(f"{archive} holds no cifar10/train/ folder")
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # else another process extracted it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cifar10_root(root: str | Path | None = None) -> Path:
    """The extracted CIFAR-10 ImageFolder (``train/`` and ``test/`` of ``<class>/NNNN.jpg``) in
    ``cache_dir()``, extracting the archive (see ``_cifar10_archive``) on first use only."""
    target = cache_dir() / "cifar10-jpeg"
    if not (target / "cifar10" / "train").is_dir():
        _extract_once(_cifar10_archive(root), target)
    return target / "cifar10"


def cifar10(
    split: str = "train", root: str | Path | None = None, augment: bool | None = None
) -> Dataset:
    """CIFAR-10 (32×32 colour JPEGs, 10 classes) as an ``ImageFolder``; the training split is
    augmented (padded random crop + flip) unless ``augment=False``, the test split never is."""
    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    train = split == "train" if augment is None else augment
    return image_folder(cifar10_root(root) / split, train=train)


def is_cifar10(data: str) -> bool:
    """Whether the CLI's ``--data`` names the built-in CIFAR-10."""
    return data.lower().replace("_", "-") in ("cifar10", "cifar-10")


def holdout_indices(n: int, holdout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic split of ``range(n)``: (train indices, held-out indices), both sorted."""
    if not 0 < holdout < n:
        raise DataError(
            f"the held-out split must hold between 1 and {n - 1} of the {n} training examples, "
            f"got {holdout}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[holdout:].sort().values, perm[:holdout].sort().values


@dataclass
class SplitData:
    """The fine-tuning part and the held-out (scoring) part of one training set, plus a plain
    description recorded beside every importance table."""

    train: Dataset
    holdout: Dataset
    info: dict[str, Any] = field(default_factory=dict)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values (any layout), for content hashes."""
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy().tobytes()


def fingerprint(dataset: Dataset) -> str | None:
    """SHA-256 of a dataset's contents (in-memory data) or file list (ImageFolder), so tables
    computed on different copies of the same data can be joined; None when unknown."""
    h = hashlib.sha256()
    if isinstance(dataset, ImageTensors):
        tensors = [dataset.images, dataset.labels, dataset.mean, dataset.std]
    elif isinstance(dataset, TensorDataset):
        tensors = list(dataset.tensors)
    elif hasattr(dataset, "samples") and hasattr(dataset, "root"):
        root = Path(dataset.root)
        for path, label in dataset.samples:
            h.update(f"{Path(path).relative_to(root).as_posix()}\t{label}\n".encode())
        return h.hexdigest()
    else:
        return None
    for t in tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def split_dataset(
    dataset: Dataset,
    *,
    holdout: int,
    seed: int = 0,
    eval_dataset: Dataset | None = None,
    name: str = "custom",
) -> SplitData:
    """Hold out ``holdout`` examples (chosen by ``seed``) of ``dataset`` for scoring; the rest
    fine-tunes. ``eval_dataset`` is the same data with evaluation transforms, if they differ."""
    n = len(dataset)  # type: ignore[arg-type]
    if eval_dataset is not None and len(eval_dataset) != n:  # type: ignore[arg-type]
        raise DataError("eval_dataset must hold the same examples as dataset")
    train_idx, hold_idx = holdout_indices(n, holdout, seed)
    info = {
        "name": name,
        "size": n,
        "holdout": holdout,
        "holdout_seed": seed,
        "fingerprint": fingerprint(dataset),
    }
    return SplitData(
        train=Subset(dataset, train_idx),
        holdout=Subset(eval_dataset if eval_dataset is not None else dataset, hold_idx),
        info=info,
    )


def load_split(
    data: str,
    *,
    holdout: int,
    seed: int = 0,
    image_size: int | None = None,
    channels: int = 3,
    download: bool = False,
) -> SplitData:
    """The CLI's ``--data``: ``fashion-mnist`` or ``cifar10`` (training split) or an ImageFolder
    directory."""
    if is_fashion_mnist(data):
        split = split_dataset(fashion_mnist("train", download=download), holdout=holdout, seed=seed)
        split.info["name"] = "fashion-mnist:train"
        return split
    path = cifar10_root() if is_cifar10(data) else Path(data)
    if not path.is_dir():
        raise DataError(
            f"--data {data!r} is neither 'fashion-mnist' nor an ImageFolder directory "
            "(root/<class>/<image>, or root/train/<class>/<image>), nor 'cifar10'"
        )
    kwargs: dict[str, Any] = {"image_size": image_size, "channels": channels}
    train = image_folder(path, train=True, **kwargs)
    held = image_folder(path, train=False, **kwargs)
    split = split_dataset(train, holdout=holdout, seed=seed, eval_dataset=held)
    native = _first_image_size(path / "train" if (path / "train").is_dir() else path)
    split.info.update(
        name="cifar10:train" if is_cifar10(data) else "imagefolder",
        root=str(path.resolve()),
        image_size=image_size,
        channels=channels,
        augmentation=augmentation(native, image_size, train=True)[1],
    )
    return split


def _fast_source(dataset: Dataset, indices: torch.Tensor) -> tuple[Any, torch.Tensor] | None:
    """The in-memory dataset behind ``dataset`` (through Subsets) and the mapped indices."""
    while isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices)[indices]
        dataset = dataset.dataset
    if hasattr(dataset, "batch") or isinstance(dataset, TensorDataset):
        return dataset, indices
    return None


def fetch(dataset: Dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch ``(x, y)`` of ``dataset`` at ``indices``."""
    found = _fast_source(dataset, indices)
    if found is not None:
        source, idx = found
        if isinstance(source, TensorDataset):
            return source.tensors[0][idx], source.tensors[1][idx]
        return source.batch(idx)
    return default_collate([dataset[int(i)] for i in indices])


def batches(
    dataset: Dataset,
    order: torch.Tensor,
    batch_size: int,
    num_workers: int = 0,
    *,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``dataset`` in the given index order (the last one may be short); in-memory
    datasets are sliced directly, others go through a DataLoader with ``num_workers``. With
    ``pin_memory`` (for a CUDA consumer) batches come in page-locked memory, so copies to the GPU
    with ``non_blocking=True`` overlap the computation."""
    if num_workers == 0 or _fast_source(dataset, order[:1]) is not None:
        for k in range(0, len(order), batch_size):
            x, y = fetch(dataset, order[k : k + batch_size])
            yield (x.pin_memory(), y.pin_memory()) if pin_memory else (x, y)
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    yield from loader


def sample_shape(dataset: Dataset) -> tuple[int, ...]:
    """The shape of one input example, e.g. ``(1, 28, 28)``."""
    x, _ = fetch(dataset, torch.tensor([0]))
    return tuple(x.shape[1:])


def is_fashion_mnist(data: str) -> bool:
    """Whether the CLI's ``--data`` names the built-in Fashion-MNIST."""
    return data.lower().replace("_", "-") == "fashion-mnist"


def load_test(
    data: str, *, image_size: int | None = None, channels: int = 3, download: bool = False
) -> Dataset | None:
    """The test set that belongs to ``--data``: Fashion-MNIST's or CIFAR-10's test split, or an
    ImageFolder's ``val/`` (or ``test/``) folder beside ``train/``; None when there is none."""
    if is_fashion_mnist(data):
        return fashion_mnist("test", download=download)
    root = cifar10_root() if is_cifar10(data) else Path(data)
    for name in ("val", "test"):
        if (root / name).is_dir():
            return image_folder(root / name, train=False, image_size=image_size, channels=channels)
    return None


def num_classes(dataset: Dataset) -> int:
    """How many classes ``dataset`` has (through Subsets): ImageFolder's class list, or the
    largest label + 1 of in-memory data."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, ImageTensors):
        return dataset.num_classes
    if hasattr(dataset, "classes"):
        return len(dataset.classes)
    if isinstance(dataset, TensorDataset):
        return int(dataset.tensors[1].max()) + 1
    raise DataError(f"cannot tell how many classes {type(dataset).__name__} has")
