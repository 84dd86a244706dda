"""Synthetic data sets that need no download, with their ground truth.

Each generator returns data together with the quantities that produced it (the
centres of the ellipsoids, the planted atrophy, the latent time courses, the
loadings), so that a model can be checked against the truth. All of them are
deterministic under ``random_state`` and never touch a global random state.

Volumes come as arrays of shape ``(n, x, y, z)`` or, with ``return_img=True``,
as :class:`nibabel.nifti1.Nifti1Image` on a documented grid; ground-truth maps
follow the same choice.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
from scipy.ndimage import binary_closing, map_coordinates
from sklearn.utils import check_random_state

from neurovae._validation import (
    Custom,
    Interval,
    InvalidParameterError,
    Options,
)
from neurovae.io import to_img

__all__ = [
    "make_brain_population",
    "make_contrastive",
    "make_ellipsoids",
    "make_fmri_cohort",
]

# Ground truth of make_brain_population, in MNI millimetres.
_ATROPHY_CENTER_MM = (-26.0, -20.0, -16.0)  # left hippocampus
_DEFORMATION_SIGMA_MM = 10.0  # smoothness of the per-subject displacement fields
_BIAS_SIGMA_MM = 40.0  # smoothness of the per-subject bias fields
_GM_THRESHOLD = 0.2  # as nilearn.datasets.load_mni152_gm_mask
_FWHM_TO_SIGMA = 1.0 / math.sqrt(8.0 * math.log(2.0))


# ----------------------------------------------------------------------
# parameter checks
# ----------------------------------------------------------------------
def _triple(value) -> list | None:
    """The items of a sequence or array of three items; None otherwise."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return None
    items = list(value)
    return items if len(items) == 3 else None


def _is_shape(value) -> bool:
    items = _triple(value)
    return items is not None and all(Interval(int, 4)(v) for v in items)


def _is_point(value) -> bool:
    items = _triple(value)
    return items is not None and all(Interval(float)(v) for v in items)


_POSITIVE_INT = Interval(int, 1)
_NON_NEGATIVE_INT = Interval(int, 0)
_NON_NEGATIVE = Interval(float, 0)
_FRACTION = Interval(float, 0, 1)
_BOOL = Options((True, False))
_SHAPE = Custom(_is_shape, "a sequence of three ints >= 4")
_AR_COEF = Custom(
    lambda v: Interval(float)(v) and -1 < v < 1, "a float in (-1, 1) (open)"
)
_POINT = Custom(
    lambda v: v is None or _is_point(v), "None or a sequence of three floats"
)


def _validate(function: str, **checks) -> None:
    """Raise for the first ``name=(value, rule)`` whose rule fails.

    The error, an :class:`~neurovae._validation.InvalidParameterError` (a
    ``ValueError``), names the function, the parameter, the accepted values and
    the value given, as the estimators' checks do.
    """
    for name, (value, rule) in checks.items():
        if not rule(value):
            raise InvalidParameterError(
                f"{function}: parameter {name!r} must be {rule.describe()}; "
                f"got {value!r}."
            )


def _random_state(random_state) -> np.random.RandomState:
    """A generator from ``random_state``; fresh OS entropy for None.

    Unlike :func:`sklearn.utils.check_random_state`, None does not return the
    global numpy generator, so no call here changes any global random state.
    """
    if random_state is None:
        return np.random.RandomState()
    return check_random_state(random_state)


