"""Fingerprints of estimator parameters and training data, for checkpoints.

A checkpoint is resumed only by a fit whose fingerprint equals the one it
was written with. Fingerprints are JSON values: parameters in plain form,
arrays, tensors and modules by a SHA-256 digest of their bytes, files by
their path, size and modification time (their content is not read).
"""

from __future__ import annotations

import hashlib
import numbers
import os

import nibabel as nib
import numpy as np
import torch
from nibabel.spatialimages import SpatialImage
from torch import nn

from neurovae.io import ImageCollection


def _sha256_array(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array.reshape(-1)).cast("B"))
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and values."""
    tensor = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def state_digest(state: dict[str, torch.Tensor], skip=()) -> str:
    """SHA-256 of a state dict: every name and tensor, in order, but those
    named in ``skip``."""
    digest = hashlib.sha256()
    for key, value in state.items():
        if key in skip:
            continue
        digest.update(key.encode())
        digest.update(tensor_digest(value).encode())
    return digest.hexdigest()


def _image_digest(image: SpatialImage) -> dict:
    return {
        "image": _sha256_array(np.asarray(image.dataobj)),
        "affine": np.asarray(image.affine, dtype=float).tolist(),
    }


def describe(value):
    """A JSON value that stands for a parameter value.

    Plain values are kept (tuples as lists); arrays, images and torch modules
    are described by digests of their content; a ``RandomState`` instance by
    its type only (the fit's seed is stored in the checkpoint instead).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return {"array": _sha256_array(value), "shape": list(value.shape)}
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_digest(value)}
    if isinstance(value, nn.Module):
        return {"module": repr(value), "weights": state_digest(value.state_dict())}
    if isinstance(value, SpatialImage):
        return _image_digest(value)
    if isinstance(value, torch.device):
        return str(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _collection_digest(images: ImageCollection) -> str:
    """Images on disk by path, size and modification time; in-memory images
    by their data."""
    digest = hashlib.sha256(repr((images.shape, images.affine.tolist())).encode())
    described = {}
    for sample in images._samples:
        key = id(sample.image)
        if key not in described:
            filename = sample.image.get_filename()
            if filename is not None and nib.is_proxy(sample.image.dataobj):
                st = os.stat(filename)
                item = (os.path.abspath(filename), st.st_size, st.st_mtime_ns)
            else:
                item = _sha256_array(np.asarray(sample.image.dataobj))
            described[key] = repr(item)
        digest.update(f"{described[key]}[{sample.frame}]".encode())
    return digest.hexdigest()


def data_digest(X, targets: tuple[torch.Tensor, ...] = ()) -> dict:
    """What training data a fit saw: shape, dtype and a digest of ``X`` (an
    array or an :class:`~neurovae.io.ImageCollection`) and of the per-sample
    ``targets`` (e.g. group labels)."""
    if isinstance(X, ImageCollection):
        described = {
            "shape": [X.n_samples, *X.shape],
            "dtype": "images",
            "values": _collection_digest(X),
        }
    else:
        described = {
            "shape": list(X.shape),
            "dtype": str(X.dtype),
            "values": _sha256_array(X),
        }
    if targets:
        described["targets"] = [tensor_digest(t) for t in targets]
    return described
