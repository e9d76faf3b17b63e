"""Every accepted input type gives the same metrics; bad inputs give clear errors."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from medquant.complexity import ComplexityScorer
from medquant.complexity.reference import reference_metrics


@pytest.fixture(scope="module")
def sc():
    return ComplexityScorer()


def test_layouts_and_types_agree(sc, kermany32):
    x = kermany32[:4]
    base = sc.metrics(torch.from_numpy(x))
    variants = [
        x,  # numpy (B, H, W)
        torch.from_numpy(x)[:, None],  # (B, 1, H, W)
        torch.from_numpy(x).float() / 255,  # float in [0, 1]
        torch.from_numpy(np.repeat(x[:, None], 3, axis=1)),  # (B, 3, H, W) gray content
        np.repeat(x[..., None], 3, axis=-1),  # (B, H, W, 3)
        [Image.fromarray(im) for im in x],  # PIL L
        [Image.fromarray(im).convert("RGB") for im in x],  # PIL RGB
        list(x),  # list of (H, W)
        [torch.from_numpy(im) for im in x],  # list of 2-D tensors
    ]
    for v in variants:
        assert torch.allclose(sc.metrics(v), base, atol=1e-9), type(v)


def test_mixed_sizes_keep_order(sc, kermany32, pneumonia28, ham8):
    items = [kermany32[0], pneumonia28[0], ham8[0], pneumonia28[1], kermany32[1]]
    got = sc.metrics(items).numpy()
    ref = np.stack([reference_metrics(im) for im in items])
    assert np.abs(got - ref).max(0)[[0, 2]].max() < 1e-4
    assert np.abs(got - ref).max(0)[[1, 4]].max() < 1e-3


def test_uint16_with_declared_bits(sc):
    rng = np.random.default_rng(3)
    img12 = rng.integers(0, 4096, (40, 48)).astype(np.uint16)
    got = sc.metrics(img12, bits_stored=12).numpy()[0]
    ref = reference_metrics(img12, bits_stored=12)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # default for uint16 is 16 bits: the same data then looks 16x darker
    dark = sc.metrics(img12).numpy()[0]
    assert dark[2] < got[2] / 8
    with pytest.raises(ValueError, match="outside"):
        sc.metrics(img12 * 2, bits_stored=12)
    pil16 = Image.fromarray(img12)  # mode I;16
    assert np.allclose(sc.metrics(pil16).numpy()[0], dark, atol=1e-9)
    assert ComplexityScorer(bits_stored=12).metrics(torch.from_numpy(img12.astype(np.int32))).shape == (1, 5)
    # every unsigned container gives the same numbers (torch reduces no uint16/32/64: they crashed inside torch)
    for arr in (img12.astype(np.uint32), img12.astype(np.uint64)):
        np.testing.assert_array_equal(sc.metrics(arr, bits_stored=12).numpy()[0], got)
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        t = torch.from_numpy(img12.astype(np.int32)).to(dtype)
        np.testing.assert_array_equal(sc.metrics(t, bits_stored=12).numpy()[0], got)
    with pytest.raises(ValueError, match="exceed any bits_stored"):
        sc.metrics(np.full((16, 16), 2**63, np.uint64), bits_stored=12)
    for bad in (12.5, True, 0, 33):  # not truncated: refused
        with pytest.raises(ValueError, match=r"bits_stored must be an integer in 1..32"):
            sc.metrics(img12, bits_stored=bad)
    with pytest.raises(ValueError, match="n_levels must be a positive integer"):
        ComplexityScorer(n_levels=True)
    state = sc.state_dict()
    state["edge_threshold"] = torch.tensor(float("inf"), dtype=torch.float64)  # the constructor refuses it too
    with pytest.raises(ValueError, match="edge_threshold must be one finite non-negative number"):
        ComplexityScorer().load_state_dict(state)


@pytest.mark.parametrize(
    "bad, exc, msg",
    [
        (np.full((16, 16), np.nan, np.float32), ValueError, "NaN"),
        (np.array([[np.inf] * 16] * 16), ValueError, "NaN or inf"),
        (np.full((16, 16), 1.5, np.float32), ValueError, r"\[0, 1\]"),
        (np.full((16, 16), -0.1), ValueError, r"\[0, 1\]"),
        (np.zeros((7, 100), np.uint8), ValueError, "at least 8x8"),
        (np.zeros((0, 20), np.uint8), ValueError, "empty"),
        (np.zeros((2, 3, 4, 5, 6), np.uint8), ValueError, "dimensions"),
        (torch.zeros(2, 5, 16, 16), ValueError, "1 or 3 channels"),
        (np.zeros((16, 16, 4), np.uint8), ValueError, "RGBA"),
        (np.zeros((16, 16, 2), np.uint8), ValueError, "2-channel"),
        (torch.zeros(16, 16, 3), ValueError, "channel-first"),  # was "16x3: at least 8x8"
        (torch.zeros(0, 16, 16), ValueError, "empty batch"),
        ("image.png", TypeError, "unsupported image type"),
        (np.zeros((16, 16), np.int32), TypeError, "bits_stored"),
        (np.zeros((16, 16), np.complex64), TypeError, "dtype"),
        ([[np.zeros((16, 16))]], TypeError, "nested"),
    ],
)
def test_bad_inputs_raise_clear_errors(sc, bad, exc, msg):
    with pytest.raises(exc, match=msg):
        sc.metrics(bad)


def test_channel_last_single_gray_image(sc):
    """A numpy (H, W, 1) image is one gray image (it was read as a batch of H images of W x 1 and refused)."""
    rng = np.random.default_rng(7)
    im = rng.integers(0, 256, (20, 24), dtype=np.uint8)
    got = sc.metrics(im[..., None]).numpy()
    assert got.shape == (1, 5)
    np.testing.assert_allclose(got[0], reference_metrics(im), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sc.metrics([im[..., None], im[:16, :, None]]).numpy()[1],
                               reference_metrics(im[:16]), rtol=0, atol=1e-12)


def test_nan_error_names_the_image(sc):
    x = [np.zeros((16, 16), np.float32), np.full((16, 16), np.nan, np.float32)]
    with pytest.raises(ValueError, match="image 1"):
        sc.metrics(x)


def test_edge_values_are_fine(sc):
    m = sc.metrics([np.zeros((8, 8)), np.ones((8, 8)), np.eye(16, dtype=bool)]).numpy()
    assert np.all(np.isfinite(m))
    assert m[0, 0] == 0 and m[1, 0] == 0
    # bool images are {0, 1}: an identity mask has std sqrt(p (1 - p)) with p = 1/16
    assert m[2, 2] == pytest.approx(np.sqrt(1 / 16 * 15 / 16))


def test_bits_stored_does_not_break_uint8_float_or_dicom_like_inputs():
    rng = np.random.default_rng(5)
    u8 = rng.integers(0, 256, (20, 20)).astype(np.uint8)
    f = rng.random((20, 20))
    sc12 = ComplexityScorer(bits_stored=12)
    plain = ComplexityScorer()
    assert torch.equal(sc12.metrics([u8, f]), plain.metrics([u8, f]))
    six = (u8 >> 2).astype(np.uint8)  # 6-bit data in a uint8 container
    np.testing.assert_allclose(plain.metrics(six, bits_stored=6).numpy()[0],
                               reference_metrics(six.astype(np.uint16), bits_stored=6), atol=1e-4)


def _gray_u8_image():
    return np.random.default_rng(9).integers(0, 256, (16, 16)).astype(np.uint8)


@pytest.mark.parametrize("bad", [12.5, "12", 33, 0, -4, True, np.float64(12.0), np.bool_(True)])
def test_bits_stored_is_validated_whatever_the_image_type(sc, bad):
    """bits_stored was checked only on the path of integer images wider than 8 bits: a uint8, float, bool or PIL
    image took 12.5, 33 or "12" silently (or failed inside a comparison)."""
    u8 = _gray_u8_image()
    for img in (u8, torch.from_numpy(u8), Image.fromarray(u8), u8 / 255.0, np.eye(16, dtype=bool), [], [u8, u8]):
        with pytest.raises(ValueError, match=r"bits_stored must be an integer in 1\.\.32 \(or None\), got "
                                             + re.escape(repr(bad))):
            sc.metrics(img, bits_stored=bad)


def test_bits_stored_wider_than_the_integer_container_is_refused(sc):
    """A 16-bit container cannot hold 17 significant bits: such data was divided by 2**17 - 1 (read darker)."""
    rng = np.random.default_rng(4)
    v = rng.integers(0, 100, (16, 16))
    cases = [
        (v.astype(np.uint16), 17, "uint16", 16),
        (torch.from_numpy(v.astype(np.int32)).to(torch.uint16), 17, "uint16", 16),
        (Image.fromarray(v.astype(np.uint16)), 20, "I;16", 16),
        (Image.fromarray(v.astype(np.int32)), 32, None, None),  # PIL "I" is a 32-bit container: accepted
        (v.astype(np.int8), 9, "int8", 8),
        (torch.from_numpy(v.astype(np.int8)), 12, "int8", 8),
        (v.astype(np.int16), 17, "int16", 16),
        (torch.from_numpy(v.astype(np.int16)), 32, "int16", 16),
    ]
    for img, bits, name, width in cases:
        if name is None:
            assert sc.metrics(img, bits_stored=bits).shape == (1, 5)
            continue
        with pytest.raises(ValueError, match=rf"bits_stored={bits} exceeds the {width}-bit .*{re.escape(name)}.*"
                                             rf"accepted: 1\.\.{width}"):
            sc.metrics(img, bits_stored=bits)
        assert sc.metrics(img, bits_stored=width).shape == (1, 5)  # the full width is accepted
    # the same depth as a scorer default is refused too, with the image named in a list
    with pytest.raises(ValueError, match=r"image 1: bits_stored=17 exceeds the 16-bit"):
        ComplexityScorer(bits_stored=17).metrics([v.astype(np.uint32), v.astype(np.uint16)])
    # an 8-bit container is read as 8-bit for any bits_stored >= 8, so one bits_stored serves a mixed list
    u8 = _gray_u8_image()
    np.testing.assert_array_equal(sc.metrics([u8], bits_stored=16).numpy(), sc.metrics(u8).numpy())


_NP_INTS = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64]
_TORCH_INTS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
               torch.uint64]


@pytest.mark.parametrize("dtype", _NP_INTS + _TORCH_INTS, ids=str)
def test_values_above_bits_stored_are_refused_for_every_integer_dtype(sc, dtype):
    v = np.random.default_rng(6).integers(0, 16, (16, 16))  # 4-bit data

    def make(a):
        if isinstance(dtype, torch.dtype):
            return torch.from_numpy(a.astype(np.int64)).to(dtype)
        return a.astype(dtype)

    # valid 4-bit data: scikit-image's reference on the same values / 15
    np.testing.assert_allclose(sc.metrics(make(v), bits_stored=4).numpy()[0],
                               reference_metrics(v.astype(np.uint16), bits_stored=4), atol=1e-4)
    over = v.copy()
    over[3, 5] = 16
    with pytest.raises(ValueError, match=r"values span \[0, 16\], outside \[0, 15\] for bits_stored=4"):
        sc.metrics(make(over), bits_stored=4)