# ----------------------------------------------------------------------
# shared building blocks
# ----------------------------------------------------------------------
def _smooth_fields(rng, n_fields: int, shape, sigma: float) -> np.ndarray:
    """``n_fields`` smooth Gaussian random fields, shape ``(n_fields, *shape)``.

    White noise smoothed by a Gaussian kernel of standard deviation ``sigma``
    voxels (``sigma=0``: white noise), scaled to exactly unit variance at every
    voxel. The noise lives on a lattice of spacing ``max(1, floor(sigma))`` that
    extends ``3 * sigma`` beyond the grid, so the field has no border effects,
    and the kernel is separable, so smoothing is three small matrix products:
    far faster than filtering at full resolution for wide kernels.
    """
    if sigma == 0:
        return rng.standard_normal((n_fields, *shape)).astype(np.float32)
    step = max(1, int(sigma))
    margin = step * math.ceil(3 * sigma / step)
    kernels = []
    for size in shape:
        nodes = np.arange(-margin, size - 1 + margin + step, step)
        kernel = np.exp(-0.5 * ((np.arange(size)[:, None] - nodes) / sigma) ** 2)
        kernel /= np.sqrt((kernel**2).sum(axis=1, keepdims=True))  # unit variance
        kernels.append(kernel.astype(np.float32))
    kx, ky, kz = kernels
    noise = rng.standard_normal((n_fields, len(kx.T), len(ky.T), len(kz.T)))
    fields = noise.astype(np.float32) @ kz.T  # (n, cx, cy, z)
    fields = ky @ fields  # (n, cx, y, z)
    fields = kx @ fields.reshape(n_fields, len(kx.T), -1)  # (n, x, y * z)
    return fields.reshape(n_fields, *shape)


def _random_rotations(rng, n: int) -> np.ndarray:
    """``n`` rotation matrices drawn uniformly (Haar measure on SO(3))."""
    q, r = np.linalg.qr(rng.standard_normal((n, 3, 3)))
    q *= np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]  # Haar on O(3)
    q[np.linalg.det(q) < 0, :, 0] *= -1  # reflections -> rotations
    return q


def _ar1(rng, coef: float, n_series: int, n_timepoints: int, n_dim: int):
    """Stationary AR(1) series of unit variance, ``(n_series, n_timepoints, n_dim)``.

    ``z[t] = coef * z[t - 1] + sqrt(1 - coef**2) * e[t]``, ``z[0] = e[0]``.
    """
    innovations = rng.standard_normal((n_series, n_timepoints, n_dim))
    series = np.empty_like(innovations)
    series[:, 0] = innovations[:, 0]
    scale = math.sqrt(1.0 - coef**2)
    for t in range(1, n_timepoints):
        series[:, t] = coef * series[:, t - 1] + scale * innovations[:, t]
    return series


def _output(data: np.ndarray, affine: np.ndarray, return_img: bool, *, split=False):
    """``data`` itself, or as images on the grid of ``affine``.

    An ``(n, x, y, z)`` stack becomes one 4-D image with ``n`` last
    (:func:`neurovae.io.to_img`), or with ``split`` one image per entry along
    axis 0; a 3-D array becomes a 3-D image (int8 for a boolean mask).
    """
    if not return_img:
        return data
    if split:
        return [_output(item, affine, True) for item in data]
    if data.ndim == 4:
        return to_img(data, affine)
    if data.dtype == bool:
        data = data.astype(np.int8)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm")
    return img


def _labels(rng, n_zeros: int, n_ones: int) -> np.ndarray:
    """``n_zeros`` zeros and ``n_ones`` ones in random order (int64)."""
    return rng.permutation(np.repeat(np.array([0, 1]), [n_zeros, n_ones]))


