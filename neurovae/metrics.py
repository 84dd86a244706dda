"""Image-quality metrics between a reference and an estimate: MSE, PSNR, 3-D SSIM.

Each metric compares one volume ``(x, y, z)`` or a batch ``(n, x, y, z)`` of
volumes, given as numpy arrays or as Niimg-like objects (a 3-D image, a 4-D
image with samples along the 4th axis, a list of 3-D images, or paths to such
files). One volume gives a float; a batch gives one value per sample, an array
of shape ``(n,)``. An optional ``mask`` restricts the metric to the voxels
inside it.

The names are the short ones used throughout the library: :func:`mse`,
:func:`psnr` and :func:`ssim`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from neurovae.io import check_mask, load_volumes, same_grid_affine

__all__ = ["mse", "psnr", "ssim"]

_Volumes = Any  # array-like (x, y, z) / (n, x, y, z), or Niimg-like


# ----------------------------------------------------------------------
# input handling (shared with neurovae.plotting)
# ----------------------------------------------------------------------
def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_volumes(
    data: _Volumes, name: str
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """``data`` as a float64 array ``(n, x, y, z)``, its affine, and whether
    it was a batch (see :func:`neurovae.io.load_volumes`)."""
    return load_volumes(data, name=name, dtype=np.float64)


def _as_mask(
    mask, spatial_shape: tuple[int, ...], affine: np.ndarray | None
) -> np.ndarray | None:
    """``mask`` as a boolean array of ``spatial_shape`` (None stays None); a
    mask image must be on the data's grid (no resampling)."""
    if mask is None:
        return None
    return check_mask(mask, spatial_shape, affine, resample=False, name="mask")


@dataclass(frozen=True)
class _Pair:
    reference: np.ndarray  # (n, x, y, z), float64
    estimate: np.ndarray  # (n, x, y, z), float64
    mask: np.ndarray | None  # (x, y, z), bool
    affine: np.ndarray | None
    batch: bool

    def voxels(self, array: np.ndarray) -> np.ndarray:
        """``array`` of shape (n, x, y, z) restricted to the mask: (n, n_voxels)."""
        if self.mask is None:
            return array.reshape(array.shape[0], -1)
        return array[:, self.mask]

    def output(self, values: np.ndarray) -> float | np.ndarray:
        return values if self.batch else float(values[0])


def _check_pair(reference: _Volumes, estimate: _Volumes, mask=None) -> _Pair:
    """Load both inputs and the mask, and check that they match."""
    ref, ref_affine, ref_batch = _as_volumes(reference, "reference")
    est, est_affine, est_batch = _as_volumes(estimate, "estimate")
    if ref.shape != est.shape or ref_batch != est_batch:

        def describe(array: np.ndarray, batch: bool) -> str:
            if batch:
                return f"a batch (n, x, y, z) of shape {array.shape}"
            return f"a volume (x, y, z) of shape {array.shape[1:]}"

        raise ValueError(
            "reference and estimate must have the same shape; got "
            f"{describe(ref, ref_batch)} and {describe(est, est_batch)}."
        )
    if ref_affine is not None and est_affine is not None:
        if not same_grid_affine(ref_affine, est_affine):
            raise ValueError(
                "reference and estimate images have different affines:\n"
                f"{ref_affine}\nvs\n{est_affine}"
            )
    affine = ref_affine if ref_affine is not None else est_affine
    return _Pair(ref, est, _as_mask(mask, ref.shape[1:], affine), affine, ref_batch)


def _data_range(pair: _Pair, data_range: float | None) -> np.ndarray:
    """Per-sample data range: ``data_range``, or the reference's (max - min)."""
    n = pair.reference.shape[0]
    if data_range is not None:
        if not _is_real(data_range) or not np.isfinite(data_range) or data_range <= 0:
            raise ValueError(
                f"data_range must be a positive float or None; got {data_range!r}."
            )
        return np.full(n, float(data_range))
    voxels = pair.voxels(pair.reference)
    ranges = voxels.max(axis=1) - voxels.min(axis=1)
    if np.any(ranges == 0):
        first = int(np.flatnonzero(ranges == 0)[0])
        raise ValueError(
            f"the reference (sample {first}) is constant inside the mask, so its "
            "data range is 0: pass data_range explicitly."
        )
    return ranges


