"""The safe model format: weights plus JSON, loadable without running code.

A file is one ``torch.save`` of a dict holding only strings, ints and tensors,
so :func:`load` reads it with ``torch.load(weights_only=True)``: a model file
from a stranger cannot execute code, unlike a pickle. Parameters and fitted
metadata travel as JSON text; the weights as a state dict of CPU tensors.
"""

from __future__ import annotations

import json
import math
import numbers
import os

import numpy as np
import torch

FORMAT_NAME = "neurovae"
FORMAT_VERSION = 2
_KEYS = {
    "format",
    "format_version",
    "neurovae_version",
    "estimator",
    "params",
    "fitted",
    "state_dict",
}
_OPTIONAL_KEYS = {"arrays"}  # version 2: fitted arrays (the brain mask)
# a mask_img parameter that is not JSON (an image) is saved as this marker and
# loads as the fitted mask, which is the same mask on the training grid
_FITTED_MASK = {"neurovae": "fitted mask"}
# fitted attributes stored in the JSON part (the module is the state dict)
_REQUIRED = (
    "n_features_in_",
    "input_shape_",
    "n_iter_",
    "history_",
    "_seed",
    "_fit_dtype",
)
_FITTED = (
    "n_features_in_",
    "feature_names_in_",
    "input_shape_",
    "n_iter_",
    "history_",
    "best_epoch_",
    "_seed",
    "_fit_dtype",
    "affine_",
    "intensity_offset_",
    "intensity_scale_",
    "config_params_",
    "n_sequences_",  # RecurrentVAE: training runs (the subject table's size)
    "n_timepoints_",  # RecurrentVAE: the longest training run
)


def _to_json(value, where: str):
    """Plain JSON types for ``value``, or a clear error."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)  # json writes NaN / Infinity and reads them back
    if isinstance(value, np.ndarray):
        return [_to_json(v, where) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v, where) for k, v in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, os.PathLike):  # e.g. a pathlib checkpoint_dir
        return os.fspath(value)
    raise TypeError(
        f"{where} = {value!r} cannot be stored in the safe format (JSON). "
        "Use plain values (an int random_state, a built-in backbone), or "
        "pickle / joblib for models with custom torch modules."
    )


def _from_json(value):
    """Inverse of :func:`_to_json` for parameters: lists become tuples."""
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_fitted_values(fitted: dict) -> None:
    """Types and ranges of the fitted attributes read from a file."""
    shape = fitted["input_shape_"]
    if not (
        isinstance(shape, list)
        and len(shape) in (1, 3, 4)
        and all(_is_int(s, 1) for s in shape)
    ):
        raise ValueError(f"input_shape_ must be 1, 3 or 4 positive ints; got {shape}")
    if fitted["n_features_in_"] != math.prod(shape):
        raise ValueError("n_features_in_ does not match input_shape_")
    if not (_is_int(fitted["n_iter_"]) and _is_int(fitted["_seed"])):
        raise ValueError("n_iter_ and _seed must be non-negative ints")
    if fitted["_fit_dtype"] not in ("float32", "float64"):
        raise ValueError("_fit_dtype must be float32 or float64")
    history = fitted["history_"]
    if not isinstance(history, dict) or not all(
        isinstance(v, list) for v in history.values()
    ):
        raise ValueError("history_ must map names to lists")
    names = fitted.get("feature_names_in_")
    if names is not None and not (
        isinstance(names, list)
        and len(names) == fitted["n_features_in_"]
        and all(isinstance(n, str) for n in names)
    ):
        raise ValueError("feature_names_in_ must be one string per feature")
    for key in ("n_sequences_", "n_timepoints_"):
        if key in fitted and not _is_int(fitted[key], 1):
            raise ValueError(f"{key} must be a positive int")
    best = fitted.get("best_epoch_")
    if best is not None and not _is_int(best):
        raise ValueError("best_epoch_ must be a non-negative int or None")
    affine = fitted.get("affine_")
    if affine is not None:
        values = np.asarray(affine, dtype=object)
        if values.shape != (4, 4) or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in values.ravel()
        ):
            raise ValueError("affine_ must be a 4 x 4 matrix of finite numbers")
        if len(shape) != 3:
            raise ValueError("affine_ needs 3-D samples (input_shape_ of 3 ints)")
    offset = fitted.get("intensity_offset_", 0.0)
    scale = fitted.get("intensity_scale_", 1.0)
    if not (
        all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            for v in (offset, scale)
        )
        and math.isfinite(offset)
        and math.isfinite(scale)
        and scale > 0
    ):
        raise ValueError("intensity_offset_ must be finite and intensity_scale_ > 0")


def _check_mask_array(mask, fitted: dict) -> np.ndarray:
    """The stored brain mask: a bool tensor of the samples' spatial shape."""
    shape = tuple(fitted["input_shape_"])
    if not (
        isinstance(mask, torch.Tensor)
        and mask.dtype == torch.bool
        and len(shape) >= 3
        and tuple(mask.shape) == shape[-3:]
        and bool(mask.any())
    ):
        raise ValueError("the stored mask must be a non-empty bool tensor of the grid")
    return mask.numpy().copy()