# ----------------------------------------------------------------------
# generators
# ----------------------------------------------------------------------
def make_ellipsoids(
    n_samples: int = 100,
    shape: Sequence[int] = (32, 32, 32),
    *,
    noise: float = 0.1,
    smoothness: float = 2.0,
    return_img: bool = False,
    random_state: int | np.random.RandomState | None = None,
) -> tuple[np.ndarray | nib.Nifti1Image, dict[str, np.ndarray]]:
    """Volumes each holding one randomly sized, placed and rotated ellipsoid.

    Every volume is smooth background noise plus one solid ellipsoid of
    constant intensity, with random semi-axes, centre and 3-D orientation: a
    small image set with a handful of known generative factors, for checking
    convolutional and hierarchical models such as a very deep VAE [1]_.

    Parameters
    ----------
    n_samples : int, default=100
        Number of volumes, at least 1.
    shape : sequence of three ints, default=(32, 32, 32)
        Grid of each volume, each size at least 4.
    noise : float, default=0.1
        Standard deviation of the background noise (the ellipsoid intensities
        lie in [0.5, 1.5]); 0 gives a clean background of zeros.
    smoothness : float, default=2.0
        Standard deviation, in voxels, of the Gaussian kernel that smooths the
        background noise; 0 gives white noise.
    return_img : bool, default=False
        Return a 4-D :class:`~nibabel.nifti1.Nifti1Image` (samples along the
        4th axis, identity affine: 1 mm voxels, voxel ``(0, 0, 0)`` at the
        origin) instead of an array.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for reproducible output. None draws fresh entropy
        from the operating system; the global numpy generator is never used.

    Returns
    -------
    X : ndarray of shape (n_samples, x, y, z), float32, or Nifti1Image
        The volumes: ``noise`` times a unit-variance smooth field, plus the
        sample's intensity inside its ellipsoid.
    params : dict of ndarray
        Ground truth, indexed by sample along the first axis, in voxel
        coordinates of the grid:

        - ``"centers"``: (n_samples, 3) float, the ellipsoid centres.
        - ``"radii"``: (n_samples, 3) float, the semi-axes, each drawn
          uniformly in ``[min(shape) / 10, min(shape) / 4]``. The centre is
          drawn so that the sphere of radius ``max(radii)`` around it lies
          inside the grid: every ellipsoid is whole.
        - ``"rotations"``: (n_samples, 3, 3) float, rotation matrices drawn
          uniformly from SO(3); column ``k`` is the direction of semi-axis
          ``k``. A voxel ``p`` is inside the ellipsoid when
          ``sum(((p - center) @ rotation / radii) ** 2) <= 1``.
        - ``"intensities"``: (n_samples,) float, uniform in [0.5, 1.5].

    See Also
    --------
    make_brain_population : A population of brain images with a group effect.

    References
    ----------
    .. [1] R. Child, "Very deep VAEs generalize autoregressive models and can
       outperform them on images", ICLR 2021.

    Examples
    --------
    >>> from neurovae.datasets import make_ellipsoids
    >>> X, params = make_ellipsoids(4, shape=(8, 8, 8), random_state=0)
    >>> X.shape, X.dtype
    ((4, 8, 8, 8), dtype('float32'))
    >>> params["radii"].shape, params["rotations"].shape
    ((4, 3), (4, 3, 3))
    >>> img, _ = make_ellipsoids(4, shape=(8, 8, 8), return_img=True)
    >>> img.shape
    (8, 8, 8, 4)
    """
    _validate(
        "make_ellipsoids",
        n_samples=(n_samples, _POSITIVE_INT),
        shape=(shape, _SHAPE),
        noise=(noise, _NON_NEGATIVE),
        smoothness=(smoothness, _NON_NEGATIVE),
        return_img=(return_img, _BOOL),
    )
    rng = _random_state(random_state)
    shape = tuple(int(size) for size in shape)
    size = min(shape)

    radii = rng.uniform(size / 10, size / 4, size=(n_samples, 3))
    reach = radii.max(axis=1, keepdims=True)
    upper = np.array(shape) - 1 - reach
    centers = reach + rng.uniform(size=(n_samples, 3)) * (upper - reach)
    rotations = _random_rotations(rng, n_samples)
    intensities = rng.uniform(0.5, 1.5, size=n_samples)

    X = _smooth_fields(rng, n_samples, shape, smoothness)
    X *= noise
    voxels = np.indices(shape, dtype=float).reshape(3, -1).T  # (n_voxels, 3)
    for volume, center, radius, rotation, intensity in zip(
        X, centers, radii, rotations, intensities
    ):
        axes = (voxels - center) @ rotation / radius
        inside = (axes**2).sum(axis=1) <= 1.0
        volume.reshape(-1)[inside] += intensity

    params = {
        "centers": centers,
        "radii": radii,
        "rotations": rotations,
        "intensities": intensities,
    }
    return _output(X, np.eye(4), return_img), params


@functools.lru_cache(maxsize=4)
def _gm_template(resolution: int):
    """The MNI152 grey-matter template, its mask and affine (read-only, cached)."""
    # Imported here: nilearn.datasets is slow to import and only needed here.
    from nilearn.datasets import load_mni152_gm_template

    img = load_mni152_gm_template(resolution=resolution)
    template = np.asarray(img.dataobj, dtype=np.float32)
    # The rule of nilearn.datasets.load_mni152_gm_mask, without a second load.
    mask = binary_closing(template > _GM_THRESHOLD, iterations=2)
    affine = np.array(img.affine, dtype=float)
    for array in (template, mask, affine):
        array.setflags(write=False)
    return template, mask, affine


