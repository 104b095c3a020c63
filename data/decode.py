"""One image, from pixels or a file to what a model reads: uint8 [S, S, C].

Every image is brought to `image_size x image_size` with `channels` channels when it is
read (`conform_image`): resized with Pillow only when `data.resize` is set, so a run never
trains on silently rescaled data. Image files are decoded with Pillow (`read_image_file`,
`decode_image_bytes`), and a source's files are checked before a run starts
(`check_image_files`). Images stay uint8 on the host; augmentation and the float
conversion happen on the device.
"""

import concurrent.futures
import io
import os
import time
from collections.abc import Sequence

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from core.errors import DataError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')

# Threads that read and decode image files ahead of the batcher: enough to keep a GPU step
# fed from JPEGs on a many-core host, without Grain's default 16 threads x 500 items.
DECODE_THREADS = min(8, os.cpu_count() or 1)


def to_uint8(image: np.ndarray, what: str) -> np.ndarray:
    """`image` (any shape) as uint8 0..255: floats must lie in [0, 1], integers in 0..255."""
    a = np.asarray(image)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * np.uint8(255)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise DataError(
            f'{what}: expected uint8 or float pixels, found dtype {a.dtype}; store the images '
            'as uint8 0..255 or float 0..1'
        )
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if np.issubdtype(a.dtype, np.floating):
        if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0 and hi <= 1):
            raise DataError(
                f'{what}: float pixels must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; '
                'divide them by 255 (or store uint8 0..255)'
            )
        return np.round(a * 255).astype(np.uint8)
    if lo < 0 or hi > 255:
        raise DataError(
            f'{what}: integer pixels must lie in 0..255, found values in {lo}..{hi}; '
            'rescale them to 0..255 (or store float 0..1)'
        )
    return a.astype(np.uint8)


def convert_channels(image: np.ndarray, channels: int | None, what: str) -> np.ndarray:
    """uint8 [H, W, C] -> [H, W, channels]: 1 -> 3 repeats the grey level, 3 -> 1 takes the
    luminance (Pillow's 'L', ITU-R 601-2), an alpha channel (2 or 4) is dropped."""
    c = image.shape[-1]
    if c == 2:  # grey + alpha
        image, c = image[:, :, :1], 1
    elif c == 4:  # RGBA
        image, c = image[:, :, :3], 3
    if c not in (1, 3):
        raise DataError(
            f'{what} has {c} channels; expected 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA)'
        )
    if channels is None or c == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    grey = Image.fromarray(np.ascontiguousarray(image), mode='RGB').convert('L')
    return np.asarray(grey)[:, :, None]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C], Pillow bilinear (antialiased when shrinking).

    The aspect ratio is not kept: a non-square image is stretched to a square."""
    if image.shape[-1] == 3:
        resized = Image.fromarray(image, mode='RGB').resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(resized)
    planes = [
        np.asarray(Image.fromarray(image[:, :, k]).resize((size, size), Image.Resampling.BILINEAR))
        for k in range(image.shape[-1])
    ]
    return np.stack(planes, axis=-1)


def size_mismatch(what: str, height: int, width: int, image_size: int) -> DataError:
    """The error for an image of the wrong size while `data.resize` is off."""
    return DataError(
        f'{what} is {height}x{width} pixels, expected {image_size}x{image_size} '
        f'(model.image_size={image_size}); pass --config.data.resize=true to resize every image '
        f'to {image_size}x{image_size}, or set --config.model.image_size to the size of the data'
    )


def conform_image(
    image: np.ndarray,
    image_size: int | None,
    channels: int | None,
    resize: bool,
    what: str = 'image',
) -> np.ndarray:
    """Any image ([H, W] or [H, W, C], uint8 or float 0..1) -> uint8 [S, S, channels].

    `image_size` / `channels` None keep the image's own. An image whose size differs is
    resized when `resize`, else a DataError naming `what` (a file path, or an item index)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise DataError(
            f'{what}: expected an image [height, width] or [height, width, channels], found '
            f'shape {a.shape}'
        )
    a = convert_channels(to_uint8(a, what), channels, what)
    height, width = a.shape[:2]
    if image_size and (height, width) != (image_size, image_size):
        if not resize:
            raise size_mismatch(what, height, width, image_size)
        a = resize_image(np.ascontiguousarray(a), image_size)
    return np.ascontiguousarray(a)


def _pil_array(im: Image.Image, channels: int | None) -> np.ndarray:
    """A decoded Pillow image as uint8 [H, W, 1] ('L') or [H, W, 3] ('RGB'); with
    `channels` None, grey images stay grey and everything else becomes RGB."""
    if channels is None:
        channels = 1 if im.mode in ('1', 'L', 'LA', 'I', 'I;16', 'F') else 3
    a = np.asarray(im.convert('L' if channels == 1 else 'RGB'))
    return a[:, :, None] if a.ndim == 2 else a


def read_image_file(path: str, channels: int | None) -> np.ndarray:
    """Decodes an image file with Pillow (first frame of an animation)."""
    try:
        with Image.open(path) as im:
            return _pil_array(im, channels)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(
            f'{path} could not be read as an image ({type(e).__name__}: {e}); remove or '
            'replace the file'
        ) from e


def _image_file_problem(path: str) -> str | None:
    """Why `path` cannot be read as an image, or None. Cheap where the format allows: a PNG
    is verified chunk by chunk (every CRC, no decompression); a JPEG that ends with its
    end-of-image marker is taken on its header (one that does not, a truncated file, is
    decoded in full); other formats (GIF, BMP: rare and small) are decoded."""
    try:
        with Image.open(path) as im:
            if im.format == 'PNG':
                im.verify()
            elif im.format != 'JPEG' or not _ends_with_jpeg_eoi(path):
                im.load()
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error...)
        return f'{type(e).__name__}: {str(e)[:120]}'
    return None


def _ends_with_jpeg_eoi(path: str) -> bool:
    with open(path, 'rb') as f:
        f.seek(max(0, os.path.getsize(path) - 64))
        return b'\xff\xd9' in f.read()


def check_image_files(paths: Sequence[str], where: str, describe=None) -> None:
    """Reads every image file of a source before a run starts (`_image_file_problem`, in
    DECODE_THREADS threads): a corrupt file is found now, not after compilation, and one
    DataError lists every such file, so one fix covers them all. `describe(i)` names file i
    (default: its path)."""
    if not paths:
        return
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(DECODE_THREADS) as pool:
        problems = list(pool.map(_image_file_problem, paths, chunksize=64))
    bad = [i for i, problem in enumerate(problems) if problem is not None]
    logging.info(
        'checked %d image files of %s in %.1fs', len(paths), where, time.perf_counter() - started
    )
    if bad:
        describe = describe or (lambda i: paths[i])
        listed = '\n'.join(f'  {describe(i)}: {problems[i]}' for i in bad)
        raise DataError(
            f'{len(bad)} of the {len(paths)} image files of {where} cannot be read as images; '
            f'remove or replace them (every file was checked, these are all):\n{listed}'
        )


def decode_image_bytes(data: bytes, channels: int | None, what: str) -> np.ndarray:
    """Decodes encoded image bytes (PNG, JPEG, ...) with Pillow."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return _pil_array(im, channels)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f'{what} could not be decoded as an image ({e})') from e
