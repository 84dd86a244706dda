"""Niimg-like input and output.

What turns images into the arrays and tensors the models see, and back:

- :func:`check_niimgs` reads Niimg-like input (a 4-D image with samples along
  the 4th axis, a list of 3-D images, or paths to ``.nii`` / ``.nii.gz``
  files), checks that every image shares one grid (shape and affine) and
  returns an :class:`ImageCollection` that loads samples on demand: images
  that live on disk are read lazily, a few at a time. :func:`check_runs`
  does the same for sequences (a list of 4-D images, one run each).
- :class:`VolumeDataset` is the ``torch`` dataset over such a collection, read
  by a ``DataLoader`` (with worker processes) when a study does not fit in
  memory.
- :func:`check_mask` and :class:`Preprocessing` restrict a model to brain
  voxels and scale raw intensities (``"minmax"`` or ``"zscore"``, fitted on
  the training data and inverted on output).
- :func:`to_img` puts arrays of samples back on the training grid as one 4-D
  ``Nifti1Image``, as ``NiftiMasker.inverse_transform`` does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from nibabel.spatialimages import SpatialImage

__all__ = [
    "DataStatistics",
    "ImageCollection",
    "Preprocessing",
    "VolumeDataset",
    "check_mask",
    "check_niimgs",
    "check_runs",
    "collate",
    "is_niimg_like",
    "load_volumes",
    "same_grid_affine",
    "to_img",
]

_AFFINE_ATOL = 1e-4  # affines closer than this (in mm) describe one grid


def is_niimg_like(X) -> bool:
    """Whether ``X`` is Niimg-like: an image, a path, or a list of them.

    Parameters
    ----------
    X : object
        Anything a user may pass as data.

    Returns
    -------
    bool
        True for a nibabel spatial image, a path (``str`` or path-like), or a
        non-empty list or tuple whose first element is one of these.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> from neurovae.io import is_niimg_like
    >>> img = nib.Nifti1Image(np.zeros((2, 2, 2), dtype=np.float32), np.eye(4))
    >>> is_niimg_like(img), is_niimg_like([img, img]), is_niimg_like("a.nii.gz")
    (True, True, True)
    >>> is_niimg_like(np.zeros((4, 2, 2, 2)))
    False
    """
    if isinstance(X, (SpatialImage, str, os.PathLike)):
        return True
    return (
        isinstance(X, (list, tuple))
        and len(X) > 0
        and isinstance(X[0], (SpatialImage, str, os.PathLike))
    )


def same_grid_affine(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two affines describe one grid (equal to 1e-4 mm).

    Parameters
    ----------
    a, b : ndarray of shape (4, 4)
        Voxel-to-world affines.

    Returns
    -------
    bool

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.io import same_grid_affine
    >>> same_grid_affine(np.eye(4), np.eye(4) + 1e-6), same_grid_affine(
    ...     np.eye(4), 2 * np.eye(4)
    ... )
    (True, False)
    """
    return np.allclose(a, b, atol=_AFFINE_ATOL, rtol=0)


def _describe(item, where: str) -> str:
    """``X[3] ('sub-03.nii.gz')`` or ``X[3]`` for an in-memory image."""
    if isinstance(item, (str, os.PathLike)):
        return f"{where} ({os.fspath(item)!r})"
    return where


def _load(item, where: str) -> SpatialImage:
    """A nibabel image for a path or image (data not read), or a clear error."""
    if isinstance(item, SpatialImage):
        return item
    if not isinstance(item, (str, os.PathLike)):
        raise TypeError(
            f"{where} is a {type(item).__name__}; Niimg-like input is a 4-D "
            "image, or a list of 3-D images or of paths to NIfTI files."
        )
    path = os.fspath(item)
    if not os.path.exists(path):
        raise ValueError(f"{where}: the file {path!r} does not exist.")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises several types for bad files
        raise ValueError(
            f"{where}: cannot read {path!r} as an image ({type(exc).__name__}: {exc})."
        ) from exc


