"""Batched, vectorised torch implementations of the five complexity metrics.

All functions take a batch of same-sized images and work on CPU and GPU. The conventions are those of
scikit-image, which is the reference the tests compare against:

* ``gray``: float tensor (B, H, W) in [0, 1]: float32 ``u8 / 255`` for 8-bit input, else float64 (the values
  scikit-image filters; pixels at the edge threshold are decided on them).
* ``u8``: the 8-bit image, ``q = rint(255 * gray)`` (round half to even, as ``skimage.util.img_as_ubyte``),
  as a uint8 tensor (B, H, W).

Metrics (per image, N = H * W pixels):

1. entropy = -sum_v p_v log2 p_v, with p_v the fraction of pixels of ``u8`` equal to v (256 bins) -
   ``skimage.measure.shannon_entropy(u8)``.
2. edge density = (1/N) #{pixels with Sobel magnitude > t}, where the magnitude is that of
   ``skimage.filters.sobel(gray)``: G_x = K_x * gray, G_y = K_y * gray with K = [1, 0, -1] (x) [1, 2, 1] / 4,
   'reflect' (half-sample symmetric) border, magnitude sqrt((G_x^2 + G_y^2) / 2). For 8-bit images the test
   ``magnitude > t`` is exact in integers (``S > 2 (4 * 255 t)^2``, :func:`sobel_sq_magnitude`); other images
   compare the float64 ``S`` of the gray image with ``2 (4 t)^2``. A pixel at the threshold (exactly for 8-bit
   images, within float64 rounding for the others: :data:`NEAR_REL`, :data:`NEAR_ABS_G`) is decided as
   scikit-image's float64 rounding decides it (:func:`resolve_sobel_ties`).
3. intensity std = sqrt(mean((gray - mean(gray))^2)) (population std, ``np.std``).
4. fractal dimension: box counting on the edge mask of 2 (see :func:`box_counting_dimension`).
5. LBP entropy: Shannon entropy (bits) of the 10-bin histogram of uniform LBP codes (P=8, R=1) of ``u8``, exactly
   as ``skimage.feature.local_binary_pattern(u8, 8, 1, "uniform")`` computes them (see :func:`uniform_lbp`).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# When true, CPU tensors take the device-generic code paths (used by tests to cover the GPU branches on CPU).
FORCE_GENERIC = False


def _cpu_path(t: torch.Tensor) -> bool:
    """True when ``t`` is on the CPU and :data:`FORCE_GENERIC` is off: take the CPU-specific code path."""
    return t.device.type == "cpu" and not FORCE_GENERIC


METRIC_NAMES = ("entropy", "edge_density", "intensity_std", "fractal_dimension", "lbp_entropy")

# Neighbour offsets of skimage's LBP for P=8, R=1: rp = round(-R sin(2 pi i / P), 5), cp = round(R cos(...), 5).
_DIAG = round(math.sin(math.pi / 4), 5)  # 0.70711, exactly the double skimage uses


def _entropy_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of each row of a (B, K) count matrix: -sum p log2 p over nonzero p."""
    counts = counts.to(torch.float64)
    total = counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    p = counts / total
    logp = torch.where(p > 0, torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
    return -(p * logp).sum(dim=1) + 0.0  # + 0.0 turns -0.0 into 0.0


def batched_histogram(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-image histogram: ``values`` (B, ...) integer codes in [0, n_bins) -> (B, n_bins) int64 counts.

    On CPU one ``bincount`` per image (uint8 input needs no widening); on GPU a single ``bincount`` over
    ``code + n_bins * image_index``.

    Args:
        values: integer codes ``(B, ...)`` in ``[0, n_bins)``.
        n_bins: the number of bins.

    Returns:
        ``(B, n_bins)`` int64 counts.
    """
    b = values.shape[0]
    flat = values.reshape(b, -1)
    if _cpu_path(values):
        if flat.dtype not in (torch.uint8, torch.int64):
            flat = flat.to(torch.int64)
        return torch.stack([torch.bincount(row, minlength=n_bins) for row in flat]) if b else \
            torch.zeros(0, n_bins, dtype=torch.int64)
    flat = flat.to(torch.int64)
    offsets = torch.arange(b, device=values.device, dtype=torch.int64).unsqueeze(1) * n_bins
    counts = torch.bincount((flat + offsets).reshape(-1), minlength=b * n_bins)
    return counts.reshape(b, n_bins)


def sobel_sq_magnitude(v: torch.Tensor) -> torch.Tensor:
    """Unnormalised squared Sobel magnitude ``S = Gx'^2 + Gy'^2`` of ``v`` (B, H, W) float32 or float64.

    ``Gx' = [1, 0, -1] (x) [1, 2, 1]`` applied with the 'reflect' border of ``scipy.ndimage`` (for a one-pixel
    border this repeats the edge pixel). skimage's magnitude on an image ``v / c`` is
    ``sqrt(S / 2) / (4 c)``, so ``magnitude > t  <=>  S > 2 (4 c t)^2``.

    Args:
        v: float32 or float64 images ``(B, H, W)`` (the result has their dtype).

    Returns:
        ``S``, ``(B, H, W)``.
    """
    p = F.pad(v.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    sv = p[:, :-2, :] + 2.0 * p[:, 1:-1, :] + p[:, 2:, :]  # smooth along rows -> (B, H, W+2)
    gx = sv[:, :, 2:] - sv[:, :, :-2]
    sh = p[:, :, :-2] + 2.0 * p[:, :, 1:-1] + p[:, :, 2:]  # smooth along columns -> (B, H+2, W)
    gy = sh[:, 2:, :] - sh[:, :-2, :]
    return gx * gx + gy * gy


def resolve_sobel_ties(mask: torch.Tensor, near: torch.Tensor, image: torch.Tensor,
                       threshold: float) -> torch.Tensor:
    """The edge mask with the pixels of ``near`` decided as ``skimage.filters.sobel(gray) > threshold`` decides them.

    ``near`` holds the pixels whose magnitude is at the threshold (8-bit images: ``S == limit`` exactly; float
    images: within float64 rounding of it). There scikit-image's float64 arithmetic (``u8 / 255``, the
    convolution's sums, the square root) lands a few ulps above or below the threshold, pixel by pixel. Those pixels
    (rare in natural images, more common in images of few gray levels) are recomputed with scikit-image's own
    filter on their 3 x 3 neighbourhoods (the border replicated, as the 'reflect' mode does for one pixel), laid
    side by side in one row of patches, so the rounding is scikit-image's.

    Args:
        mask: ``S > limit``, ``(B, H, W)`` bool.
        near: the pixels to decide, ``(B, H, W)`` bool.
        image: what scikit-image filters, ``(B, H, W)``: ``uint8`` (converted by ``img_as_float``, ``u8 / 255``)
            or the float gray image (taken in float64).
        threshold: the edge threshold ``t``.

    Returns:
        The mask with the pixels of ``near`` decided (a new tensor when there are any).
    """
    if not bool(near.any()):
        return mask
    from skimage.filters import sobel

    bi, yi, xi = near.nonzero(as_tuple=True)
    src = image.to(torch.float64) if image.is_floating_point() else image.to(torch.float32)
    p = F.pad(src.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    rows = [torch.stack([p[bi, yi + dy, xi + dx] for dx in range(3)], 1) for dy in range(3)]  # 3 x (n, 3)
    patches = torch.stack(rows, 1)  # (n, 3, 3)
    patches = patches if image.is_floating_point() else patches.to(torch.uint8)
    tiled = np.concatenate(list(patches.cpu().numpy()), axis=1)  # (3, 3n): each centre's neighbourhood its own
    edge = sobel(tiled)[1, 1::3] > threshold
    out = mask.clone()
    out[bi, yi, xi] = torch.from_numpy(edge).to(out.device)
    return out


#: float images (``S`` computed in float64 on the gray image, ``limit = 2 (4 t)^2``): pixels with
#: ``|S - limit| <= NEAR_REL * limit + e (2 sqrt(limit) + e)``, ``e = NEAR_ABS_G``, are decided by
#: :func:`resolve_sobel_ties`. ``e`` bounds the absolute float64 rounding of ``G'`` (a sum of six terms of at most
#: 2 on [0, 1] images: about 1e-15 at most; scikit-image's own rounding is as small), so ``e (2 sqrt(limit) + e)`` bounds
#: that of ``S`` near the threshold, whatever ``t`` (also ``t = 0``); ``NEAR_REL`` covers the rest with a margin.
NEAR_REL = 1e-4
NEAR_ABS_G = 1e-13


def box_sizes(h: int, w: int) -> list[int]:
    """Box sizes 2, 4, 8, ... up to ``min(h, w) / 2``.

    Args:
        h: image height.
        w: image width.

    Returns:
        The sizes.
    """
    sizes, s = [], 2
    while s <= min(h, w) / 2:
        sizes.append(s)
        s *= 2
    return sizes


def box_counts(mask: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """N(s) for s in :func:`box_sizes`: boxes of side s tiling from the top-left corner, whole boxes only.

    Computed hierarchically: the occupancy map of boxes of side 2s is the 2x2 "any" of the map for side s
    (cropped to an even size), which covers exactly the whole 2s-boxes of the image. Returns (sizes, (B, K)).

    Args:
        mask: boolean masks ``(B, H, W)``.

    Returns:
        ``(sizes, counts (B, K))``.
    """
    b, h, w = mask.shape
    sizes = box_sizes(h, w)
    counts = []
    occ = (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)
    for _ in sizes:
        hh, ww = occ.shape[1] // 2, occ.shape[2] // 2
        occ = occ[:, : 2 * hh, : 2 * ww]
        # 2x2 "any" as a bitwise OR of the four strided sub-grids (much faster than reshape + any on CPU)
        occ = (occ[:, 0::2, 0::2] | occ[:, 1::2, 0::2]) | (occ[:, 0::2, 1::2] | occ[:, 1::2, 1::2])
        counts.append(occ.reshape(b, -1).sum(dim=1, dtype=torch.int64))
    if not counts:
        return sizes, torch.zeros(b, 0, dtype=torch.int64, device=mask.device)
    return sizes, torch.stack(counts, dim=1)


def box_counting_dimension(mask: torch.Tensor) -> torch.Tensor:
    """Box-counting (Minkowski-Bouligand) dimension of each binary mask in ``mask`` (B, H, W).

    D = least-squares slope of log N(s) against log(1/s) over the sizes s of :func:`box_sizes` with N(s) > 0;
    0 when fewer than two sizes remain (so an empty mask gives 0).

    Args:
        mask: boolean masks ``(B, H, W)``.

    Returns:
        ``(B,)`` float64 dimensions.
    """
    sizes, counts = box_counts(mask)
    b = mask.shape[0]
    if not sizes:
        return torch.zeros(b, dtype=torch.float64, device=mask.device)
    counts = counts.to(torch.float64)
    valid = counts > 0
    wgt = valid.to(torch.float64)
    x = -torch.log(torch.tensor(sizes, dtype=torch.float64, device=mask.device)).unsqueeze(0).expand(b, -1)
    y = torch.log(counts.clamp_min(1.0))
    n = wgt.sum(1)
    sx, sy = (wgt * x).sum(1), (wgt * y).sum(1)
    sxx, sxy = (wgt * x * x).sum(1), (wgt * x * y).sum(1)
    den = n * sxx - sx * sx
    ok = (n >= 2) & (den > 0)
    slope = (n * sxy - sx * sy) / torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, slope, torch.zeros_like(slope)) + 0.0


# uniform LBP mapping of the 256 codes (bit i = neighbour i): number of ones when the number of 0/1 transitions
# along the (non-circular) chain b0..b7 is <= 2, else P + 1 = 9. skimage counts transitions without the
# wrap-around pair; for an 8-bit chain this is equivalent to the circular definition (<= 2 either way).
def _uniform_lut() -> list[int]:
    lut = []
    for code in range(256):
        bits = [(code >> i) & 1 for i in range(8)]
        changes = sum(bits[i] != bits[i + 1] for i in range(7))
        lut.append(sum(bits) if changes <= 2 else 9)
    return lut


UNIFORM_LUT = _uniform_lut()


def _interp_weights(n: int, offset: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """skimage's bilinear weights along one axis for coordinate ``i + offset``: (1 - d, d) with
    ``d = (i + offset) - floor(i + offset)``, computed in float64 exactly as its Cython code does."""
    pos = torch.arange(n, dtype=torch.float64, device=device) + offset
    d = pos - torch.floor(pos)
    return 1.0 - d, d


# The four diagonal neighbours: bit index i, row sign, column sign.
_DIAGONALS = ((1, -1, +1), (3, -1, -1), (5, +1, -1), (7, +1, +1))
_CARDINALS = ((0, 0, +1), (2, -1, 0), (4, 0, -1), (6, +1, 0))
# sign(577 d + 239 e) == sign(70711 d + 29289 e) for every |d| <= 255, |e| <= 510 (checked exhaustively in the
# tests); 577/239 is a continued-fraction convergent of 70711/29289 (~ 1 + sqrt(2)). Max |s| = 269025.
_A_DIAG, _B_CARD = 577, 239


def _diagonal_values_below_centre(nb: dict, wc: tuple, wr: tuple, sr: int, sc: int) -> torch.Tensor:
    """skimage's float64 bilinear value of the diagonal neighbour (sr, sc) < centre, for gathered pixels.

    ``nb[(dy, dx)]`` holds the float64 values of the 3x3 neighbourhood (zero outside the image); ``wc`` =
    (1 - dc, dc) and ``wr`` = (1 - dr, dr) are the per-pixel interpolation weights. Same operation order as
    skimage's Cython code: ``top = (1-dc) tl + dc tr``, ``bottom = (1-dc) bl + dc br``,
    ``value = (1-dr) top + dr bottom``.
    """
    top = -1 if sr < 0 else 0  # row offset of the top samples
    left = -1 if sc < 0 else 0  # column offset of the left samples
    (a0, a1), (b0, b1) = wc, wr
    upper = a0 * nb[(top, left)] + a1 * nb[(top, left + 1)]
    lower = a0 * nb[(top + 1, left)] + a1 * nb[(top + 1, left + 1)]
    return b0 * upper + b1 * lower < nb[(0, 0)]


def _flat_nonzero(t: torch.Tensor) -> torch.Tensor:
    """Flat indices of the non-zero entries (numpy's flatnonzero on CPU: several times faster there)."""
    if _cpu_path(t):
        return torch.from_numpy(np.flatnonzero(t.numpy()))
    return t.reshape(-1).nonzero().squeeze(1)


def lbp_codes(u8: torch.Tensor) -> torch.Tensor:
    """Raw 8-bit LBP codes (bit i set when neighbour i >= centre) of ``u8`` (B, H, W), exactly like skimage.

    Neighbour i sits at (r + rp_i, c + cp_i) with rp = round(-sin(2 pi i/8), 5), cp = round(cos(2 pi i/8), 5);
    pixels outside the image are 0 (skimage's constant mode, cval 0). The four diagonal neighbours are bilinear
    interpolations: with alpha = 0.70711, beta = 1 - alpha, the diagonal pixel D has weight alpha^2, the two
    cardinal pixels N1, N2 next to it alpha*beta and the centre x beta^2, so

        value - x = alpha * 1e-5 * (70711 d + 29289 e),   d = D - x,  e = N1 + N2 - 2x.

    Its sign is that of s = 577 d + 239 e (the same sign for every 8-bit d, e; exact in int32), so the bits
    are computed with integer arithmetic. s = 0 exactly when d = e = 0; there skimage's result depends on
    float64 rounding (in flat regions the interpolated value lands one ulp above or below x), so those pixels
    (a few percent on chest X-rays) are gathered and recomputed in float64 with skimage's operation order.

    Args:
        u8: uint8 images ``(B, H, W)``.

    Returns:
        ``(B, H, W)`` codes 0..255.
    """
    b, h, w = u8.shape
    dev = u8.device
    p = F.pad(u8.to(torch.int32), (1, 1, 1, 1), mode="constant", value=0)
    x = p[:, 1:-1, 1:-1]

    def shifted(dy, dx):
        return p[:, 1 + dy : h + 1 + dy, 1 + dx : w + 1 + dx]

    # code = 255 - sum_i 2^i [neighbour i < centre]; (v >> 31) is -1 (all bits set) for v < 0, else 0
    code = torch.full((b, h, w), 255, dtype=torch.int32, device=dev)
    d = {}
    for i, dr, dc in _CARDINALS:
        d[i] = shifted(dr, dc) - x
        code.sub_((d[i] >> 31).bitwise_and_(1 << i))
    min_abs = None  # min over the diagonals of |s|: 0 marks a pixel with at least one tie
    for i, sr, sc in _DIAGONALS:
        e = d[2 if sr < 0 else 6] + d[0 if sc > 0 else 4]
        sdiag = torch.add(e.mul_(_B_CARD), shifted(sr, sc) - x, alpha=_A_DIAG)
        code.sub_((sdiag >> 31).bitwise_and_(1 << i))
        sdiag.abs_()
        min_abs = sdiag if min_abs is None else torch.minimum(min_abs, sdiag, out=min_abs)
    assert min_abs is not None  # four diagonals were visited
    idx = _flat_nonzero(min_abs == 0)
    if idx.numel():
        hw, wp = h * w, w + 2
        bi = torch.div(idx, hw, rounding_mode="floor")
        rem = idx - bi * hw
        r = torch.div(rem, w, rounding_mode="floor")
        c = rem - r * w
        centre = bi * ((h + 2) * wp) + (r + 1) * wp + (c + 1)  # flat index in the padded image
        flat = p.reshape(-1)
        nb = {(dy, dx): flat.index_select(0, centre + (dy * wp + dx)).to(torch.float64)
              for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        wts = {}
        for sgn in (-1, 1):
            c0, c1 = _interp_weights(w, sgn * _DIAG, dev)
            r0, r1 = _interp_weights(h, sgn * _DIAG, dev)
            wts[("c", sgn)] = (c0.index_select(0, c), c1.index_select(0, c))
            wts[("r", sgn)] = (r0.index_select(0, r), r1.index_select(0, r))
        fix = torch.zeros(idx.shape, dtype=torch.int32, device=dev)
        xc = nb[(0, 0)]
        for i, sr, sc in _DIAGONALS:
            # tie on this diagonal: D = x and N1 + N2 = 2x (exact in float64 for 8-bit values)
            tie = (nb[(sr, sc)] == xc) & (nb[(sr, 0)] + nb[(0, sc)] == 2.0 * xc)
            below = _diagonal_values_below_centre(nb, wts[("c", sc)], wts[("r", sr)], sr, sc)
            fix += (below & tie).to(torch.int32) << i  # clear bit i where tied and below
        code.view(-1).index_add_(0, idx, -fix)
    return code.to(torch.uint8)


def uniform_lbp(u8: torch.Tensor) -> torch.Tensor:
    """Uniform LBP codes 0..9 of ``u8`` (B, H, W), as ``local_binary_pattern(u8, 8, 1, "uniform")``.

    Args:
        u8: uint8 images ``(B, H, W)``.

    Returns:
        ``(B, H, W)`` codes 0..9.
    """
    lut = torch.tensor(UNIFORM_LUT, dtype=torch.uint8, device=u8.device)
    return lut[lbp_codes(u8).to(torch.int64)]


def lbp_entropy(u8: torch.Tensor) -> torch.Tensor:
    """Entropy (bits) of the 10-bin uniform-LBP histogram of each image of ``u8`` (B, H, W).

    Args:
        u8: uint8 images ``(B, H, W)``.

    Returns:
        ``(B,)`` float64 entropies.
    """
    raw = batched_histogram(lbp_codes(u8), 256).to(torch.float64)  # (B, 256)
    lut = torch.tensor(UNIFORM_LUT, dtype=torch.int64, device=u8.device)
    mapping = F.one_hot(lut, 10).to(torch.float64)  # (256, 10)
    return _entropy_from_counts(raw @ mapping)


CPU_CHUNK_PIXELS = 8 * 224 * 224


def _compute_cpu_chunked(gray, u8, edge_threshold, exact_u8) -> torch.Tensor:
    """CPU: split the batch into cache-sized chunks and spread the chunks over ``torch.get_num_threads()``
    Python worker threads, each running single-threaded torch ops (ATen releases the GIL). A batch of one
    chunk runs single-threaded.

    Coarse-grained parallelism has no per-op barrier, so it scales better than intra-op threading for the
    many small element-wise passes here, and degrades gracefully when other processes share the cores.
    The torch thread count is set to 1 while the workers run and restored afterwards.
    """
    b, h, w = gray.shape
    step = max(1, CPU_CHUNK_PIXELS // (h * w))
    starts = list(range(0, b, step))

    def run(i):
        return _compute_batch(gray[i : i + step], u8[i : i + step], edge_threshold, exact_u8)

    n_threads = torch.get_num_threads()
    workers = min(n_threads, len(starts))
    if n_threads > 1:
        torch.set_num_threads(1)
    try:
        if workers <= 1:
            parts = [run(i) for i in starts]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = list(pool.map(run, starts))
    finally:
        if n_threads > 1:
            torch.set_num_threads(n_threads)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def compute_metrics(
    gray: torch.Tensor,
    u8: torch.Tensor,
    edge_threshold: float = 0.1,
    exact_u8: bool = False,
) -> torch.Tensor:
    """The five metrics of a batch of same-sized images -> float64 tensor (B, 5) in :data:`METRIC_NAMES` order.

    ``gray`` (B, H, W) float32 or float64 in [0, 1]; ``u8`` its 8-bit quantisation. When ``exact_u8`` is true the caller
    guarantees ``gray == u8 / 255`` (8-bit input); the Sobel magnitude and the std are then computed in exact
    integer arithmetic from ``u8`` (same values, fewer rounding errors, faster).

    Args:
        gray: float32 / float64 images ``(B, H, W)`` in [0, 1] (edge-threshold ties are decided on these values).
        u8: their 8-bit quantisation.
        edge_threshold: the Sobel magnitude threshold of the edge mask.
        exact_u8: ``gray == u8 / 255`` holds (see above).

    Returns:
        ``(B, 5)`` float64 metrics.

    Raises:
        ValueError: ``gray`` is not ``(B, H, W)``.
    """
    if gray.ndim != 3:
        raise ValueError(f"expected a (B, H, W) batch, got shape {tuple(gray.shape)}")
    if _cpu_path(gray):
        return _compute_cpu_chunked(gray, u8, edge_threshold, exact_u8)
    return _compute_batch(gray, u8, edge_threshold, exact_u8)


def _compute_batch(gray: torch.Tensor, u8: torch.Tensor, edge_threshold: float, exact_u8: bool) -> torch.Tensor:
    b, h, w = gray.shape
    n = h * w
    hist = batched_histogram(u8, 256)
    entropy = _entropy_from_counts(hist)

    if exact_u8:
        v = u8.to(torch.float32)
        values = torch.arange(256, dtype=torch.float64, device=gray.device)
        hf = hist.to(torch.float64)
        mean = (hf @ values) / n
        var = (hf @ (values * values)) / n - mean * mean
        std = var.clamp_min(0.0).sqrt() / 255.0
    else:
        v = gray.to(torch.float64)
        var, _ = torch.var_mean(v, dim=(1, 2), correction=0)
        std = var.sqrt()

    t = float(edge_threshold)
    if exact_u8:
        # integer-valued float32 S (<= 2 * 1020^2 < 2^24): exact; pixels exactly at the threshold are ties
        sq = sobel_sq_magnitude(v)
        limit = 2.0 * (4.0 * 255.0 * t) ** 2
        mask = resolve_sobel_ties(sq > limit, sq == limit, u8, edge_threshold)
    else:
        # float64 S of the gray image itself (float32 of 255 * gray erred by ~1e-4 in G', far beyond the tie band
        # once t is small); pixels within its rounding of the threshold: scikit-image's rounding
        sq = sobel_sq_magnitude(v)
        limit = 2.0 * (4.0 * t) ** 2
        band = NEAR_REL * limit + NEAR_ABS_G * (2.0 * math.sqrt(limit) + NEAR_ABS_G)
        mask = resolve_sobel_ties(sq > limit, (sq - limit).abs() <= band, gray, edge_threshold)
    edge_density = mask.view(torch.uint8).reshape(b, -1).sum(dim=1, dtype=torch.int64).to(torch.float64) / n
    fd = box_counting_dimension(mask)
    lbp = lbp_entropy(u8)
    return torch.stack([entropy, edge_density, std, fd, lbp], dim=1)