# ----------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------
def mse(reference: _Volumes, estimate: _Volumes, *, mask=None) -> float | np.ndarray:
    """Mean squared error between two volumes (or per sample of two batches).

    Parameters
    ----------
    reference : array-like or Niimg-like
        The ground truth: one volume ``(x, y, z)``, a batch ``(n, x, y, z)``,
        a 3-D image, a 4-D image (samples along the 4th axis), or a list of
        3-D images or file paths on one grid.
    estimate : array-like or Niimg-like
        The volume(s) to assess, of the same shape as ``reference`` (and, for
        two images, on the same affine).
    mask : array-like of bool or Niimg-like, optional
        Boolean array (or 3-D mask image, non-zero voxels inside) of the
        spatial shape ``(x, y, z)``: the mean runs over the voxels inside only.

    Returns
    -------
    float or ndarray of shape (n,)
        ``mean((reference - estimate) ** 2)`` over the (masked) voxels: a float
        for one volume, one value per sample for a batch.

    Raises
    ------
    ValueError
        If the inputs differ in shape or affine, are not 3-D / 4-D, hold
        non-finite values, or the mask does not fit them or is empty.

    See Also
    --------
    psnr : Peak signal-to-noise ratio, from the MSE.
    ssim : Structural similarity.

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.metrics import mse
    >>> reference = np.zeros((2, 2, 2))
    >>> mse(reference, reference + 0.5)
    0.25
    >>> mse(np.zeros((3, 2, 2, 2)), np.ones((3, 2, 2, 2)))
    array([1., 1., 1.])
    """
    pair = _check_pair(reference, estimate, mask)
    errors = pair.voxels(pair.reference - pair.estimate)
    return pair.output(np.mean(errors**2, axis=1))


def psnr(
    reference: _Volumes,
    estimate: _Volumes,
    *,
    mask=None,
    data_range: float | None = None,
) -> float | np.ndarray:
    """Peak signal-to-noise ratio, in decibels, of an estimate of a reference.

    ``10 * log10(data_range ** 2 / mse)``; higher is better, and identical
    inputs give ``inf``.

    Parameters
    ----------
    reference : array-like or Niimg-like
        The ground truth: one volume ``(x, y, z)``, a batch ``(n, x, y, z)``,
        a 3-D image, a 4-D image (samples along the 4th axis), or a list of
        3-D images or file paths on one grid.
    estimate : array-like or Niimg-like
        The volume(s) to assess, of the same shape as ``reference`` (and, for
        two images, on the same affine).
    mask : array-like of bool or Niimg-like, optional
        Boolean array (or 3-D mask image, non-zero voxels inside) of the
        spatial shape ``(x, y, z)``: the metric uses the voxels inside only.
    data_range : float, optional
        Range of the intensities (the "peak"). By default, ``max - min`` of
        the reference inside the mask, computed for each sample of a batch.

    Returns
    -------
    float or ndarray of shape (n,)
        The PSNR in dB: a float for one volume, one value per sample for a
        batch.

    Raises
    ------
    ValueError
        If the inputs do not match (see :func:`mse`), ``data_range`` is not a
        positive number, or it is left to its default and the reference is
        constant inside the mask.

    See Also
    --------
    mse : Mean squared error.
    ssim : Structural similarity.

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.metrics import psnr
    >>> reference = np.zeros((2, 2, 2))
    >>> reference[0] = 1.0
    >>> round(psnr(reference, reference + 0.1), 6)  # 10 log10(1 / 0.01)
    20.0
    >>> psnr(reference, reference)
    inf
    """
    pair = _check_pair(reference, estimate, mask)
    ranges = _data_range(pair, data_range)
    errors = np.mean(pair.voxels(pair.reference - pair.estimate) ** 2, axis=1)
    with np.errstate(divide="ignore"):
        values = np.where(
            errors == 0, np.inf, 10 * np.log10(ranges**2 / np.maximum(errors, 1e-300))
        )
    return pair.output(values)