@dataclass(frozen=True)
class _Sample:
    """One sample: an image (maybe a file proxy) and its frame, if 4-D."""

    image: SpatialImage
    frame: int | None
    where: str


class ImageCollection:
    """Samples on one grid, loaded on demand from images or files.

    Built by :func:`check_niimgs`. Data of images that live on disk is read
    only when a sample is asked for, so a collection of many files costs
    almost no memory.

    Attributes
    ----------
    shape : tuple of int
        The spatial shape ``(x, y, z)`` of every sample.
    affine : ndarray of shape (4, 4)
        The voxel-to-world affine shared by every sample.
    n_samples : int
        Number of samples.
    in_memory : bool
        True when every image holds its data in memory (no file proxies).

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> from neurovae.io import check_niimgs
    >>> img = nib.Nifti1Image(np.ones((3, 4, 5, 6), dtype=np.float32), np.eye(4))
    >>> images = check_niimgs(img)  # a 4-D image: 6 samples of shape (3, 4, 5)
    >>> images.n_samples, images.shape
    (6, (3, 4, 5))
    >>> images.load([0, 2]).shape
    (2, 3, 4, 5)
    """

    def __init__(
        self, samples: Sequence[_Sample], shape: tuple[int, ...], affine: np.ndarray
    ) -> None:
        self._samples = list(samples)
        self.shape = tuple(int(s) for s in shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.n_samples = len(self._samples)
        self.in_memory = not any(nib.is_proxy(s.image.dataobj) for s in self._samples)

    def __len__(self) -> int:
        return self.n_samples

    def frame(self, index: int) -> int | None:
        """The 4th-axis index of sample ``index`` in its image (None: 3-D)."""
        return self._samples[index].frame

    def where(self, index: int) -> str:
        """How the sample at ``index`` is named in error messages."""
        return self._samples[index].where

    def read(self, index: int, dtype=np.float32) -> np.ndarray:
        """The sample at ``index`` as an array of shape :attr:`shape`."""
        sample = self._samples[index]
        data = sample.image.dataobj
        try:
            if sample.frame is None:
                values = np.asarray(data, dtype=dtype)
            else:
                values = np.asarray(data[..., sample.frame], dtype=dtype)
        except Exception as exc:  # truncated or corrupt files fail here
            raise ValueError(
                f"{sample.where}: reading the image data failed "
                f"({type(exc).__name__}: {exc})."
            ) from exc
        return values.reshape(self.shape)

    def load(
        self, indices: Iterable[int] | None = None, dtype=np.float32
    ) -> np.ndarray:
        """Samples ``indices`` (all by default) as one array ``(n, x, y, z)``."""
        if indices is None:
            indices = range(self.n_samples)
        indices = list(indices)
        out = np.empty((len(indices), *self.shape), dtype=dtype)
        for row, index in enumerate(indices):
            out[row] = self.read(index, dtype)
        return out


def _grid_error(where, what, got, expected, reference) -> ValueError:
    return ValueError(
        f"{where} has {what} {got}, but {reference} has {what} {expected}; all "
        "images must share one grid (resample them first, e.g. with "
        "nilearn.image.resample_to_img)."
    )


def check_niimgs(
    X,
    *,
    shape: tuple[int, ...] | None = None,
    affine: np.ndarray | None = None,
    name: str = "X",
    allow_single: bool = False,
    reference: str = "the model's training grid",
) -> ImageCollection:
    """Check Niimg-like input and return its samples as a lazy collection.

    Parameters
    ----------
    X : Niimg-like
        A 4-D image or path to one (samples along the 4th axis), or a list of
        3-D images or paths (one sample each). A 3-D image with a trailing
        axis of length one counts as 3-D.
    shape, affine : optional
        The grid the images must be on (e.g. a fitted model's). By default the
        first image sets the grid.
    name : str, default="X"
        The argument's name in error messages.
    allow_single : bool, default=False
        Accept a single 3-D image as one sample (estimators refuse it, so that
        a 3-D image passed by mistake for a 4-D one is not one sample).
    reference : str, default="the model's training grid"
        What ``shape`` / ``affine`` come from, in error messages.

    Returns
    -------
    ImageCollection
        The samples; data on disk is not read yet (headers are).

    Raises
    ------
    ValueError
        For a single 3-D image (pass a list, or a 4-D image), a 4-D image
        inside a list, an empty list, files that are missing or unreadable,
        and images whose shape or affine differs from the first image (or
        from ``shape`` / ``affine``); the message names the first bad image.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> from neurovae.io import check_niimgs
    >>> imgs = [nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))] * 3
    >>> check_niimgs(imgs).n_samples
    3
    >>> shifted = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), 2 * np.eye(4))
    >>> check_niimgs(imgs + [shifted])
    Traceback (most recent call last):
    ...
    ValueError: X[3] has affine ...
    """
    samples: list[_Sample] = []
    if isinstance(X, (SpatialImage, str, os.PathLike)):
        img = _load(X, name)
        where = _describe(X, name)
        if len(img.shape) == 4 and img.shape[3] >= 1:
            samples = [
                _Sample(img, t, f"{where}, volume {t}") for t in range(img.shape[3])
            ]
        elif allow_single and len(img.shape) == 3:
            samples = [_Sample(img, None, where)]
        else:
            raise ValueError(
                f"{name} is a single {len(img.shape)}-D image of shape "
                f"{img.shape}; pass a 4-D image (samples along the 4th axis) or "
                "a list of 3-D images, one per sample (e.g. [img] for one)."
            )
    elif isinstance(X, (list, tuple)):
        if len(X) == 0:
            raise ValueError(f"{name} is an empty list; it must hold images.")
        for i, item in enumerate(X):
            where = _describe(item, f"{name}[{i}]")
            img = _load(item, where)
            img_shape = tuple(img.shape)
            if len(img_shape) == 4 and img_shape[3] == 1:
                samples.append(_Sample(img, 0, where))
            elif len(img_shape) == 3:
                samples.append(_Sample(img, None, where))
            else:
                raise ValueError(
                    f"{where} is a {len(img_shape)}-D image of shape {img_shape}; "
                    f"a list must hold 3-D images, one per sample. Pass a 4-D "
                    "image by itself, or split it (nilearn.image.iter_img)."
                )
    else:
        raise TypeError(
            f"{name} of type {type(X).__name__} is not Niimg-like (a 4-D image, "
            "or a list of 3-D images or of file paths)."
        )
    first = samples[0]
    first_name = first.where.split(", volume")[0]
    shape_ref = affine_ref = reference
    if shape is None:
        shape, shape_ref = first.image.shape[:3], first_name
    if affine is None:
        affine, affine_ref = first.image.affine, first_name
    shape = tuple(int(s) for s in shape)
    affine = np.asarray(affine, dtype=np.float64)
    seen = set()
    for sample in samples:
        img = sample.image
        if id(img) in seen:  # the frames of one 4-D image share its grid
            continue
        seen.add(id(img))
        where = sample.where.split(", volume")[0]
        if tuple(img.shape[:3]) != shape:
            raise _grid_error(where, "shape", tuple(img.shape[:3]), shape, shape_ref)
        if img.affine is None or not same_grid_affine(img.affine, affine):
            raise _grid_error(
                where,
                "affine",
                np.round(np.asarray(img.affine, dtype=float), 4).tolist(),
                np.round(affine, 4).tolist(),
                affine_ref,
            )
    return ImageCollection(samples, shape, affine)


def check_runs(
    X,
    *,
    shape: tuple[int, ...] | None = None,
    affine: np.ndarray | None = None,
    name: str = "X",
) -> list[ImageCollection]:
    """Check Niimg-like sequences (runs) and return one collection per run.

    The sequence-aware counterpart of :func:`check_niimgs`, which checks each
    run: a list of 4-D images or paths, one run each, time along the 4th
    axis, all on one grid.

    Parameters
    ----------
    X : list of Niimg-like
        4-D images or paths to 4-D NIfTI files, one per run.
    shape, affine : optional
        The grid every run must be on (e.g. a fitted model's). By default the
        first run sets the grid.
    name : str, default="X"
        The argument's name in error messages.

    Returns
    -------
    list of ImageCollection
        The frames of each run (data on disk is not read yet).

    Raises
    ------
    ValueError
        For a single image (pass a list), an empty list, a 3-D image where a
        run is needed, unreadable files, or runs on another grid than the
        first (or than ``shape`` / ``affine``); the message names the first
        bad run.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> from neurovae.io import check_runs
    >>> runs = [nib.Nifti1Image(np.zeros((4, 4, 4, t), np.float32), np.eye(4))
    ...         for t in (5, 3)]
    >>> [run.n_samples for run in check_runs(runs)]
    [5, 3]
    >>> check_runs(runs + [nib.Nifti1Image(np.zeros((4, 4, 4)), np.eye(4))])
    Traceback (most recent call last):
    ...
    ValueError: X[2] is a 3-D image of shape (4, 4, 4); a run is a 4-D image ...
    """
    if not isinstance(X, (list, tuple)):
        raise ValueError(
            f"{name} must be a list of 4-D images or paths, one per run (time "
            f"along the 4th axis); got a single {type(X).__name__}. Pass [img] "
            "for one run."
        )
    if len(X) == 0:
        raise ValueError(f"{name} is an empty list; it must hold runs.")
    runs: list[ImageCollection] = []
    reference = "the model's training grid"
    for i, item in enumerate(X):
        where = _describe(item, f"{name}[{i}]")
        img = _load(item, where)
        if len(img.shape) != 4:
            raise ValueError(
                f"{where} is a {len(img.shape)}-D image of shape "
                f"{tuple(img.shape)}; a run is a 4-D image (time along the 4th "
                "axis). Pass one 4-D image per run."
            )
        run = check_niimgs(
            img, shape=shape, affine=affine, name=where, reference=reference
        )
        if shape is None:
            shape, affine = run.shape, run.affine
            reference = where
        runs.append(run)
    return runs


def load_volumes(
    data, *, name: str = "X", dtype=np.float64
) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Volumes given as arrays or images, as one array ``(n, x, y, z)``.

    For functions that take one volume or a batch (metrics, plots), in
    memory: arrays ``(x, y, z)`` or ``(n, x, y, z)``, a 3-D or 4-D image, or
    a list of 3-D images or paths on one grid (checked by
    :func:`check_niimgs`).

    Parameters
    ----------
    data : array-like or Niimg-like
        One volume or a batch.
    name : str, default="X"
        The argument's name in error messages.
    dtype : numpy dtype, default=np.float64
        Dtype of the returned array.

    Returns
    -------
    volumes : ndarray of shape (n, x, y, z)
    affine : ndarray of shape (4, 4) or None
        The images' affine; None for arrays.
    batch : bool
        False when ``data`` was a single volume.

    Raises
    ------
    ValueError
        For other shapes, images on different grids, empty data, NaN or inf.

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.io import load_volumes
    >>> volumes, affine, batch = load_volumes(np.zeros((4, 5, 6)))
    >>> volumes.shape, affine, batch
    ((1, 4, 5, 6), None, False)
    """
    if is_niimg_like(data):
        images = check_niimgs(data, name=name, allow_single=True)
        single = not isinstance(data, (list, tuple)) and images.frame(0) is None
        volumes, affine, batch = images.load(dtype=dtype), images.affine, not single
    else:
        volumes, affine = np.asarray(data, dtype=dtype), None
        if volumes.ndim not in (3, 4):
            raise ValueError(
                f"{name} must be one volume (x, y, z) or a batch (n, x, y, z); "
                f"got an array of shape {volumes.shape}."
            )
        batch = volumes.ndim == 4
        volumes = volumes if batch else volumes[None]
    if volumes.size == 0:
        raise ValueError(f"{name} is empty (shape {volumes.shape}).")
    if not np.isfinite(volumes).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return volumes, affine, batch


def to_img(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """Samples ``(n, x, y, z)`` as one 4-D image, samples along the 4th axis.

    Parameters
    ----------
    data : ndarray of shape (n_samples, x, y, z)
        Volumes on the grid of ``affine``.
    affine : ndarray of shape (4, 4)
        Voxel-to-world affine.

    Returns
    -------
    nibabel.Nifti1Image
        A 4-D image of shape ``(x, y, z, n_samples)``, in the dtype of
        ``data``.

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.io import to_img
    >>> to_img(np.zeros((5, 2, 3, 4), dtype=np.float32), np.eye(4)).shape
    (2, 3, 4, 5)
    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise ValueError(f"data must be (n_samples, x, y, z); got shape {data.shape}")
    img = nib.Nifti1Image(np.moveaxis(data, 0, -1), np.asarray(affine, float))
    img.header.set_xyzt_units("mm")
    return img


# ----------------------------------------------------------------------
# masks and intensity scaling
# ----------------------------------------------------------------------
def check_mask(
    mask_img,
    shape: tuple[int, ...],
    affine: np.ndarray | None,
    *,
    resample: bool = True,
    name: str = "mask_img",
):
    """A boolean mask on the grid ``shape`` / ``affine``.

    Parameters
    ----------
    mask_img : Niimg-like or array-like
        A 3-D mask image (or path), resampled to the grid with
        nearest-neighbour interpolation when its grid differs; or a boolean
        (or 0 / 1) array of shape ``shape``.
    shape : tuple of int
        Spatial shape of the data.
    affine : ndarray of shape (4, 4) or None
        Affine of the data; None for data given as arrays (a mask image is
        then used as is and must have shape ``shape``).
    resample : bool, default=True
        Resample a mask image on another grid; if False, that is an error.
    name : str, default="mask_img"
        The argument's name in error messages.

    Returns
    -------
    mask : ndarray of bool and shape ``shape``

    Raises
    ------
    ValueError
        If the mask is not binary, has the wrong shape, or selects no voxel.

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.io import check_mask
    >>> mask = np.zeros((4, 4, 4), dtype=bool)
    >>> mask[1:3, 1:3, 1:3] = True
    >>> int(check_mask(mask, (4, 4, 4), None).sum())
    8
    """
    from nilearn.masking import load_mask_img

    if is_niimg_like(mask_img):
        if isinstance(mask_img, (list, tuple)):
            raise ValueError(f"{name} must be one 3-D image, not a list.")
        img = _load(mask_img, name)
        if affine is not None and (
            tuple(img.shape[:3]) != tuple(shape)
            or not same_grid_affine(img.affine, affine)
        ):
            if not resample:
                raise ValueError(f"{name} is not on the grid of the data.")
            from nilearn.image import resample_img

            img = resample_img(
                img,
                target_affine=affine,
                target_shape=tuple(shape),
                interpolation="nearest",
                force_resample=True,
                copy_header=True,
            )
        try:
            mask, _ = load_mask_img(img)
        except Exception as exc:
            raise ValueError(f"{name} is not a valid mask: {exc}") from exc
    else:
        values = np.asarray(mask_img)
        if values.dtype != bool:
            if not (
                np.issubdtype(values.dtype, np.number) and np.isin(values, (0, 1)).all()
            ):
                raise ValueError(
                    f"{name} must be a boolean array (or of 0 and 1 only), or "
                    "a mask image."
                )
            values = values.astype(bool)
        mask = values
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, but the samples have "
            f"shape {tuple(shape)}."
        )
    if not mask.any():
        raise ValueError(f"{name} selects no voxel.")
    return np.ascontiguousarray(mask, dtype=bool)