def make_brain_population(
    n_samples: int = 40,
    *,
    resolution: int = 4,
    effect: float = 0.0,
    n_patients: int | None = None,
    effect_center: Sequence[float] | None = None,
    effect_fwhm: float = 20.0,
    deformation: float = 1.5,
    intensity_variation: float = 0.1,
    bias_field: float = 0.05,
    noise: float = 0.05,
    return_img: bool = True,
    random_state: int | np.random.RandomState | None = None,
) -> tuple[list[nib.Nifti1Image] | np.ndarray, np.ndarray, dict[str, Any]]:
    """Grey-matter images of a population, with an optional planted atrophy.

    Each subject is the MNI152 grey-matter template bundled with nilearn
    (:func:`nilearn.datasets.load_mni152_gm_template`, no download) warped by
    a smooth random displacement field, scaled by a global intensity factor
    and a smooth multiplicative bias field, plus white noise. ``n_patients``
    subjects (label 1) also lose grey-matter intensity in a smooth region:
    their template is multiplied by ``1 - atrophy_map`` before the warp, where
    ``atrophy_map`` is a Gaussian blob of height ``effect`` around
    ``effect_center``. With ``effect=0`` (the default) the two groups differ
    only by their labels: a null data set.

    Parameters
    ----------
    n_samples : int, default=40
        Number of subjects, at least 1.
    resolution : int, default=4
        Voxel size in mm of the template grid: 4 gives a 50 x 59 x 48 grid, 2
        gives 99 x 117 x 95.
    effect : float, default=0.0
        Fraction of grey-matter intensity that patients lose at the centre of
        the atrophy region, in [0, 1].
    n_patients : int or None, default=None
        Number of patients, in [0, n_samples]; None means ``n_samples // 2``.
    effect_center : sequence of three floats or None, default=None
        Centre of the atrophy region in MNI coordinates (mm), which do not
        depend on ``resolution``. None means ``(-26, -20, -16)``, in the left
        hippocampus. It must lie inside the template grid.
    effect_fwhm : float, default=20.0
        Full width at half maximum of the atrophy blob, in mm (> 0).
    deformation : float, default=1.5
        Standard deviation, in mm, of each component of the displacement
        fields (smoothed with a Gaussian kernel of 10 mm standard deviation).
    intensity_variation : float, default=0.1
        Standard deviation of the log of the global intensity factors.
    bias_field : float, default=0.05
        Standard deviation of the log of the multiplicative bias fields
        (smoothed with a Gaussian kernel of 40 mm standard deviation).
    noise : float, default=0.05
        Standard deviation of the white noise added to every voxel (the
        template lies in [0, 1]).
    return_img : bool, default=True
        Return images on the template's grid and affine; otherwise arrays.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for reproducible output. None draws fresh entropy
        from the operating system; the global numpy generator is never used.

    Returns
    -------
    imgs : list of Nifti1Image or ndarray of shape (n_samples, x, y, z)
        One 3-D float32 image per subject on the template's grid and affine
        (what :class:`~nilearn.maskers.NiftiMasker` takes), or with
        ``return_img=False`` the float32 volumes stacked along axis 0.
    y : ndarray of shape (n_samples,), int
        0 for controls, 1 for patients, in random order.
    info : dict
        Ground truth. Maps are Nifti1Images on the template's grid when
        ``return_img=True``, 3-D arrays otherwise:

        - ``"atrophy_map"``: float32 map of the fraction of intensity a
          patient loses at each voxel of the template (all zeros when
          ``effect=0``).
        - ``"mask"``: the grey-matter mask, the template above 0.2 closed by
          two iterations, as :func:`nilearn.datasets.load_mni152_gm_mask`
          (int8 image, or bool array).
        - ``"template"``: the float32 template every subject is built from.
        - ``"intensity_factors"``: (n_samples,) float, the global factors.
        - ``"effect_center"``: (3,) float, the centre used, in MNI mm.
        - ``"affine"``: (4, 4) float, the affine of the template grid.

    See Also
    --------
    make_fmri_cohort : Resting-state-like runs of two groups.
    make_ellipsoids : Volumes of simple shapes with known factors.
    nilearn.datasets.load_mni152_gm_template : The template used.

    Notes
    -----
    The first call for a ``resolution`` resamples the template (about half a
    second); later calls reuse it.

    Examples
    --------
    >>> from neurovae.datasets import make_brain_population
    >>> imgs, y, info = make_brain_population(
    ...     4, resolution=8, effect=0.3, random_state=0
    ... )
    >>> len(imgs), imgs[0].shape, y.tolist()
    (4, (26, 30, 25), [1, 1, 0, 0])
    >>> info["mask"].shape
    (26, 30, 25)
    """
    _validate(
        "make_brain_population",
        n_samples=(n_samples, _POSITIVE_INT),
        resolution=(resolution, _POSITIVE_INT),
        effect=(effect, _FRACTION),
        n_patients=(n_patients, Interval(int, 0, n_samples, none_ok=True)),
        effect_center=(effect_center, _POINT),
        effect_fwhm=(effect_fwhm, Interval(float, 0, low_open=True)),
        deformation=(deformation, _NON_NEGATIVE),
        intensity_variation=(intensity_variation, _NON_NEGATIVE),
        bias_field=(bias_field, _NON_NEGATIVE),
        noise=(noise, _NON_NEGATIVE),
        return_img=(return_img, _BOOL),
    )
    template, mask, affine = _gm_template(int(resolution))
    shape = template.shape
    center = np.array(
        _ATROPHY_CENTER_MM if effect_center is None else effect_center, dtype=float
    )
    center_voxel = np.linalg.solve(affine, np.append(center, 1.0))[:3]
    if np.any(center_voxel < 0) or np.any(center_voxel > np.array(shape) - 1):
        raise InvalidParameterError(
            f"make_brain_population: parameter 'effect_center' must lie inside "
            f"the template grid (MNI mm); got {effect_center!r}."
        )

    grid = np.indices(shape, dtype=np.float32)
    mm = np.tensordot(affine[:3, :3], grid, axes=1) + affine[:3, 3, None, None, None]
    distance2 = ((mm - center[:, None, None, None]) ** 2).sum(axis=0)
    sigma = effect_fwhm * _FWHM_TO_SIGMA
    atrophy_map = (effect * np.exp(-0.5 * distance2 / sigma**2)).astype(np.float32)
    anatomies = (template, template * (1.0 - atrophy_map))

    # Draws do not depend on ``effect``: one seed gives the same subjects.
    rng = _random_state(random_state)
    n_patients = n_samples // 2 if n_patients is None else int(n_patients)
    y = _labels(rng, n_samples - n_patients, n_patients)
    intensity_factors = np.exp(intensity_variation * rng.standard_normal(n_samples))
    voxel_size = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # mm per voxel
    X = np.empty((n_samples, *shape), dtype=np.float32)
    for i in range(n_samples):
        displacement = _smooth_fields(
            rng, 3, shape, _DEFORMATION_SIGMA_MM / voxel_size.mean()
        )
        displacement *= (deformation / voxel_size)[:, None, None, None]
        bias = _smooth_fields(rng, 1, shape, _BIAS_SIGMA_MM / voxel_size.mean())[0]
        X[i] = map_coordinates(
            anatomies[y[i]], grid + displacement, order=1, mode="nearest"
        )
        X[i] *= intensity_factors[i] * np.exp(bias_field * bias)
        X[i] += noise * rng.standard_normal(shape)

    info = {
        "atrophy_map": _output(atrophy_map, affine, return_img),
        "mask": _output(mask, affine, return_img),
        "template": _output(template.copy(), affine, return_img),
        "intensity_factors": intensity_factors,
        "effect_center": center,
        "affine": affine.copy(),
    }
    return _output(X, affine, return_img, split=True), y, info


