"""Figures: training curves, reconstructions, samples and latent spaces.

Every function draws with matplotlib (imported when first needed) and returns
the :class:`matplotlib.figure.Figure` it drew on, without showing it: call
``plt.show()`` or ``fig.savefig(...)`` yourself. Volumes are given as in
:mod:`neurovae.metrics`: arrays ``(x, y, z)`` / ``(n, x, y, z)``, or Niimg-like
objects (3-D image, 4-D image with samples along the 4th axis, list of 3-D
images or file paths); slices are drawn in voxel space, first axis to the
right and last axis up, with the image's voxel sizes as aspect ratio.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from neurovae.metrics import _as_volumes, _check_pair, _Volumes, mse

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_history",
    "plot_latent_space",
    "plot_reconstruction",
    "plot_samples",
]

_AXES = {"x": 0, "y": 1, "z": 2}
# history entries that are not loss terms
_BOOKKEEPING = ("time", "n_skipped")
_MAX_CATEGORIES = 10


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - matplotlib is in the doc extra
        raise ImportError(
            "neurovae.plotting needs matplotlib: pip install matplotlib"
        ) from exc
    return plt


def _new_figure(figure: Figure | None, figsize: tuple[float, float]) -> Figure:
    """A new constrained-layout figure, or ``figure`` cleared for reuse."""
    plt = _pyplot()
    if figure is None:
        return plt.figure(figsize=figsize, layout="constrained")
    if not isinstance(figure, plt.Figure):
        raise TypeError(
            f"figure must be a matplotlib Figure or None; got {type(figure).__name__}."
        )
    figure.clear()
    return figure


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    plt = _pyplot()
    if ax is None:
        return _new_figure(None, figsize).add_subplot()
    if not isinstance(ax, plt.Axes):
        raise TypeError(f"ax must be matplotlib Axes or None; got {type(ax).__name__}.")
    return ax


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high)``, else a ValueError naming it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
        or (high is not None and value >= high)
    ):
        bounds = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be an int {bounds}; got {value!r}.")
    return int(value)


def _voxel_sizes(affine: np.ndarray | None) -> np.ndarray:
    if affine is None:
        return np.ones(3)
    return np.sqrt(np.sum(np.asarray(affine)[:3, :3] ** 2, axis=0))


def _show_slice(
    ax: Axes,
    volume: np.ndarray,
    axis: int,
    index: int,
    sizes: np.ndarray,
    **imshow_kwargs,
):
    """Draw ``volume[..., index, ...]`` (slice along ``axis``) on ``ax``."""
    horizontal, vertical = (a for a in range(3) if a != axis)
    plane = np.take(volume, index, axis=axis).T  # rows = vertical axis
    image = ax.imshow(
        plane,
        origin="lower",
        aspect=sizes[vertical] / sizes[horizontal],
        interpolation="nearest",
        **imshow_kwargs,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return image


# ----------------------------------------------------------------------
# training curves
# ----------------------------------------------------------------------
def plot_history(
    history: Any,
    *,
    keys: Sequence[str] | None = None,
    ax: Axes | None = None,
    log_scale: bool = False,
) -> Figure:
    """Plot training curves: loss terms against epochs.

    Each term is one solid line; its validation counterpart (``val_`` + name),
    when recorded, is a dashed line of the same colour.

    Parameters
    ----------
    history : estimator or dict of str to list
        A fitted neurovae estimator (its ``history_`` is used) or such a
        history: one value per epoch for each key.
    keys : sequence of str, optional
        Terms to plot, e.g. ``["loss", "kl"]``; each brings its ``val_``
        counterpart. By default every loss term: all keys except ``val_*``,
        the bookkeeping ``time`` and ``n_skipped``, and, for an estimator,
        its scheduled weights (such as ``beta``).
    ax : matplotlib Axes, optional
        Where to draw; by default on a new figure.
    log_scale : bool, default=False
        Logarithmic y axis (symmetric-logarithmic if a value is not positive,
        as a negative log-likelihood can be).

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the axes.

    Raises
    ------
    ValueError
        If the history is empty, or a key is not in it.
    sklearn.exceptions.NotFittedError
        If ``history`` is an estimator that is not fitted (a ValueError too).
    TypeError
        If ``history`` is neither a dict nor an estimator.

    See Also
    --------
    plot_reconstruction : Inputs, reconstructions and their error.

    Examples
    --------
    >>> from neurovae.plotting import plot_history
    >>> history = {"loss": [3.0, 2.0, 1.5], "val_loss": [3.2, 2.4, 2.1],
    ...            "kl": [0.1, 0.3, 0.4], "time": [0.1, 0.1, 0.1]}
    >>> fig = plot_history(history)
    >>> [line.get_label() for line in fig.axes[0].get_lines()]
    ['loss', 'val_loss', 'kl']
    >>> import matplotlib.pyplot as plt
    >>> plt.close(fig)
    """
    hidden: set[str] = set(_BOOKKEEPING)
    if isinstance(history, Mapping):
        values = dict(history)
    elif hasattr(history, "history_"):
        values = dict(history.history_)
        schedules = getattr(history, "_schedules", None)
        if callable(schedules):
            hidden.update(schedules())
    elif hasattr(history, "fit"):
        from sklearn.exceptions import NotFittedError

        raise NotFittedError(
            f"This {type(history).__name__} instance is not fitted yet: it has no "
            "history_ to plot. Call fit first."
        )
    else:
        raise TypeError(
            "history must be a fitted neurovae estimator or a dict of per-epoch "
            f"lists; got {type(history).__name__}."
        )
    if not values or not any(len(v) for v in values.values()):
        raise ValueError("history is empty: nothing to plot.")

    if keys is None:
        keys = [k for k in values if not k.startswith("val_") and k not in hidden]
        # validation terms without a training counterpart still get drawn
        keys += [
            k
            for k in values
            if k.startswith("val_") and k[4:] not in values and k not in hidden
        ]
    elif isinstance(keys, str):
        keys = [keys]
    unknown = [k for k in keys if k not in values and f"val_{k}" not in values]
    if unknown:
        raise ValueError(
            f"keys {unknown} are not in the history; it holds {sorted(values)}."
        )

    ax = _new_axes(ax, figsize=(6.0, 4.0))
    plotted = []
    for i, key in enumerate(keys):
        names = [key] if key.startswith("val_") else [key, f"val_{key}"]
        for name in names:
            if name not in values:
                continue
            series = np.asarray(values[name], dtype=float)
            linestyle = "--" if name.startswith("val_") else "-"
            epochs = np.arange(1, len(series) + 1)
            ax.plot(epochs, series, linestyle, color=f"C{i % 10}", label=name)
            plotted.append(series)
    if log_scale:
        finite = np.concatenate(plotted)
        ax.set_yscale("log" if np.all(finite[np.isfinite(finite)] > 0) else "symlog")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    ax.legend()
    return ax.figure


# ----------------------------------------------------------------------
# volumes
# ----------------------------------------------------------------------
def plot_reconstruction(
    original: _Volumes,
    reconstruction: _Volumes,
    *,
    index: int = 0,
    cut_coords: Sequence[int] | None = None,
    mask=None,
    title: str | None = None,
    figure: Figure | None = None,
) -> Figure:
    """Show a volume, its reconstruction and their absolute error.

    Three rows (input, reconstruction, ``|input - reconstruction|``) of three
    orthogonal slices (along x, y and z) through one sample. Input and
    reconstruction share one grey colour scale; the error has its own.

    Parameters
    ----------
    original : array-like or Niimg-like
        One volume ``(x, y, z)``, a batch ``(n, x, y, z)``, a 3-D or 4-D
        image, or a list of 3-D images.
    reconstruction : array-like or Niimg-like
        Of the same shape (e.g. from ``inverse_transform(transform(X))``).
    index : int, default=0
        The sample to show (negative counts from the end).
    cut_coords : sequence of 3 int, optional
        Voxel indices ``(i, j, k)`` of the slices (voxels, not mm). By default
        the centre of mass of the mask, or the centre of the volume.
    mask : array-like of bool or Niimg-like, optional
        Voxels to show (others are left blank) and over which the colour
        scales and the MSE in the error row's label are computed.
    title : str, optional
        Title of the figure.
    figure : matplotlib Figure, optional
        Figure to draw into (cleared first); by default a new one.

    Returns
    -------
    matplotlib.figure.Figure
        Nine image axes (row by row) and two colour bars.

    Raises
    ------
    ValueError
        If the inputs do not match (see :func:`neurovae.metrics.mse`), or
        ``index`` or ``cut_coords`` fall outside them.

    See Also
    --------
    neurovae.metrics.ssim : A voxel-wise similarity map (``return_map=True``).
    plot_samples : One slice of each of many volumes.

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.plotting import plot_reconstruction
    >>> X = np.random.default_rng(0).normal(size=(2, 6, 7, 5))
    >>> fig = plot_reconstruction(X, 0.9 * X, index=1)
    >>> len(fig.axes)
    11
    >>> import matplotlib.pyplot as plt
    >>> plt.close(fig)
    """
    pair = _check_pair(original, reconstruction, mask)
    n_samples = len(pair.reference)
    index = _check_int(index, "index", -n_samples, n_samples)
    reference, estimate = pair.reference[index], pair.estimate[index]
    shape = reference.shape
    if cut_coords is None:
        if pair.mask is None:
            cut_coords = [s // 2 for s in shape]
        else:
            centre = np.argwhere(pair.mask).mean(axis=0)
            cut_coords = [int(round(c)) for c in centre]
    elif isinstance(cut_coords, str) or len(cut_coords) != 3:
        raise ValueError(f"cut_coords must be 3 voxel indices; got {cut_coords!r}.")
    cut_coords = [
        _check_int(c, f"cut_coords[{a}]", 0, s)
        for a, (c, s) in enumerate(zip(cut_coords, shape))
    ]
    error = np.abs(reference - estimate)
    inside = np.ones(shape, bool) if pair.mask is None else pair.mask
    both = np.concatenate([reference[inside], estimate[inside]])
    grey = {"cmap": "gray", "vmin": both.min(), "vmax": both.max()}
    rows = [
        ("input", reference, grey),
        ("reconstruction", estimate, grey),
        (
            f"|error|\nMSE {mse(reference, estimate, mask=pair.mask):.3g}",
            error,
            {"cmap": "hot", "vmin": 0.0, "vmax": error[inside].max()},
        ),
    ]

    figure = _new_figure(figure, figsize=(8.0, 7.5))
    axes = figure.subplots(3, 3)
    sizes = _voxel_sizes(pair.affine)
    images = []
    for r, (label, volume, kwargs) in enumerate(rows):
        shown = np.where(inside, volume, np.nan)
        for axis, ax in enumerate(axes[r]):
            image = _show_slice(ax, shown, axis, cut_coords[axis], sizes, **kwargs)
            if r == 0:
                ax.set_title(f"{'xyz'[axis]} = {cut_coords[axis]}")
        axes[r, 0].set_ylabel(label)
        images.append(image)
    figure.colorbar(images[1], ax=axes[:2].ravel().tolist(), shrink=0.8)
    figure.colorbar(images[2], ax=axes[2].tolist(), shrink=0.8)
    if title is not None:
        figure.suptitle(title)
    return figure


def plot_samples(
    samples: _Volumes,
    *,
    n_cols: int = 5,
    axis: str = "z",
    slice_index: int | None = None,
    cmap: str = "gray",
    figure: Figure | None = None,
) -> Figure:
    """Show one slice of each volume in a grid, on one colour scale.

    Parameters
    ----------
    samples : array-like or Niimg-like
        Volumes ``(n, x, y, z)`` (or one ``(x, y, z)``), a 4-D image, or a
        list of 3-D images, e.g. from an estimator's ``sample``.
    n_cols : int, default=5
        Columns of the grid (fewer if there are fewer samples).
    axis : {"x", "y", "z"}, default="z"
        Axis the slices cut across ("z": axial slices of an RAS volume).
    slice_index : int, optional
        Voxel index of the slice along ``axis``; by default the middle one.
    cmap : str, default="gray"
        Matplotlib colour map.
    figure : matplotlib Figure, optional
        Figure to draw into (cleared first); by default a new one.

    Returns
    -------
    matplotlib.figure.Figure
        One axes per sample, titled with its index.

    Raises
    ------
    ValueError
        If the volumes have a wrong shape, ``axis`` is not "x", "y" or "z",
        or ``n_cols`` or ``slice_index`` are out of range.

    See Also
    --------
    plot_reconstruction : Three orthogonal slices of one volume.

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.plotting import plot_samples
    >>> samples = np.random.default_rng(0).normal(size=(7, 6, 7, 5))
    >>> fig = plot_samples(samples, n_cols=4, axis="x")
    >>> len(fig.axes)
    7
    >>> import matplotlib.pyplot as plt
    >>> plt.close(fig)
    """
    volumes, affine, _ = _as_volumes(samples, "samples")
    if axis not in _AXES:
        raise ValueError(f"axis must be one of 'x', 'y', 'z'; got {axis!r}.")
    axis_number = _AXES[axis]
    n_cols = _check_int(n_cols, "n_cols", 1)
    size = volumes.shape[1 + axis_number]
    if slice_index is None:
        slice_index = size // 2
    slice_index = _check_int(slice_index, "slice_index", 0, size)

    n_samples = len(volumes)
    n_cols = min(n_cols, n_samples)
    n_rows = math.ceil(n_samples / n_cols)
    planes = np.take(volumes, slice_index, axis=1 + axis_number)
    figure = _new_figure(figure, figsize=(1.8 * n_cols, 1.8 * n_rows + 0.3))
    axes = figure.subplots(n_rows, n_cols, squeeze=False).ravel()
    sizes = _voxel_sizes(affine)
    for i, ax in enumerate(axes):
        if i >= n_samples:
            figure.delaxes(ax)
            continue
        _show_slice(
            ax,
            volumes[i],
            axis_number,
            slice_index,
            sizes,
            cmap=cmap,
            vmin=planes.min(),
            vmax=planes.max(),
        )
        ax.set_title(str(i), fontsize="small")
        ax.set_axis_off()
    figure.suptitle(f"{axis} = {slice_index}", fontsize="medium")
    return figure


# ----------------------------------------------------------------------
# latent space
# ----------------------------------------------------------------------
def _is_categorical(y: np.ndarray) -> bool:
    if y.dtype.kind in "bOSU":
        return True
    if y.dtype.kind in "iu" or (y.dtype.kind == "f" and np.all(y == np.round(y))):
        return len(np.unique(y)) <= _MAX_CATEGORIES
    return False


def plot_latent_space(
    Z: Any,
    y: Any = None,
    *,
    method: str | None = "auto",
    ax: Axes | None = None,
    cmap: str | None = None,
    random_state: int | None = None,
) -> Figure:
    """Scatter latent codes in 2-D, coloured by a label.

    Parameters
    ----------
    Z : array-like of shape (n_samples, n_components)
        Latent codes, e.g. from an estimator's ``transform``; at least 2
        components.
    y : array-like of shape (n_samples,), optional
        Label of each sample. Strings, booleans, and integers (or
        integer-valued floats) with at most 10 distinct values are drawn as
        categories with a legend; other numbers as a continuous variable with
        a colour bar.
    method : {"auto", "pca", "tsne"} or None, default="auto"
        How to reach 2-D: "pca" (principal components, scikit-learn's
        ``PCA``), "tsne" (scikit-learn's ``TSNE``), None (the first two
        components as they are); "auto" is None for 2 components, else
        "pca".
    ax : matplotlib Axes, optional
        Where to draw; by default on a new figure.
    cmap : str, optional
        Matplotlib colour map ("tab10" / "tab20" for categories, "viridis"
        for continuous labels by default).
    random_state : int, optional
        Seed of t-SNE.

    Returns
    -------
    matplotlib.figure.Figure
        The figure holding the scatter plot (and the colour bar, if any).

    Raises
    ------
    ValueError
        If ``Z`` is not 2-D with at least 2 samples and 2 components or holds
        non-finite values, ``y`` has another length, or ``method`` is unknown.

    See Also
    --------
    plot_samples : Decoded samples.

    Examples
    --------
    >>> import numpy as np
    >>> from neurovae.plotting import plot_latent_space
    >>> Z = np.random.default_rng(0).normal(size=(20, 4))
    >>> fig = plot_latent_space(Z, y=np.repeat(["a", "b"], 10))
    >>> fig.axes[0].get_legend().get_texts()[1].get_text()
    'b'
    >>> import matplotlib.pyplot as plt
    >>> plt.close(fig)
    """
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2 or Z.shape[0] < 2 or Z.shape[1] < 2:
        raise ValueError(
            "Z must be latent codes of shape (n_samples, n_components) with at "
            f"least 2 samples and 2 components; got shape {Z.shape}."
        )
    if not np.all(np.isfinite(Z)):
        raise ValueError("Z contains NaN or infinite values.")
    if method not in ("auto", "pca", "tsne", None):
        raise ValueError(
            f"method must be one of 'auto', 'pca', 'tsne', None; got {method!r}."
        )
    if method == "auto":
        method = None if Z.shape[1] == 2 else "pca"
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2)
        points = pca.fit_transform(Z)
        ratios = 100 * pca.explained_variance_ratio_
        labels = [f"PC {i + 1} ({r:.0f} % variance)" for i, r in enumerate(ratios)]
    elif method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max(1.0, (len(Z) - 1) / 3))
        tsne = TSNE(n_components=2, perplexity=perplexity, random_state=random_state)
        points = tsne.fit_transform(Z)
        labels = ["t-SNE 1", "t-SNE 2"]
    else:
        points = Z[:, :2]
        labels = ["latent 0", "latent 1"]

    ax = _new_axes(ax, figsize=(5.5, 4.5))
    if y is None:
        ax.scatter(points[:, 0], points[:, 1], s=12)
    else:
        y = np.asarray(y)
        if y.shape != (len(Z),):
            raise ValueError(
                f"y must have one label per sample, shape ({len(Z)},); got shape "
                f"{y.shape}."
            )
        if _is_categorical(y):
            classes = np.unique(y)
            plt = _pyplot()
            colours = plt.get_cmap(cmap or ("tab10" if len(classes) <= 10 else "tab20"))
            for i, label in enumerate(classes):
                chosen = y == label
                ax.scatter(
                    points[chosen, 0],
                    points[chosen, 1],
                    s=12,
                    color=colours(i % colours.N),
                    label=str(label),
                )
            ax.legend(title="y", fontsize="small")
        else:
            scatter = ax.scatter(
                points[:, 0], points[:, 1], c=y.astype(float), s=12, cmap=cmap
            )
            ax.figure.colorbar(scatter, ax=ax, label="y")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    return ax.figure