@dataclass
class DataStatistics:
    """Voxel statistics of a data set (float64, inside the mask).

    Attributes
    ----------
    n_values : int
        Number of values counted.
    mean, std, min, max : float
        Their mean, standard deviation, minimum and maximum.
    """

    n_values: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    min: float = math.inf
    max: float = -math.inf

    @property
    def std(self) -> float:
        """Standard deviation of the values counted (0 before any)."""
        return math.sqrt(self.m2 / self.n_values) if self.n_values else 0.0

    def update(
        self,
        batch: np.ndarray,
        mask: np.ndarray | None = None,
        where: Sequence[str] | None = None,
    ) -> None:
        """Add the samples of ``batch`` (first axis) one by one.

        Per-sample statistics are merged in order (Chan et al.), so the
        result does not depend on how samples are grouped into batches.
        ``mask`` (broadcast to one sample) selects the values counted;
        ``where`` names the samples for the error raised on NaN or inf.
        """
        batch = np.asarray(batch)
        rows = batch.reshape(len(batch), -1)
        if mask is not None:
            rows = rows[:, np.broadcast_to(mask, batch.shape[1:]).ravel()]
        rows = rows.astype(np.float64)
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            name = where[bad] if where is not None else f"sample {bad}"
            raise ValueError(f"{name} contains NaN or infinite values.")
        if rows.shape[1] == 0:
            return
        means = rows.mean(axis=1)
        m2s = ((rows - means[:, None]) ** 2).sum(axis=1)
        lows, highs = rows.min(axis=1), rows.max(axis=1)
        size = rows.shape[1]
        for mean, m2, low, high in zip(means, m2s, lows, highs):
            n = self.n_values + size
            delta = mean - self.mean
            self.mean += delta * size / n
            self.m2 += m2 + delta**2 * self.n_values * size / n
            self.n_values = n
            self.min = min(self.min, float(low))
            self.max = max(self.max, float(high))