def save(estimator, path) -> None:
    """Save a fitted neurovae estimator in the safe format.

    Parameters
    ----------
    estimator : neurovae estimator
        A fitted model.
    path : str or path-like
        Destination file. Written atomically (temporary file, then rename).

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from neurovae import VAE, load
    >>> X = np.random.default_rng(0).normal(size=(40, 5))
    >>> vae = VAE(n_components=2, max_iter=2, random_state=0).fit(X)
    >>> path = os.path.join(tempfile.mkdtemp(), "model.nvae")
    >>> vae.save(path)
    >>> np.allclose(load(path).transform(X), vae.transform(X))
    True
    """
    from sklearn.utils.validation import check_is_fitted

    from neurovae import __version__

    check_is_fitted(estimator)
    name = type(estimator).__name__
    params = estimator.get_params(deep=False)
    mask = getattr(estimator, "_mask", None)
    if "mask_img" in params and params["mask_img"] is not None:
        if mask is None:  # set after fitting: saved as the fit saw it, None
            params["mask_img"] = None
        elif not isinstance(params["mask_img"], str):
            params["mask_img"] = _FITTED_MASK
    params = {k: _to_json(v, f"{name}.{k}") for k, v in params.items()}
    fitted = {
        k: _to_json(getattr(estimator, k), f"{name}.{k}")
        for k in _FITTED
        if hasattr(estimator, k)
    }
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "neurovae_version": __version__,
        "estimator": name,
        "params": json.dumps(params),
        "fitted": json.dumps(fitted),
        "state_dict": estimator._module_state(),
    }
    if mask is not None:
        payload["arrays"] = {"mask": torch.from_numpy(np.array(mask, dtype=bool))}
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path):
    """Load a model saved with ``estimator.save(path)``.

    The file is read with ``torch.load(weights_only=True)``: it can hold only
    tensors and plain values, so loading never runs code from the file.

    Parameters
    ----------
    path : str or path-like
        A file written by :meth:`neurovae.VAE.save` (or any estimator's).

    Returns
    -------
    estimator : neurovae estimator
        The fitted model, on the CPU (or its ``device`` where that exists).

    Raises
    ------
    ValueError
        If the file is not a neurovae model, comes from a newer format
        version, or holds unknown entries.
    OSError
        If the file cannot be opened (e.g. ``FileNotFoundError``).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from neurovae import VAE, load
    >>> X = np.random.default_rng(0).normal(size=(40, 5))
    >>> path = os.path.join(tempfile.mkdtemp(), "model.nvae")
    >>> VAE(n_components=2, max_iter=2, random_state=0).fit(X).save(path)
    >>> model = load(path)
    >>> model.transform(X[:3]).shape
    (3, 2)
    >>> import torch  # the file holds only tensors and plain values
    >>> sorted(torch.load(path, weights_only=True))[:3]
    ['estimator', 'fitted', 'format']
    """
    import neurovae
    from neurovae._validation import validate_params
    from neurovae.base import BaseVAE

    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except OSError:  # a missing or unreadable file, not a bad model
        raise
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"{path!s} is not a readable neurovae model: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ValueError(f"{path!s} is not a neurovae model file")
    version = payload.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{path!s} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path!s} has format version {version!r}; this neurovae "
            f"({neurovae.__version__}) reads versions up to {FORMAT_VERSION}. "
            "Upgrade neurovae to load it."
        )
    unknown = set(payload) - _KEYS - _OPTIONAL_KEYS
    missing = _KEYS - set(payload)
    if unknown or missing:
        raise ValueError(
            f"{path!s} is not a valid neurovae model: unknown entries "
            f"{sorted(unknown)}, missing entries {sorted(missing)}"
        )
    name = payload["estimator"]
    cls = getattr(neurovae, name, None) if name in neurovae.__all__ else None
    if not (isinstance(cls, type) and issubclass(cls, BaseVAE)):
        raise ValueError(f"{path!s} holds an unknown estimator {name!r}")
    try:
        params = json.loads(payload["params"])
        fitted = json.loads(payload["fitted"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!s}: unreadable parameters ({exc})") from exc
    if not (isinstance(params, dict) and isinstance(fitted, dict)):
        raise ValueError(f"{path!s}: parameters and fitted attributes must be dicts")
    fitted_mask = params.get("mask_img") == _FITTED_MASK
    if fitted_mask:
        params["mask_img"] = None  # replaced by the stored mask below
    params = {k: _from_json(v) for k, v in params.items()}
    valid = set(cls().get_params(deep=False))
    if set(params) - valid:
        raise ValueError(
            f"{path!s}: unknown parameters for {name}: {sorted(set(params) - valid)}"
        )
    if set(fitted) - set(_FITTED):
        raise ValueError(
            f"{path!s}: unknown fitted attributes {sorted(set(fitted) - set(_FITTED))}"
        )
    missing = [k for k in _REQUIRED if k not in fitted]
    if missing:
        raise ValueError(f"{path!s}: missing fitted attributes {missing}")
    estimator = cls(**params)
    try:
        validate_params(estimator, cls._parameter_rules)
        _check_fitted_values(fitted)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path!s}: invalid model description: {exc}") from exc
    arrays = payload.get("arrays", {})
    if not isinstance(arrays, dict) or set(arrays) - {"mask"}:
        raise ValueError(f"{path!s}: unknown stored arrays")
    for key, value in fitted.items():
        if key == "input_shape_":
            value = tuple(value)
        elif key == "feature_names_in_":
            value = np.asarray(value, dtype=object)
        elif key == "affine_":
            value = np.asarray(value, dtype=np.float64)
        setattr(estimator, key, value)
    for key, default in (("intensity_offset_", 0.0), ("intensity_scale_", 1.0)):
        if key not in fitted:  # version 1 files: models without scaling
            setattr(estimator, key, default)
    estimator._mask = None
    if "mask" in arrays:
        try:
            estimator._mask = _check_mask_array(arrays["mask"], fitted)
        except ValueError as exc:
            raise ValueError(f"{path!s}: {exc}") from exc
        estimator.mask_img_ = estimator._mask_output()
    if fitted_mask:
        if estimator._mask is None:
            raise ValueError(f"{path!s}: mask_img refers to a mask that is missing")
        estimator.mask_img = estimator.mask_img_
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path!s}: the weights are not a state dict")
    try:
        estimator.module_ = estimator._restore_module(state)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            f"{path!s}: the weights do not fit the described model: {exc}"
        ) from exc
    return estimator
