"""The two ways a split is held: decoded ``uint8`` tensors in memory, or image files decoded batch by batch. Both
serve a whole batch per call (``__getitems__``) as ``(uint8 images (N, C, H, W), int64 labels)``."""

import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from project.errors import DataError


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class: of labels ``(N,)``, or of 0/1 rows ``(N, classes)`` (multi-label)."""
    return labels.sum(0) if labels.ndim == 2 else torch.bincount(labels, minlength=num_classes)


class Tensors(Dataset):
    """Images and labels held in memory; the DataLoader asks for whole batches through ``__getitems__``,
    so a batch costs one index operation instead of one Python call and one collate per image."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def subset(self, idx: torch.Tensor) -> "Tensors":
        return Tensors(self.x[idx], self.y[idx])

    def __getitems__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # to the data's device without waiting (data.on_device): a blocking copy would drain the GPU's queue each step
        idx = torch.as_tensor(indices).to(self.y.device, non_blocking=True)
        return self.x[idx], self.y[idx]


def decode(path: Path, size: tuple[int, int], channels: int) -> torch.Tensor:
    """One image file as ``uint8 (channels, *size)`` (:func:`decode_bytes`). Raises DataError if the file cannot be read
    or decoded."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:  # a dangling link, a file without read permission, one removed since the folder was read
        raise DataError(f"{path} cannot be read ({err.strerror or err}).") from None
    return decode_bytes(raw, str(path), size, channels)


def decode_bytes(raw: bytes, name: str, size: tuple[int, int], channels: int) -> torch.Tensor:
    """An image file's bytes as ``uint8 (channels, *size)``: turned upright as its EXIF orientation says (phone
    photos), then :func:`conform`. Raises DataError, naming the file ``name``, if they are not an image."""
    from torchvision.io import ImageReadMode, decode_image

    if not raw:
        raise DataError(f"{name} is empty (0 bytes).")
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    try:
        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        image = decode_image(data, mode=mode, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as err:  # torchvision's decoders raise these for a file they cannot read
        why = re.sub(r"^.*?\.cpp:\d+,\s*", "", " ".join(str(err).split()))  # less the C++ source's name and line
        raise DataError(f"{name} is not an image torchvision can decode ({why}).") from None
    return conform(image, size, channels)


def conform(image, size: tuple[int, int], channels: int) -> torch.Tensor:
    """An image as a dataset's item holds it (a PIL image; a tensor ``(C, H, W)``, ``uint8`` or floats in [0, 1]; a
    numpy array ``(H, W)`` or ``(H, W, C)``) as ``uint8 (channels, *size)``: the first frame of an animation, 16-bit
    scaled to 8, converted to the channels (WebP and GIF decode to RGB whatever is asked), resized with antialiased
    bilinear interpolation."""
    from torchvision.transforms.v2.functional import pil_to_tensor, resize, rgb_to_grayscale, to_dtype

    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL: palette, CMYK, 16-bit modes to plain pixels
        image = pil_to_tensor(image.convert("L" if channels == 1 else "RGB"))
    image = torch.as_tensor(image)
    if image.ndim == 2:
        image = image[None]
    elif image.ndim == 3 and image.shape[-1] in (1, 3, 4) and image.shape[0] not in (1, 3, 4):  # numpy's HWC
        image = image.permute(2, 0, 1)
    if image.ndim == 4:  # an animated GIF: its frames
        image = image[0]
    if image.dtype.is_floating_point:  # torchvision's convention: floats are in [0, 1]
        image = to_dtype(image.clamp(0, 1), torch.uint8, scale=True)
    elif image.dtype == torch.uint16:  # 16-bit PNG
        image = to_dtype(image.to(torch.uint16), torch.uint8, scale=True)
    elif image.dtype != torch.uint8:  # integer pixels 0..255 in a wider type
        image = image.clamp(0, 255).to(torch.uint8)
    if image.shape[0] != channels:
        rgb = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
        image = rgb_to_grayscale(rgb) if channels == 1 else rgb
    if tuple(image.shape[1:]) != tuple(size):
        image = resize(image, list(size), antialias=True)
    return image.contiguous()


class Files(Dataset):
    """Image files decoded when a batch is asked for (in DataLoader workers when there are any)."""

    def __init__(self, files: list[Path], labels: torch.Tensor, size: tuple[int, int], channels: int):
        self.files, self.y, self.size, self.channels = files, labels, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, idx: torch.Tensor) -> "Files":
        return Files([self.files[i] for i in idx.tolist()], self.y[idx], self.size, self.channels)

    def __getitems__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices)
        x = torch.stack([decode(self.files[i], self.size, self.channels) for i in idx.tolist()])
        return x, self.y[idx]