def ssim(
    reference: _Volumes,
    estimate: _Volumes,
    *,
    mask=None,
    data_range: float | None = None,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    return_map: bool = False,
) -> float | np.ndarray | tuple:
    """Mean structural similarity (SSIM) of two volumes, with 3-D windows.

    SSIM (Wang et al. 2004) compares local means, variances and covariance in
    a Gaussian window (standard deviation ``sigma`` voxels, truncated at 3.5
    standard deviations, population statistics) around every voxel; 1 means
    identical, 0 unrelated, negative anti-correlated structure.

    Without a mask the SSIM map is averaged over all voxels at least the
    window radius away from the border, as
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)`` does; with a mask, over the
    voxels inside it (the local statistics still use the whole volume).

    Parameters
    ----------
    reference : array-like or Niimg-like
        The ground truth: one volume ``(x, y, z)``, a batch ``(n, x, y, z)``,
        a 3-D image, a 4-D image (samples along the 4th axis), or a list of
        3-D images or file paths on one grid.
    estimate : array-like or Niimg-like
        The volume(s) to assess, of the same shape as ``reference`` (and, for
        two images, on the same affine).
    mask : array-like of bool or Niimg-like, optional
        Boolean array (or 3-D mask image, non-zero voxels inside) of the
        spatial shape ``(x, y, z)``: the map is averaged over these voxels.
    data_range : float, optional
        Range of the intensities, which scales the stabilising constants
        ``(k1 * data_range) ** 2`` and ``(k2 * data_range) ** 2``. By default,
        ``max - min`` of the reference inside the mask, for each sample.
    sigma : float, default=1.5
        Standard deviation of the Gaussian window, in voxels.
    k1, k2 : float, default=0.01, 0.03
        Stabilising constants of the luminance and contrast terms.
    return_map : bool, default=False
        Also return the SSIM map, a voxel-wise similarity image (computed
        everywhere, also outside the mask and near the border).

    Returns
    -------
    float or ndarray of shape (n,)
        The mean SSIM: a float for one volume, one value per sample for a
        batch.
    ssim_map : ndarray or Nifti1Image
        Only if ``return_map``: the SSIM of every voxel, of the shape of the
        inputs; a (3-D or 4-D) image on the inputs' affine when an input is
        an image.

    Raises
    ------
    ValueError
        If the inputs do not match (see :func:`mse`), ``data_range`` is not a
        positive number or cannot be inferred (constant reference), or, with
        no mask, a spatial dimension is smaller than the window
        (``2 * int(3.5 * sigma + 0.5) + 1`` voxels, 11 by default).

    See Also
    --------
    mse : Mean squared error.
    psnr : Peak signal-to-noise ratio.

    References
    ----------
    Z. Wang, A. C. Bovik, H. R. Sheikh and E. P. Simoncelli, "Image quality
    assessment: from error visibility to structural similarity", IEEE Trans.
    Image Process. 13(4), 600-612, 2004.

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.metrics import ssim
    >>> volume = 10 + np.random.default_rng(0).normal(size=(12, 12, 12))
    >>> ssim(volume, volume)
    1.0
    >>> ssim(volume, 20 - volume) < 0  # contrast inverted around the mean
    True
    >>> value, ssim_map = ssim(volume, 0.5 * volume, return_map=True)
    >>> ssim_map.shape
    (12, 12, 12)
    """
    if not _is_real(sigma) or not 0 < sigma < np.inf:
        raise ValueError(f"sigma must be a positive float; got {sigma!r}.")
    pair = _check_pair(reference, estimate, mask)
    ranges = _data_range(pair, data_range)
    truncate = 3.5  # an 11-voxel window at sigma=1.5, as Wang et al. 2004
    pad = int(truncate * sigma + 0.5)
    spatial = pair.reference.shape[1:]
    if pair.mask is None and min(spatial) < 2 * pad + 1:
        raise ValueError(
            f"ssim without a mask needs every spatial dimension >= {2 * pad + 1} "
            f"(the window at sigma={sigma:g}) to crop the border; got {spatial}. "
            "Pass a mask, or a smaller sigma."
        )

    def smooth(array: np.ndarray) -> np.ndarray:
        # not along the batch axis (sigma 0)
        return ndimage.gaussian_filter(
            array, sigma=(0, sigma, sigma, sigma), truncate=truncate, mode="reflect"
        )

    x, y = pair.reference, pair.estimate
    mu_x, mu_y = smooth(x), smooth(y)
    var_x = smooth(x * x) - mu_x * mu_x
    var_y = smooth(y * y) - mu_y * mu_y
    cov_xy = smooth(x * y) - mu_x * mu_y
    c1 = ((k1 * ranges) ** 2)[:, None, None, None]
    c2 = ((k2 * ranges) ** 2)[:, None, None, None]
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    if pair.mask is None:
        inner = (slice(None),) + tuple(slice(pad, n - pad) for n in spatial)
        values = ssim_map[inner].reshape(len(ssim_map), -1).mean(axis=1)
    else:
        values = pair.voxels(ssim_map).mean(axis=1)
    value = pair.output(values)
    if not return_map:
        return value
    if pair.affine is not None:
        data = np.moveaxis(ssim_map, 0, -1) if pair.batch else ssim_map[0]
        return value, nib.Nifti1Image(data, pair.affine)
    return value, ssim_map if pair.batch else ssim_map[0]