def make_fmri_cohort(
    n_controls: int = 10,
    n_patients: int = 10,
    n_timepoints: int = 50,
    *,
    shape: Sequence[int] = (16, 16, 16),
    n_components: int = 4,
    ar_coef: float = 0.8,
    effect: float = 0.5,
    spatial_variation: float = 0.1,
    noise: float = 0.3,
    return_img: bool = True,
    random_state: int | np.random.RandomState | None = None,
) -> tuple[list[nib.Nifti1Image] | np.ndarray, np.ndarray, dict[str, Any]]:
    """Functional runs of two groups: spatial networks driven by AR(1) dynamics.

    Every run is a sum of ``n_components`` smooth, non-negative spatial
    patterns ("networks"), shared by all subjects up to a small per-subject
    perturbation, each weighted at every time point by its latent time course,
    a stationary AR(1) process of coefficient ``ar_coef`` and unit variance,
    plus white noise. In patients the first pattern is damped by the factor
    ``1 - effect``: the region it covers carries less signal. The latent
    dynamics are those a recurrent VAE models.

    Parameters
    ----------
    n_controls : int, default=10
        Number of control subjects (label 0), at least 0.
    n_patients : int, default=10
        Number of patients (label 1), at least 0; the two sum to at least 1.
    n_timepoints : int, default=50
        Length of every run, at least 2.
    shape : sequence of three ints, default=(16, 16, 16)
        Grid of each volume, each size at least 4.
    n_components : int, default=4
        Number of spatial patterns and latent time courses, at least 1.
    ar_coef : float, default=0.8
        Lag-1 coefficient of the latent AR(1) processes, in (-1, 1).
    effect : float, default=0.5
        Fraction by which the first pattern is damped in patients, in [0, 1].
    spatial_variation : float, default=0.1
        Standard deviation of the per-subject multiplicative perturbation of
        the patterns.
    noise : float, default=0.3
        Standard deviation of the white noise (patterns peak at 1 and time
        courses have unit variance).
    return_img : bool, default=True
        Return images (identity affine: 1 mm voxels, voxel ``(0, 0, 0)`` at the
        origin); otherwise arrays.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for reproducible output. None draws fresh entropy
        from the operating system; the global numpy generator is never used.

    Returns
    -------
    runs : list of Nifti1Image or ndarray of shape \
(n_subjects, n_timepoints, x, y, z)
        One 4-D float32 image per subject, time along the 4th axis, or with
        ``return_img=False`` the float32 runs stacked along axis 0;
        ``n_subjects = n_controls + n_patients``.
    y : ndarray of shape (n_subjects,), int
        0 for controls, 1 for patients, in random order.
    info : dict
        Ground truth (maps are images when ``return_img=True``):

        - ``"patterns"``: the shared float32 patterns, an array of shape
          (n_components, x, y, z) or a 4-D image with components along the 4th
          axis. Each is a smooth random field (standard deviation
          ``min(shape) / 8`` voxels) kept above its 80th percentile, so it
          covers a fifth of the volume, and scaled to peak at 1.
        - ``"time_courses"``: (n_subjects, n_timepoints, n_components) float,
          the latent AR(1) processes, before damping.
        - ``"amplitudes"``: (n_subjects, n_components) float, the factor of
          each pattern in each subject: 1, except ``1 - effect`` for
          component 0 in patients. The noise-free run of subject ``i`` is
          ``sum_k amplitudes[i, k] * time_courses[i, :, k] * pattern_ik``
          with ``pattern_ik`` pattern ``k`` perturbed for subject ``i``.
        - ``"effect_mask"``: the voxels that pattern 0 covers, a bool array or
          an int8 3-D image.
        - ``"ar_coef"``: float, the coefficient used.

    See Also
    --------
    make_brain_population : Structural images with a planted atrophy.

    Examples
    --------
    >>> from neurovae.datasets import make_fmri_cohort
    >>> runs, y, info = make_fmri_cohort(
    ...     2, 2, 10, shape=(8, 8, 8), random_state=0
    ... )
    >>> len(runs), runs[0].shape, sorted(y.tolist())
    (4, (8, 8, 8, 10), [0, 0, 1, 1])
    >>> info["time_courses"].shape
    (4, 10, 4)
    """
    _validate(
        "make_fmri_cohort",
        n_controls=(n_controls, _NON_NEGATIVE_INT),
        n_patients=(n_patients, _NON_NEGATIVE_INT),
        n_timepoints=(n_timepoints, Interval(int, 2)),
        shape=(shape, _SHAPE),
        n_components=(n_components, _POSITIVE_INT),
        ar_coef=(ar_coef, _AR_COEF),
        effect=(effect, _FRACTION),
        spatial_variation=(spatial_variation, _NON_NEGATIVE),
        noise=(noise, _NON_NEGATIVE),
        return_img=(return_img, _BOOL),
    )
    n_subjects = int(n_controls) + int(n_patients)
    if n_subjects < 1:
        raise InvalidParameterError(
            "make_fmri_cohort: parameters 'n_controls' and 'n_patients' must sum "
            "to at least 1; got 0."
        )
    rng = _random_state(random_state)
    shape = tuple(int(size) for size in shape)
    sigma = min(shape) / 8

    y = _labels(rng, int(n_controls), int(n_patients))
    fields = _smooth_fields(rng, n_components, shape, sigma)
    threshold = np.quantile(fields, 0.8, axis=(1, 2, 3), keepdims=True)
    patterns = np.maximum(fields - threshold, 0.0)
    patterns /= patterns.max(axis=(1, 2, 3), keepdims=True)
    time_courses = _ar1(rng, ar_coef, n_subjects, n_timepoints, n_components)
    amplitudes = np.ones((n_subjects, n_components))
    amplitudes[y == 1, 0] = 1.0 - effect

    runs = np.empty((n_subjects, n_timepoints, *shape), dtype=np.float32)
    for i in range(n_subjects):
        perturbation = _smooth_fields(rng, n_components, shape, sigma)
        subject_patterns = patterns * (1.0 + spatial_variation * perturbation)
        weights = (time_courses[i] * amplitudes[i]).astype(np.float32)
        runs[i] = np.tensordot(weights, subject_patterns, axes=1)
        runs[i] += noise * rng.standard_normal((n_timepoints, *shape))

    info = {
        "patterns": _output(patterns, np.eye(4), return_img),
        "time_courses": time_courses,
        "amplitudes": amplitudes,
        "effect_mask": _output(patterns[0] > 0, np.eye(4), return_img),
        "ar_coef": float(ar_coef),
    }
    return _output(runs, np.eye(4), return_img, split=True), y, info