class Preprocessing:
    """Intensity scaling and masking of samples, and their inverse.

    ``forward`` maps raw samples to what the network sees,
    ``(x - offset) / scale`` with zeros outside the mask (whatever the raw
    values there, NaN included); ``inverse`` maps
    network outputs back to raw intensities, zero outside the mask.

    Parameters
    ----------
    offset, scale : float
        The scaling; ``scale > 0``.
    mask : ndarray of bool or None
        Voxels kept, of the samples' spatial shape (broadcast over channels).

    Examples
    --------
    >>> import numpy as np, torch
    >>> from neurovae.io import Preprocessing
    >>> prep = Preprocessing(offset=10.0, scale=2.0, mask=None)
    >>> prep.forward(torch.tensor([[10.0, 14.0]]))
    tensor([[0., 2.]])
    >>> prep.inverse(np.array([[0.0, 2.0]]))
    array([[10., 14.]])
    """

    def __init__(self, offset: float, scale: float, mask: np.ndarray | None) -> None:
        self.offset = float(offset)
        self.scale = float(scale)
        self.mask = mask
        self._outside = None if mask is None else torch.from_numpy(~mask)

    @classmethod
    def fit(
        cls, stats: DataStatistics, scaling: str | None, mask: np.ndarray | None
    ) -> Preprocessing:
        """The scaling named ``scaling`` for data with statistics ``stats``."""
        offset, scale = 0.0, 1.0
        if scaling == "minmax":
            offset, scale = stats.min, stats.max - stats.min
        elif scaling == "zscore":
            offset, scale = stats.mean, stats.std
        if not (math.isfinite(scale) and scale > 0):  # constant data
            scale = 1.0
        return cls(offset, scale, mask)

    @property
    def is_identity(self) -> bool:
        """True when forward and inverse change nothing."""
        return self.offset == 0.0 and self.scale == 1.0 and self.mask is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw float32 samples ``(n, ...)`` to network input (in place)."""
        if self.offset != 0.0:
            x.sub_(self.offset)
        if self.scale != 1.0:
            x.div_(self.scale)
        if self._outside is not None:  # also clears NaN outside the brain
            x.masked_fill_(self._outside.to(x.device), 0.0)
        return x

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """Network outputs ``(n, ...)`` back to raw intensities (in place)."""
        if self.scale != 1.0:
            values *= self.scale
        if self.offset != 0.0:
            values += self.offset
        if self.mask is not None:
            values *= np.broadcast_to(self.mask, values.shape[-self.mask.ndim :])
        return values


class VolumeDataset(torch.utils.data.Dataset):
    """A ``torch`` dataset reading the samples of an :class:`ImageCollection`.

    Item ``i`` is a tuple holding the preprocessed float32 sample of shape
    ``sample_shape`` and ``t[i]`` for each tensor ``t`` of ``targets``, read from
    disk when the images are files. Pass it to a ``DataLoader`` with
    ``collate_fn=collate`` (batches are read whole) and ``num_workers > 0`` to
    read files in parallel with training.

    Parameters
    ----------
    images : ImageCollection
        The samples.
    sample_shape : tuple of int
        Shape of one sample as the network sees it, e.g. ``(1, x, y, z)``.
    preprocessing : Preprocessing, optional
        Scaling and mask applied to every sample.
    targets : tuple of torch.Tensor, default=()
        Per-sample tensors (e.g. labels) returned after the sample.

    Examples
    --------
    >>> import numpy as np, nibabel as nib
    >>> from neurovae.io import VolumeDataset, check_niimgs
    >>> img = nib.Nifti1Image(np.ones((3, 4, 5, 6), dtype=np.float32), np.eye(4))
    >>> dataset = VolumeDataset(check_niimgs(img), (1, 3, 4, 5))
    >>> len(dataset), dataset[0][0].shape
    (6, torch.Size([1, 3, 4, 5]))
    """

    def __init__(
        self,
        images: ImageCollection,
        sample_shape: tuple[int, ...],
        preprocessing: Preprocessing | None = None,
        targets: tuple[torch.Tensor, ...] = (),
    ) -> None:
        self.images = images
        self.sample_shape = tuple(sample_shape)
        self.preprocessing = preprocessing
        self.targets = tuple(targets)

    def __len__(self) -> int:
        return self.images.n_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[0] for t in self.__getitems__([index]))

    def __getitems__(self, indices: list[int]) -> VolumeBatch:
        """Items ``indices`` as one batch (what a ``DataLoader`` asks for).

        The samples are read into one buffer, in shared memory when called in
        a ``DataLoader`` worker (so the batch reaches the training process
        without another copy), and scaled in one operation; :func:`collate`
        passes the batch through.
        """
        x = torch.empty((len(indices), *self.sample_shape), dtype=torch.float32)
        if torch.utils.data.get_worker_info() is not None:
            x.share_memory_()
        rows = x.numpy().reshape(len(indices), *self.images.shape)
        for row, index in enumerate(indices):
            rows[row] = self.images.read(index)
        if self.preprocessing is not None:
            self.preprocessing.forward(x)
        return VolumeBatch((x, *(t[indices] for t in self.targets)))


class VolumeBatch(tuple):
    """A batch already assembled by :meth:`VolumeDataset.__getitems__`."""


def collate(batch):
    """``collate_fn`` for :class:`VolumeDataset`: its batches pass through.

    Anything else goes to torch's ``default_collate``.

    Examples
    --------
    >>> import numpy as np, nibabel as nib, torch
    >>> from neurovae.io import VolumeDataset, check_niimgs, collate
    >>> img = nib.Nifti1Image(np.ones((3, 4, 5, 6), dtype=np.float32), np.eye(4))
    >>> loader = torch.utils.data.DataLoader(
    ...     VolumeDataset(check_niimgs(img), (1, 3, 4, 5)), batch_size=4,
    ...     collate_fn=collate,
    ... )
    >>> [tuple(batch[0].shape) for batch in loader]
    [(4, 1, 3, 4, 5), (2, 1, 3, 4, 5)]
    """
    if isinstance(batch, VolumeBatch):
        return tuple(batch)
    return torch.utils.data.default_collate(batch)
