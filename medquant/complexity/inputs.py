"""Turn the image types users have into batches of gray images in [0, 1].

Accepted inputs (see :func:`prepare`):

* ``torch.Tensor``: (H, W) one image; (B, H, W) a batch of gray images; (B, 1, H, W) or (B, 3, H, W)
  channel-first batches (3 channels = RGB).
* ``numpy.ndarray``: (H, W) one image; (H, W, 1) / (H, W, 3) one gray / RGB image (channel-last); (B, H, W) a
  batch; (B, H, W, 3) / (B, H, W, 1) channel-last or (B, 1, H, W) / (B, 3, H, W) channel-first batches. Either
  byte order (big-endian arrays are read as the same values in native order).
* ``PIL.Image.Image``: modes L, I;16*, I, F, RGB; other modes are converted to RGB (alpha dropped).
* ``pydicom.dataset.Dataset`` (optional extra ``dicom``): see :func:`medquant.data.dicom_to_array`.
* a list/tuple of any of the above, possibly of different sizes (grouped by size internally).

Intensities (``bits_stored`` = the value given per call or the scorer's default; it must be None or an int in
1..32, bool refused, whatever the input, else ``ValueError``):

* floats must be finite and in [0, 1] and are used as given; bool images are {0, 1}. ``bits_stored`` does not
  apply to either, so it can be set for a mixed list (e.g. 12-bit arrays plus DICOM datasets, which arrive as
  floats).
* integers are divided by ``2**bits - 1``, with ``bits`` = ``bits_stored`` when given, else the depth the input
  itself declares: 8 for uint8 (arrays, tensors, PIL modes L / RGB / LA / P...), 16 for uint16 arrays and tensors
  and PIL ``I;16*`` images, and for PIL ``I`` images 16 (32 when a value is >= 65536). Every other integer dtype
  (int8, int16, int32, int64, uint32, uint64) declares none: without ``bits_stored`` it raises ``TypeError``.
* uint8 images use ``bits_stored`` only when it is below 8 (an 8-bit container holds at most 8 bits; any
  ``bits_stored >= 8`` reads them as 8-bit, so one ``bits_stored`` can serve a list mixing 8-bit and wider
  images). For the other integer containers ``bits_stored`` above the container's width (16 for uint16 / int16
  and PIL ``I;16``, 32 for PIL ``I``, ...) raises ``ValueError``.
* integer values must lie in ``[0, 2**bits - 1]`` (``ValueError`` otherwise, naming the image).

RGB -> gray with scikit-image's ``rgb2gray`` weights (0.2125, 0.7154, 0.0721), in float64.
The 8-bit image used by entropy and LBP is ``rint(255 * gray)`` (round half to even, as ``img_as_ubyte``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .metrics import _cpu_path

RGB_WEIGHTS = (0.2125, 0.7154, 0.0721)
MIN_SIDE = 8

_ACCEPTED = ("accepted inputs: torch tensors (H,W), (B,H,W), (B,1,H,W), (B,3,H,W); numpy arrays (H,W), (H,W,1), "
             "(H,W,3), (B,H,W), (B,H,W,3), (B,C,H,W); PIL images; pydicom datasets; or a list of these")


@dataclass
class Group:
    """Images of one size: ``indices`` into the flattened input, ``gray`` (b, H, W) in [0, 1] (float32 u8 / 255
    when ``exact_u8``, else the float64 gray image scikit-image filters), ``u8`` uint8 (b, H, W), ``exact_u8``
    true when gray == u8 / 255."""

    indices: list[int]
    gray: torch.Tensor
    u8: torch.Tensor
    exact_u8: bool


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Image.Image)


def _is_dicom(x) -> bool:
    """A pydicom dataset, with or without Pixel Data (``dicom_to_array`` says what a dataset without it lacks)."""
    if not type(x).__module__.startswith("pydicom"):
        return False
    from pydicom.dataset import Dataset

    return isinstance(x, Dataset)


def _check_bits_stored(bits_stored) -> None:
    """Refuse a ``bits_stored`` that is not None or an integer in 1..32 (bool included), whatever the images.

    Args:
        bits_stored: the value given.

    Raises:
        ValueError: naming the value given and what is accepted.
    """
    if bits_stored is None:
        return
    if (isinstance(bits_stored, (bool, np.bool_)) or not isinstance(bits_stored, numbers.Integral)
            or not 1 <= int(bits_stored) <= 32):
        raise ValueError(f"bits_stored must be an integer in 1..32 (or None), got {bits_stored!r} "
                         f"({type(bits_stored).__name__})")


def _int_container(dtype) -> tuple[str, int] | None:
    """(name, width in bits) of an integer numpy / torch dtype; None for other dtypes."""
    if isinstance(dtype, torch.dtype):
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            return None
        return str(dtype).removeprefix("torch."), 8 * dtype.itemsize
    dtype = np.dtype(dtype)
    return (dtype.name, 8 * dtype.itemsize) if dtype.kind in "ui" else None


def _pil_to_numpy(img) -> tuple[np.ndarray, int | None]:
    mode = img.mode
    if mode in ("L", "RGB", "F", "I", "1"):
        arr = np.asarray(img)
        if mode == "I":  # 32-bit signed container; typically 16-bit data
            arr = arr.astype(np.int64)
            return arr, 16 if arr.max(initial=0) < 65536 else 32
        return arr, None
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16), 16
    if mode == "LA":
        return np.asarray(img.getchannel(0)), None
    return np.asarray(img.convert("RGB")), None


def _numpy_to_tensor(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype == np.uint16:
        arr = arr.astype(np.int32)
    elif arr.dtype == np.uint32:
        arr = arr.astype(np.int64)
    elif arr.dtype == np.uint64:  # torch cannot reduce uint64; values beyond int64 cannot be bits_stored <= 32 data
        if arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"uint64 image values up to {int(arr.max())} exceed any bits_stored (1..32)")
        arr = arr.astype(np.int64)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype.kind == "f" and arr.dtype not in (np.float32, np.float64):  # np.longdouble: torch has no such type
        arr = arr.astype(np.float64)
    elif arr.dtype == bool:
        arr = arr.astype(np.float32)  # {0, 1}
    elif arr.dtype.kind not in "uif":
        raise TypeError(f"unsupported array dtype {arr.dtype}; use uint8/uint16/integers/float/bool")
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)


def _array_to_bchw(arr, channel_last: bool) -> torch.Tensor:
    """Normalise the layout to (B, C, H, W) with C in {1, 3}."""
    is_np = isinstance(arr, np.ndarray)
    if is_np:
        t = _numpy_to_tensor(arr)
    else:
        t = arr
        if t.dtype == torch.bool:
            t = t.to(torch.float32)  # {0, 1}
    shape = tuple(t.shape)
    if t.ndim == 2:
        return t[None, None]
    if t.ndim == 3:
        # (H, W, C) with few channels: as a (B, H, W) batch its images would be C pixels wide, below MIN_SIDE
        if shape[-1] in (1, 2, 3, 4) and shape[0] > 4:
            if not is_np:
                raise ValueError(f"torch tensors are channel-first: shape {shape} looks like a channel-last "
                                 f"(H, W, C) image; pass x.permute(2, 0, 1)[None]; {_ACCEPTED}")
            if shape[-1] in (2, 4):
                raise ValueError(f"{shape[-1]}-channel (RGBA, gray + alpha) arrays are not accepted (shape {shape}); "
                                 "drop the alpha channel or pass a PIL image")
            return t.permute(2, 0, 1)[None]
        return t[:, None]
    if t.ndim == 4:
        if channel_last and shape[-1] in (1, 3):
            return t.permute(0, 3, 1, 2)
        if shape[1] in (1, 3):
            return t
        raise ValueError(f"4-D input must have 1 or 3 channels, got shape {shape}; {_ACCEPTED}")
    raise ValueError(f"images must have 2, 3 or 4 dimensions, got shape {shape}; {_ACCEPTED}")


def _first_bad(t: torch.Tensor, bad: torch.Tensor) -> tuple[int, str]:
    """The index of the first image flagged in ``bad`` (B,) and how a message names it in the batch ``t``:
    ``" (batch index k)"``, or ``""`` for a batch of one image."""
    k = int(bad.nonzero()[0, 0])
    return k, (f" (batch index {k})" if t.shape[0] > 1 else "")


def _to_unit(t: torch.Tensor, bits_stored: int | None, what: str,
             container: tuple[str, int] | None = None) -> tuple[torch.Tensor, bool]:
    """Map intensities to [0, 1]. Returns (float tensor, is_uint8).

    ``container`` is the (name, width) of the integer container the image came in (``t`` may have been widened
    for torch, e.g. uint16 -> int32); default: ``t``'s own dtype. A refused batch is named by its first bad
    image (its index in the batch, and its own range).
    """
    if t.dtype == torch.uint8 and (bits_stored is None or bits_stored >= 8):
        return t, True  # an 8-bit container cannot hold more than 8 bits
    if t.dtype.is_floating_point:  # bits_stored does not apply: floats are already in [0, 1]
        if not bool(torch.isfinite(t).all()):
            _, at = _first_bad(t, ~torch.isfinite(t).flatten(1).all(dim=1))
            raise ValueError(f"{what}{at} contains NaN or inf values; clean or mask them first")
        lo, hi = float(t.min()), float(t.max())
        if lo < 0.0 or hi > 1.0:
            los, his = t.flatten(1).amin(dim=1), t.flatten(1).amax(dim=1)
            k, at = _first_bad(t, (los < 0.0) | (his > 1.0))
            raise ValueError(f"float {what}{at} must lie in [0, 1] (got min {float(los[k]):.6g}, max "
                             f"{float(his[k]):.6g}); scale it, or pass the integer image with bits_stored")
        return t.to(torch.float64), False
    if t.dtype.is_complex:
        raise TypeError(f"complex {what} is not supported")
    bits = bits_stored
    if bits is None:
        if t.dtype == torch.uint8:
            bits = 8
        else:
            raise TypeError(f"{what} has dtype {t.dtype}: pass bits_stored= (e.g. 12 for 12-bit data) so the "
                            "intensity range is known (only uint8, uint16 and PIL 'I' / 'I;16' images default to "
                            "a bit depth)")
    _check_bits_stored(bits)
    name, width = container if container is not None else _int_container(t.dtype) or (str(t.dtype), 64)
    if int(bits) > width:
        raise ValueError(f"{what}: bits_stored={bits} exceeds the {width}-bit width of its {name} container; "
                         f"accepted: 1..{width} for {name} images")
    top = 2 ** int(bits) - 1
    if t.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch reduces none of these: take them as float64
        t = t.to(torch.float64)
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi > top:
        los, his = t.flatten(1).amin(dim=1), t.flatten(1).amax(dim=1)
        k, at = _first_bad(t, (los < 0) | (his > top))
        lo, hi = int(los[k]), int(his[k])
        hint = ("; integer images must be non-negative" if lo < 0 else
                f"; declare the bit depth the data has (bits_stored >= {hi.bit_length()})")
        raise ValueError(f"{what}{at} values span [{lo}, {hi}], outside [0, {top}] for bits_stored={bits}{hint}")
    return t.to(torch.float64) / top, False


def _rgb_to_gray(unit: torch.Tensor, is_u8: bool) -> torch.Tensor:
    """(B, 3, H, W) -> float64 (B, H, W) with rgb2gray's weights.

    On CPU this is literally scikit-image's arithmetic (``x * (1/255)`` then numpy's ``rgb @ coeffs``), so
    that the 8-bit quantisation of pixels whose gray value is exactly k + 0.5 (they exist: 0.2125 R +
    0.7154 G + 0.0721 B is a multiple of 1e-4) rounds the same way, whatever the memory layout of the input
    (channel-first, channels-last, channel-last arrays). On GPU a torch float64 weighted sum is
    used; it can round such exact ties the other way (one gray level, a handful of pixels per image).
    """
    if _cpu_path(unit):
        # (B, H, W, 3) in C order, as scikit-image gets an (H, W, 3) image: numpy's matmul rounds a strided array
        # (the permuted view of an ordinary (B, 3, H, W) tensor) differently in the last bit
        arr = np.ascontiguousarray(unit.permute(0, 2, 3, 1).numpy())
        arr = np.multiply(arr, 1.0 / 255, dtype=np.float64) if is_u8 else np.asarray(arr, dtype=np.float64)
        return torch.from_numpy(np.ascontiguousarray(arr @ np.array(RGB_WEIGHTS, dtype=np.float64)))
    f = unit.to(torch.float64) * (1.0 / 255) if is_u8 else unit.to(torch.float64)
    wts = torch.tensor(RGB_WEIGHTS, dtype=torch.float64, device=unit.device).view(1, 3, 1, 1)
    return (f * wts).sum(dim=1)


def _finish(t_bchw: torch.Tensor, bits_stored, what: str, device,
            container: tuple[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    t = t_bchw.to(device)
    b, c, h, w = t.shape
    if b == 0:
        raise ValueError(f"{what} is an empty batch")
    if h == 0 or w == 0:
        raise ValueError(f"{what} has an empty image of size {h}x{w}")
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{what} is {h}x{w}: images must be at least {MIN_SIDE}x{MIN_SIDE} pixels "
                         "(the metrics need a neighbourhood and at least two box sizes)")
    unit, is_u8 = _to_unit(t, bits_stored, what, container)
    if c == 3:
        gray64 = _rgb_to_gray(unit, is_u8)
        u8 = torch.round(gray64 * 255.0).clamp_(0, 255).to(torch.uint8)
        return gray64, u8, False
    if is_u8:
        u8 = unit[:, 0].contiguous()
        return u8.to(torch.float32) / 255.0, u8, True
    gray64 = unit[:, 0]
    u8 = torch.round(gray64 * 255.0).clamp_(0, 255).to(torch.uint8)
    return gray64, u8, False


def _single_to_bchw(x, channel_last_default: bool = True):
    """One item of a list -> (B, C, H, W) tensor, its own bits_stored hint, and the (name, width) of its integer
    container (None for float / bool images)."""
    if _is_pil(x):
        arr, bits = _pil_to_numpy(x)
        if x.mode == "I":
            container: tuple[str, int] | None = ("PIL mode 'I' (int32)", 32)
        elif x.mode.startswith("I;16"):
            container = (f"PIL mode {x.mode!r} (uint16)", 16)
        else:
            container = _int_container(arr.dtype)
        return _array_to_bchw(arr, True), bits, container
    if _is_dicom(x):
        from ..data import dicom_to_array

        arr, bits = dicom_to_array(x)
        return _array_to_bchw(arr, True), bits, _int_container(arr.dtype)
    if isinstance(x, np.ndarray):
        if not x.dtype.isnative:  # big-endian data (FITS, np.fromfile(..., ">u2")): the same values, native order
            x = x.astype(x.dtype.newbyteorder("="))
        return _array_to_bchw(x, True), (16 if x.dtype == np.uint16 else None), _int_container(x.dtype)
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dtype == torch.uint16:
            return _array_to_bchw(t.to(torch.int32), False), 16, _int_container(t.dtype)
        return _array_to_bchw(t, False), None, _int_container(t.dtype)
    raise TypeError(f"unsupported image type {type(x).__name__}; {_ACCEPTED}")


def prepare(images, bits_stored: int | None = None, device=None) -> tuple[int, list[Group]]:
    """Convert ``images`` to size groups. Returns (number of images, groups).

    An empty list gives (0, []). Every image is validated (shape, size >= 8x8, finite, range).

    Args:
        images: what the scorer accepts (see the module docstring).
        bits_stored: significant bits of integer images, None or an int in 1..32 (default: the depth the input
            declares; see the module docstring for which inputs declare one and how uint8 uses it).
        device: where the tensors go.

    Returns:
        ``(number of images, groups)``: one :class:`Group` per image size.

    Raises:
        TypeError: a nested list, an input of an unsupported type, or an integer image without a bit depth
            (neither ``bits_stored`` nor one declared by the input).
        ValueError: an image of the wrong shape, smaller than 8x8, not finite or out of range; ``bits_stored``
            not None or an int in 1..32, or wider than an image's integer container (uint8 excepted); a DICOM
            dataset that :func:`medquant.data.dicom_to_array` refuses (no or float pixel data, colour...).
    """
    _check_bits_stored(bits_stored)
    dev = torch.device(device) if device is not None else None
    if isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    by_size: dict[tuple, list] = {}
    n = 0
    for k, item in enumerate(items):
        what = f"image {k}" if isinstance(images, (list, tuple)) else "input"
        if isinstance(item, (list, tuple)):
            raise TypeError(f"{what} is a nested list; {_ACCEPTED}")
        t, own_bits, container = _single_to_bchw(item)
        bits = bits_stored if bits_stored is not None else own_bits
        target = dev if dev is not None else torch.device("cpu")
        gray, u8, exact = _finish(t, bits, what, target, container)
        idx = list(range(n, n + gray.shape[0]))
        n += gray.shape[0]
        key = (tuple(gray.shape[1:]), exact)
        by_size.setdefault(key, []).append((idx, gray, u8))
    groups = []
    for (_, exact), parts in by_size.items():
        indices = [i for p in parts for i in p[0]]
        gray = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        u8 = torch.cat([p[2] for p in parts]) if len(parts) > 1 else parts[0][2]
        groups.append(Group(indices, gray, u8, exact))
    return n, groups