def make_contrastive(
    n_background: int = 200,
    n_target: int = 200,
    n_features: int = 50,
    *,
    n_shared: int = 2,
    n_salient: int = 2,
    salient_std: float = 0.5,
    n_clusters: int = 0,
    mixing: str = "linear",
    noise: float = 0.1,
    random_state: int | np.random.RandomState | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Background and target samples for contrastive analysis.

    Both groups vary along ``n_shared`` factors mixed into the features by a
    shared loading matrix; only the target group also varies along
    ``n_salient`` factors mixed by a second loading matrix. The salient
    variation is weaker than the shared one by default, so methods that look
    at the target alone find the shared factors first, while contrastive ones
    (contrastive PCA, the contrastive VAE [1]_) recover the salient factors.

    The target group can be made of subgroups (``n_clusters``, e.g. disease
    subtypes) that differ in their salient factors only, and the mixing can
    be nonlinear (``mixing="tanh"``), where linear methods fall short.

    Parameters
    ----------
    n_background : int, default=200
        Number of background samples (label 0), at least 1.
    n_target : int, default=200
        Number of target samples (label 1), at least 1.
    n_features : int, default=50
        Number of features, at least 1.
    n_shared : int, default=2
        Number of factors of both groups, at least 0.
    n_salient : int, default=2
        Number of factors of the target group only, at least 0.
    salient_std : float, default=0.5
        Standard deviation of the salient factors (the shared factors have
        standard deviation 1), at least 0. With clusters, the spread of the
        salient factors within a cluster is ``salient_std / 2``.
    n_clusters : int, default=0
        Number of target subgroups. 0: the salient factors of target samples
        are normal with standard deviation ``salient_std``. ``k >= 1``: each
        target sample belongs to one of ``k`` subgroups (at random, sizes as
        equal as possible) whose salient factors are centred on points
        ``2 * salient_std`` from the origin, evenly spaced on a circle in the
        first two salient dimensions (on a line when ``n_salient=1``).
    mixing : {"linear", "tanh"}, default="linear"
        "linear": ``X = shared_factors @ shared_loadings + salient_factors @
        salient_loadings + noise``. "tanh": the same sum passed through
        ``tanh`` before the noise is added; saturation makes the effect of
        the salient factors depend on the shared ones.
    noise : float, default=0.1
        Standard deviation of the white noise added to every feature.
    random_state : int, RandomState instance or None, default=None
        Seed or generator for reproducible output. None draws fresh entropy
        from the operating system; the global numpy generator is never used.

    Returns
    -------
    X : ndarray of shape (n_background + n_target, n_features), float64
        The samples, in random order, mixed as ``mixing`` says.
    y : ndarray of shape (n_background + n_target,), int
        0 for background, 1 for target samples.
    info : dict of ndarray
        Ground truth, aligned with the rows of ``X``:

        - ``"shared_factors"``: (n_samples, n_shared), standard normal.
        - ``"salient_factors"``: (n_samples, n_salient), normal with standard
          deviation ``salient_std`` for targets, exactly 0 for background
          samples.
        - ``"shared_loadings"``: (n_shared, n_features), standard normal.
        - ``"salient_loadings"``: (n_salient, n_features), standard normal.
        - ``"target_cluster"``: (n_samples,), int: -1 for background samples,
          the subgroup (``0 .. n_clusters - 1``; 0 without clusters) for
          target samples.

    See Also
    --------
    make_fmri_cohort : Two groups of functional runs.

    References
    ----------
    .. [1] A. Abid and J. Zou, "Contrastive variational autoencoder enhances
       salient features", arXiv:1902.04601, 2019.

    Examples
    --------
    >>> from neurovae.datasets import make_contrastive
    >>> X, y, info = make_contrastive(5, 3, 4, random_state=0)
    >>> X.shape, y.tolist().count(1), info["salient_factors"].shape
    ((8, 4), 3, (8, 2))
    >>> bool((info["salient_factors"][y == 0] == 0).all())
    True

    Three target subgroups, nonlinear mixing:

    >>> X, y, info = make_contrastive(5, 6, 4, n_clusters=3, mixing="tanh",
    ...                               random_state=0)
    >>> sorted(set(info["target_cluster"][y == 1].tolist()))
    [0, 1, 2]
    """
    _validate(
        "make_contrastive",
        n_background=(n_background, _POSITIVE_INT),
        n_target=(n_target, _POSITIVE_INT),
        n_features=(n_features, _POSITIVE_INT),
        n_shared=(n_shared, _NON_NEGATIVE_INT),
        n_salient=(n_salient, _NON_NEGATIVE_INT),
        salient_std=(salient_std, _NON_NEGATIVE),
        n_clusters=(n_clusters, _NON_NEGATIVE_INT),
        mixing=(mixing, Options(("linear", "tanh"))),
        noise=(noise, _NON_NEGATIVE),
    )
    rng = _random_state(random_state)
    n_samples = int(n_background) + int(n_target)
    y = _labels(rng, int(n_background), int(n_target))
    shared_loadings = rng.standard_normal((n_shared, n_features))
    salient_loadings = rng.standard_normal((n_salient, n_features))
    shared_factors = rng.standard_normal((n_samples, n_shared))
    salient_factors = salient_std * rng.standard_normal((n_samples, n_salient))
    cluster = np.where(y == 1, 0, -1)
    if n_clusters > 0 and n_salient > 0:
        cluster[y == 1] = rng.permutation(np.arange(int(n_target)) % n_clusters)
        centres = np.zeros((n_clusters, n_salient))
        if n_salient == 1:
            centres[:, 0] = np.linspace(-2.0, 2.0, n_clusters) if n_clusters > 1 else 0
        else:
            angle = 2 * np.pi * np.arange(n_clusters) / n_clusters
            centres[:, 0], centres[:, 1] = 2 * np.cos(angle), 2 * np.sin(angle)
        targets = y == 1
        salient_factors[targets] *= 0.5
        salient_factors[targets] += salient_std * centres[cluster[targets]]
    salient_factors[y == 0] = 0.0
    X = shared_factors @ shared_loadings + salient_factors @ salient_loadings
    if mixing == "tanh":
        X = np.tanh(X)
    X += noise * rng.standard_normal((n_samples, n_features))
    info = {
        "shared_factors": shared_factors,
        "salient_factors": salient_factors,
        "shared_loadings": shared_loadings,
        "salient_loadings": salient_loadings,
        "target_cluster": cluster,
    }
    return X, y, info
