"""Image files' bytes as a model takes them: decoded by torchvision (PNG, JPEG, WebP, GIF), turned upright, converted
to the training channels and resized to the training size. Training, ``predict`` and ``serve`` all decode here; torch
and torchvision are all it imports (a serving worker loads no Lightning)."""

import re
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor, resize, rgb_to_grayscale, to_dtype

from project.errors import DataError


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
