"""The estimator face shared by every neurovae model.

:class:`BaseVAE` holds everything that is the same for all model families:
parameter validation, the one input checker, the fit skeleton that hands a
module and its data to the training engine, batched inference,
``transform`` / ``inverse_transform`` / ``sample`` / ``score``, and
persistence (pickle and the safe format). A model family supplies its torch
module (``_build_module``) and, if it needs them, loss-weight schedules and
engine hooks.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
from collections.abc import Callable

import nibabel as nib
import numpy as np
import torch
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
)
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data
from torch import nn
from torch.utils.data import Dataset, Subset

from neurovae._fingerprint import data_digest, describe, state_digest
from neurovae._validation import (
    AnyOf,
    Custom,
    Interval,
    IntSequence,
    Options,
    check_value,
    validate_params,
)
from neurovae.io import (
    DataStatistics,
    ImageCollection,
    Preprocessing,
    VolumeDataset,
    check_mask,
    check_niimgs,
    collate,
    is_niimg_like,
    to_img,
)
from neurovae.nn import (
    GaussianLatent,
    VAEModule,
    dry_run,
    make_backbone,
    make_likelihood,
)
from neurovae.training import (
    PRECISIONS,
    Checkpoint,
    CheckpointError,
    DatasetBatches,
    Engine,
    EngineConfig,
    Hook,
    Schedule,
    TensorBatches,
    autocast,
    local_rng,
    make_scaler,
    make_schedule,
    resolve_device,
)
from neurovae.training.distributed import (
    DistributedContext,
    is_main_process,
    resolve_distributed,
)
from neurovae.training.optim import OPTIMIZERS

_DTYPES = (np.float64, np.float32)
_AUTO_BATCH = 200  # batch_size="auto" -> min(200, n_samples), as MLPRegressor
_AUTO_VOXELS = 2**21  # ... and for volumes at most ~2M voxels per batch
_INFERENCE_BATCH = 256
_INFERENCE_VOXELS = 2**22  # inference batches hold at most ~4M values
_GPU_RESIDENT_BYTES = 2**31  # in-memory data up to 2 GiB is copied to the GPU


def _is_module_pair(value) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(m, nn.Module) for m in value)
    )


def _is_random_state(value) -> bool:
    if value is None or isinstance(value, np.random.RandomState):
        return True
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and 0 <= value < 2**32
    )


def _is_device(value) -> bool:
    return isinstance(value, (str, torch.device))


def _is_directory(value) -> bool:
    return value is None or isinstance(value, (str, os.PathLike))


# parameters that cannot change what a fit computes: a checkpoint written
# under other values of these is resumed (device: its type is compared).
# distributed: processes share every global batch, and the random draws of
# each sample do not depend on which process holds it, so the number of
# processes changes results by float rounding only.
_NOT_FINGERPRINTED = (
    "verbose",
    "warm_start",
    "checkpoint_dir",
    "num_workers",
    "device",
    "distributed",
)


def _is_mask(value) -> bool:
    return value is None or is_niimg_like(value) or isinstance(value, np.ndarray)


class BaseVAE(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Shared face of the neurovae estimators. Not for direct use.

    Subclasses define ``__init__`` (storing their arguments unchanged) and
    ``_build_module``; they may extend ``_parameter_rules`` and override
    ``_schedules`` and ``_hooks``.
    """

    # index of the target tensor (see ``_targets``) whose values are groups
    # that training batches draw at equal rates; None: plain shuffling
    _group_target: int | None = None

    _parameter_rules: dict[str, Callable] = {
        "n_components": Interval(int, 1),
        "backbone": AnyOf(
            (
                Options(("auto", "mlp", "conv", "resnet")),
                Custom(_is_module_pair, "an (encoder, decoder) pair of nn.Modules"),
            )
        ),
        "hidden_layer_sizes": IntSequence(allow_empty=True),
        "channels": IntSequence(),
        "likelihood": Options(("gaussian", "laplace", "bernoulli")),
        "likelihood_scale": Options(("global", "feature")),
        "beta": Interval(float, 0.0),
        "optimizer": Options(tuple(sorted(OPTIMIZERS))),
        "learning_rate_init": Interval(float, 0.0, low_open=True),
        "weight_decay": Interval(float, 0.0),
        "max_grad_norm": Interval(float, 0.0, low_open=True, none_ok=True),
        "batch_size": AnyOf((Options(("auto",)), Interval(int, 1))),
        "max_iter": Interval(int, 1),
        "early_stopping": Options((True, False)),
        "validation_fraction": Custom(
            lambda v: (
                isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 < v < 1
            ),
            "a float in (0, 1)",
        ),
        "n_iter_no_change": Interval(int, 1),
        "tol": Interval(float, 0.0),
        "device": Custom(_is_device, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
        "precision": Options(PRECISIONS),
        "random_state": Custom(
            _is_random_state, "None, an int in [0, 2**32) or a RandomState"
        ),
        "verbose": Interval(int, 0),
        "warm_start": Options((True, False)),
        "mask_img": Custom(
            _is_mask, "None, a 3-D mask image or path, or a boolean array"
        ),
        "scaling": Options(("auto", "minmax", "zscore", None)),
        "num_workers": Interval(int, 0),
        "checkpoint_dir": Custom(_is_directory, "None or a directory path"),
        "distributed": Options(("auto", True, False)),
    }

    # ------------------------------------------------------------------
    # hooks for the model families
    # ------------------------------------------------------------------
    def _build_module(self, sample_shape: tuple[int, ...], stats: dict) -> nn.Module:
        """Return the untrained torch module for samples of ``sample_shape``."""
        raise NotImplementedError

    def _schedules(self) -> dict[str, Schedule]:
        """Module attributes the engine sets from training progress."""
        return {}

    def _hooks(self) -> list[Hook]:
        """Engine hooks of this model family."""
        return []

    def _after_training(self, module: nn.Module, train_data, device, context) -> None:
        """Fit what is fitted to the trained weights (nothing by default).

        Called once the engine has finished, with the kept weights in
        ``module``, the training split and the distributed context.
        """

    # ------------------------------------------------------------------
    # shared building blocks
    # ------------------------------------------------------------------
    def _dry_run(self, module: nn.Module, in_shape: tuple, role: str, maps: str):
        """Output shape of ``module`` on one zero sample, or a clear error.

        ``role`` and ``maps`` name the module and what it must do, for the
        message raised when a (user) module cannot take its input.
        """
        try:
            return dry_run(module, in_shape)
        except Exception as exc:
            raise ValueError(
                f"{type(self).__name__}: the {role} must map {maps}; calling it "
                f"failed with {type(exc).__name__}: {exc}"
            ) from exc

    def _encoder_decoder(
        self, sample_shape: tuple[int, ...], n_components: int
    ) -> tuple[nn.Module, nn.Module, int]:
        """Encoder, decoder and encoder output size for this estimator's backbone.

        The decoder is checked to produce samples of ``sample_shape``.
        """
        backbone = self.backbone
        if _is_module_pair(backbone):
            encoder, decoder = (copy.deepcopy(m) for m in backbone)
        else:
            if backbone == "auto":
                backbone = "mlp" if len(sample_shape) == 1 else "conv"
            encoder, decoder = make_backbone(
                backbone,
                sample_shape,
                n_components,
                hidden_layer_sizes=tuple(self.hidden_layer_sizes),
                channels=tuple(self.channels),
            )
        shape = ", ".join(map(str, sample_shape))
        encoded = self._dry_run(
            encoder,
            sample_shape,
            "encoder",
            f"a batch of samples of shape (n, {shape}) to a tensor",
        )
        maps = f"latent codes of shape (n, {n_components}) to samples (n, {shape})"
        decoded = self._dry_run(decoder, (n_components,), "decoder", maps)
        if decoded != tuple(sample_shape):
            raise ValueError(
                f"{type(self).__name__}: the decoder outputs samples of shape "
                f"{decoded} but the input samples have shape {tuple(sample_shape)}."
            )
        return encoder, decoder, math.prod(encoded)

    def _vae_module(self, sample_shape: tuple[int, ...], stats: dict) -> VAEModule:
        """A :class:`~neurovae.nn.VAEModule` on this estimator's backbone."""
        encoder, decoder, n_features = self._encoder_decoder(
            sample_shape, self.n_components
        )
        return VAEModule(
            encoder,
            decoder,
            GaussianLatent(n_features, self.n_components),
            self._likelihood(sample_shape, stats),
        )

    def _likelihood(self, sample_shape: tuple[int, ...], stats: dict) -> nn.Module:
        """The observation model (``likelihood``, its scale, the mask)."""
        return make_likelihood(
            self.likelihood,
            sample_shape,
            scale=self.likelihood_scale,
            init_scale=stats.get("std", 1.0),
            min_scale=stats.get("min_scale", 1e-3),
            mask=self._likelihood_mask(),
        )

    def _beta_schedule(self) -> Schedule:
        """KL weight ``beta`` under ``beta_schedule`` (families that offer one)."""
        return make_schedule(
            self.beta_schedule,
            self.beta,
            warmup_iter=self.warmup_iter,
            n_cycles=self.n_cycles,
            total_iter=self._param("max_iter"),
        )

    def _likelihood_mask(self) -> torch.Tensor | None:
        """The fitted brain mask, as the likelihoods take it (or None)."""
        mask = getattr(self, "_mask", None)
        return None if mask is None else torch.from_numpy(mask)

    # ------------------------------------------------------------------
    # input checking (the one input checker)
    # ------------------------------------------------------------------
    def _check_X(self, X, *, reset: bool) -> np.ndarray:
        """Validate ``X`` and, when ``reset``, record its shape and names.

        2-D arrays (and DataFrames) go through scikit-learn's ``validate_data``;
        4-D ``(n, x, y, z)`` and 5-D ``(n, c, x, y, z)`` volumes through
        ``check_array(allow_nd=True)`` with the same guarantees (finite,
        numeric, at least two samples for ``fit``).
        """
        if is_niimg_like(X):
            return self._check_images(X, reset=reset)
        name = type(self).__name__
        ndim = getattr(X, "ndim", None)
        if ndim is None and not hasattr(X, "toarray"):
            try:
                ndim = np.ndim(X)
            except (TypeError, ValueError):
                ndim = None
        min_samples = 2 if reset else 1
        if ndim in (4, 5):
            X = check_array(
                X,
                dtype=_DTYPES,
                ensure_2d=False,
                allow_nd=True,
                ensure_min_samples=min_samples,
                input_name="X",
                estimator=self,
            )
            if 0 in X.shape[1:]:
                raise ValueError(
                    f"{name}: X has samples of shape {tuple(X.shape[1:])}, with "
                    "an empty axis; volumes need at least one voxel per axis."
                )
            if reset:
                self._set_volume_shape(X.shape[1:], affine=None)
            elif len(self.input_shape_) == 1 or tuple(X.shape[1:]) != self.input_shape_:
                raise ValueError(
                    f"X has samples of shape {tuple(X.shape[1:])}, but {name} was "
                    f"fitted on samples of shape {self.input_shape_}."
                )
            return X
        if ndim is not None and ndim not in (1, 2):
            raise ValueError(
                f"{name} expects X as a 2-D array (n_samples, n_features), a 4-D "
                "array (n_samples, x, y, z) or a 5-D array (n_samples, channels, "
                f"x, y, z); got a {ndim}-D array of shape {np.shape(X)}."
            )
        if not reset and len(self.input_shape_) > 1:
            raise ValueError(
                f"{name} was fitted on volumes of shape {self.input_shape_}; got "
                "2-D X. Pass an array of shape (n_samples, "
                f"{', '.join(map(str, self.input_shape_))})."
            )
        X = validate_data(
            self, X, reset=reset, dtype=_DTYPES, ensure_min_samples=min_samples
        )
        if reset:
            self.input_shape_ = (int(X.shape[1]),)
            self.__dict__.pop("affine_", None)
        return X

    def _set_volume_shape(self, shape, affine) -> None:
        """Record the grid of volume training data (``affine`` for images)."""
        self.input_shape_ = tuple(int(s) for s in shape)
        self.n_features_in_ = int(math.prod(self.input_shape_))
        self.__dict__.pop("feature_names_in_", None)
        self.__dict__.pop("affine_", None)
        if affine is not None:
            self.affine_ = affine

    def _check_images(self, X, *, reset: bool):
        """Niimg-like ``X``: its samples, as an array when they are in memory
        and as a lazy :class:`~neurovae.io.ImageCollection` when any lives on
        disk (read batch by batch, never all at once)."""
        name = type(self).__name__
        grid = {}
        if not reset:
            if len(self.input_shape_) != 3:
                raise ValueError(
                    f"{name} was fitted on samples of shape {self.input_shape_}; "
                    "images hold single-channel 3-D volumes and cannot be "
                    "passed to it."
                )
            grid = {
                "shape": self.input_shape_,
                "affine": getattr(self, "affine_", None),
            }
        images = check_niimgs(X, **grid)
        min_samples = 2 if reset else 1
        if images.n_samples < min_samples:
            raise ValueError(
                f"{name}.fit needs at least {min_samples} samples; X holds "
                f"{images.n_samples} image. Pass more images."
            )
        if reset:
            self._set_volume_shape(images.shape, images.affine)
        if images.in_memory:
            return images.load()
        return images

    @property
    def _sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample as the module sees it (a channel axis added)."""
        shape = self.input_shape_
        return (1, *shape) if len(shape) == 3 else tuple(shape)

    def _preprocessing(self) -> Preprocessing:
        """The fitted scaling and mask (identity before the first fit)."""
        return Preprocessing(
            getattr(self, "intensity_offset_", 0.0),
            getattr(self, "intensity_scale_", 1.0),
            getattr(self, "_mask", None),
        )

    def _to_tensor(self, X: np.ndarray, prep: Preprocessing | None = None):
        """Samples as the network sees them: float32, scaled and masked."""
        # a float32 copy: never aliases (possibly read-only or strided) user memory
        X = np.array(X, dtype=np.float32, order="C", copy=True)
        tensor = torch.from_numpy(X).reshape(X.shape[0], *self._sample_shape)
        return (prep or self._preprocessing()).forward(tensor)

    def _to_raw(self, values: torch.Tensor, dtype) -> np.ndarray:
        """Decoded samples as an array in the user's space: raw intensities,
        zero outside the mask, in ``dtype``, shaped as the training samples."""
        out = values.numpy().astype(dtype, copy=False)
        out = self._preprocessing().inverse(out)
        return out.reshape(out.shape[0], *self.input_shape_)

    def _as_output(self, out: np.ndarray):
        """One 4-D image on the training grid when fitted on images, else
        the array itself."""
        if getattr(self, "affine_", None) is not None:
            return to_img(out, self.affine_)
        return out

    def _to_output(self, values: torch.Tensor, dtype):
        """Decoded samples back to the user's space (see ``_to_raw``)."""
        return self._as_output(self._to_raw(values, dtype))

    def _check_data(self, X, stats: DataStatistics) -> None:
        """Checks that depend on parameters (override to add more)."""
        if self.likelihood == "bernoulli":
            prep = self._preprocessing()
            low = (stats.min - prep.offset) / prep.scale
            high = (stats.max - prep.offset) / prep.scale
            if low < 0 or high > 1:
                raise ValueError(
                    f"{type(self).__name__}: likelihood='bernoulli' needs data in "
                    f"[0, 1] after scaling={self.scaling!r}; X ranges over "
                    f"[{low:g}, {high:g}]. Use scaling='minmax' or "
                    "likelihood='gaussian'."
                )
        if self.backbone in ("conv", "resnet") and len(self.input_shape_) == 1:
            raise ValueError(
                f"{type(self).__name__}: backbone={self.backbone!r} needs volumes "
                "(a 4-D or 5-D X, or images); X is 2-D. Use backbone='mlp' or "
                "'auto'."
            )

    # ------------------------------------------------------------------
    # masks, scaling and data passes
    # ------------------------------------------------------------------
    def _fit_mask(self) -> None:
        """Resolve ``mask_img`` on the training grid (``mask_img_``)."""
        self.__dict__.pop("mask_img_", None)
        self._mask = None
        if self.mask_img is None:
            return
        if len(self.input_shape_) == 1:
            raise ValueError(
                f"{type(self).__name__}: mask_img needs volumes (a 4-D or 5-D "
                "X, or images); X is 2-D. For masked features (e.g. from a "
                "NiftiMasker) the masker applies the mask."
            )
        affine = getattr(self, "affine_", None)
        self._mask = check_mask(self.mask_img, self.input_shape_[-3:], affine)
        self.mask_img_ = self._mask_output()

    def _mask_output(self):
        """``mask_img_``: an image when fitted on images, else a bool array."""
        if getattr(self, "affine_", None) is None:
            return self._mask.copy()
        return nib.Nifti1Image(self._mask.astype(np.uint8), self.affine_)

    def _image_batches(self, images: ImageCollection, batch_size: int, prep=None):
        """Batches of ``images`` in order, read by ``num_workers`` workers."""
        batches = DatasetBatches(
            VolumeDataset(images, self._sample_shape, prep),
            batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
        )
        for (batch,) in batches:
            yield batch

    def _raw_batches(self, X):
        """``X`` in batches of raw float samples, with names for errors."""
        batch_size = max(1, _INFERENCE_VOXELS // max(self.n_features_in_, 1))
        if isinstance(X, ImageCollection):
            start = 0
            for batch in self._image_batches(X, batch_size):
                batch = batch.reshape(len(batch), *X.shape)
                names = [X.where(i) for i in range(start, start + len(batch))]
                start += len(batch)
                yield batch.numpy(), names
        else:
            for start in range(0, X.shape[0], batch_size):
                yield X[start : start + batch_size], None

    def _statistics(self, X, context: DistributedContext | None = None):
        """One pass over ``X``: voxel statistics inside the mask, and the
        check that streamed images hold no NaN or inf there.

        In distributed training, streamed images are split among the
        processes, each reading its part only, and the statistics merged."""
        if context is not None and isinstance(X, ImageCollection):
            return self._distributed_statistics(X, context)
        stats = DataStatistics()
        mask = getattr(self, "_mask", None)
        for batch, names in self._raw_batches(X):
            stats.update(batch, mask=mask, where=names)
        return stats

    def _distributed_statistics(
        self, X: ImageCollection, context: DistributedContext
    ) -> DataStatistics:
        """:meth:`_statistics` of streamed images, each process reading a
        contiguous part; an error on any process is raised on all."""
        bounds = np.linspace(0, X.n_samples, context.world_size + 1).astype(int)
        lo, hi = bounds[context.rank], bounds[context.rank + 1]
        part = ImageCollection(X._samples[lo:hi], X.shape, X.affine)
        error, stats = None, DataStatistics()
        try:
            stats = self._statistics(part)
        except ValueError as exc:
            error = str(exc)
        gathered = context.all_gather_object((error, vars(stats)))
        errors = [e for e, _ in gathered if e is not None]
        if errors:
            raise ValueError(errors[0])
        merged = DataStatistics()
        for _, other in gathered:  # Chan et al.'s merge, in sample order
            n = merged.n_values + other["n_values"]
            if other["n_values"] == 0:
                continue
            delta = other["mean"] - merged.mean
            merged.mean += delta * other["n_values"] / n
            merged.m2 += (
                other["m2"] + delta**2 * merged.n_values * other["n_values"] / n
            )
            merged.n_values = n
            merged.min = min(merged.min, other["min"])
            merged.max = max(merged.max, other["max"])
        return merged

    def _fit_scaling(self, stats: DataStatistics) -> None:
        scaling = self.scaling
        if scaling == "auto":
            scaling = "minmax" if self.likelihood == "bernoulli" else "zscore"
        prep = Preprocessing.fit(stats, scaling, None)
        self.intensity_offset_ = prep.offset
        self.intensity_scale_ = prep.scale

    def _likelihood_init(self, stats: DataStatistics) -> dict:
        """Starting scale of the likelihood: the scaled data's std."""
        std = stats.std / self.intensity_scale_
        std = std if math.isfinite(std) and std > 0 else 1.0
        return {"std": std, "min_scale": 1e-3 * std}

    def _n_likelihood_features(self) -> int:
        """Values counted by the likelihood per sample (inside the mask)."""
        mask = getattr(self, "_mask", None)
        if mask is None:
            return self.n_features_in_
        return int(mask.sum()) * (self.n_features_in_ // mask.size)

    # ------------------------------------------------------------------
    # fitting
    # ------------------------------------------------------------------
    @staticmethod
    def _draw_seed(random_state) -> int:
        """A base seed: from ``random_state``, or fresh OS entropy for None.

        Fresh entropy (not the global numpy generator) keeps ``fit`` from
        touching any global random state even when ``random_state=None``.
        """
        if random_state is None:
            return int(np.random.SeedSequence().generate_state(1)[0])
        if isinstance(random_state, numbers.Integral):
            return int(random_state)
        return int(check_random_state(random_state).randint(2**31 - 1))

    def _resolved_batch_size(self, n_samples: int, n_groups: int = 1) -> int:
        """``batch_size``, with "auto" bounded by samples and voxels.

        With groups, ``n_samples`` is the size of the smallest group and the
        result is the number of samples taken from each group per step."""
        batch_size = self._param("batch_size")
        if batch_size != "auto":
            return min(int(batch_size), n_samples)
        if len(self.input_shape_) == 1:
            return min(_AUTO_BATCH, n_samples)
        per_batch = max(1, _AUTO_VOXELS // (n_groups * self.n_features_in_))
        return min(_AUTO_BATCH, per_batch, n_samples)

    # parameters the module is built from: warm_start must keep them
    _structure_params: tuple[str, ...] = (
        "n_components",
        "backbone",
        "hidden_layer_sizes",
        "channels",
        "likelihood",
        "likelihood_scale",
    )

    def _param(self, name: str):
        """The value of parameter ``name`` in effect for this fit.

        The parameter itself, unless the family takes some values from
        elsewhere (:class:`~neurovae.VeryDeepVAE` from its ``config``). Code
        that reads a parameter the config may set goes through here."""
        return getattr(self, name)

    def _structure(self) -> dict:
        """Values of ``_structure_params`` (module backbones by class name)."""
        values = {}
        for name in self._structure_params:
            value = self._param(name)
            if _is_module_pair(value):
                value = tuple(type(m).__name__ for m in value)
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        return values

    def _engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_iter=self._param("max_iter"),
            optimizer=self.optimizer,
            learning_rate_init=self._param("learning_rate_init"),
            weight_decay=self.weight_decay,
            max_grad_norm=self._param("max_grad_norm"),
            early_stopping=self.early_stopping,
            n_iter_no_change=self.n_iter_no_change,
            tol=self.tol,
            precision=self._param("precision"),
            verbose=self.verbose,
            name=type(self).__name__,
        )

    def _groups(self, data) -> torch.Tensor | None:
        """Group of each sample of ``data`` (the target tensor at index
        ``_group_target``), or None when the family has no groups."""
        k = self._group_target
        if k is None:
            return None
        if isinstance(data, Subset):
            return data.dataset.targets[k][torch.as_tensor(data.indices)]
        if isinstance(data, Dataset):
            return data.targets[k]
        return data[1 + k]

    def _split(self, data, seed: int):
        """Training and validation data (a seeded split for early stopping).

        ``data`` is a tuple of tensors or a dataset. Without early stopping it
        is returned as it is: no copy. With groups (``_group_target``) the
        split is stratified: ``validation_fraction`` of every group.
        """
        if not self.early_stopping:
            return data, None
        n_samples = len(data) if isinstance(data, Dataset) else data[0].shape[0]
        groups = self._groups(data)
        if groups is None:
            strata = [np.arange(n_samples)]
        else:
            codes = groups.cpu().numpy()
            strata = [np.flatnonzero(codes == g) for g in np.unique(codes)]
        rng = np.random.default_rng(seed)
        train_idx, val_idx = [], []
        for members in strata:
            fraction = self._param("validation_fraction")
            n_val = math.ceil(fraction * len(members))
            if n_val < 1 or len(members) - n_val < 1:
                where = "" if groups is None else " of a group"
                raise ValueError(
                    f"{type(self).__name__}: early_stopping with "
                    f"validation_fraction={fraction} leaves no "
                    f"training or validation sample out of {len(members)}{where}; "
                    "pass more samples or set early_stopping=False."
                )
            perm = members[rng.permutation(len(members))]
            train_idx.append(perm[n_val:])
            val_idx.append(perm[:n_val])
        train_idx = np.sort(np.concatenate(train_idx))
        val_idx = np.sort(np.concatenate(val_idx))
        if isinstance(data, Dataset):
            return Subset(data, train_idx.tolist()), Subset(data, val_idx.tolist())
        train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        return tuple(t[train_idx] for t in data), tuple(t[val_idx] for t in data)

    def _batches(self, data, device, *, shuffle, seed=None, context=None):
        """Engine batches of ``data``: a tuple of tensors (sliced in memory,
        on the GPU when small enough) or a dataset (read by a DataLoader).

        With groups, shuffled batches hold ``batch_size`` samples of each
        group (see :class:`~neurovae.training.TensorBatches`). With a
        distributed ``context``, each process iterates over its share of
        every global batch of ``batch_size``."""
        shard = None if context is None else (context.rank, context.world_size)
        generator = None
        if shuffle:
            generator = torch.Generator().manual_seed(int(seed))
        groups = self._groups(data) if shuffle else None
        if groups is not None:
            groups = groups.cpu()
            counts = torch.unique(groups, return_counts=True)[1]
            batch_size = self._resolved_batch_size(
                int(counts.min()), n_groups=len(counts)
            )
        else:
            n_samples = len(data) if isinstance(data, Dataset) else data[0].shape[0]
            batch_size = self._resolved_batch_size(n_samples)
        if isinstance(data, Dataset):
            return DatasetBatches(
                data,
                batch_size,
                shuffle=shuffle,
                generator=generator,
                device=device,
                num_workers=self.num_workers,
                collate_fn=collate,
                groups=groups,
                shard=shard,
            )
        data = tuple(data)
        if device.type != "cpu" and sum(t.nbytes for t in data) <= _GPU_RESIDENT_BYTES:
            data = tuple(t.to(device) for t in data)
        return TensorBatches(
            data,
            batch_size,
            shuffle=shuffle,
            generator=generator,
            device=device,
            groups=groups,
            shard=shard,
        )

    def _targets(self, y, n_samples: int) -> tuple[torch.Tensor, ...]:
        """Per-sample tensors trained along with X (override, e.g. labels)."""
        return ()

    def _training_data(self, X, y):
        """What the engine trains on: tensors in memory, or a dataset that
        streams images from disk."""
        targets = self._targets(y, len(X))
        if isinstance(X, ImageCollection):
            return VolumeDataset(
                X, self._sample_shape, self._preprocessing(), targets=targets
            )
        return (self._to_tensor(X), *targets)

    # ------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------
    def _fingerprint_params(self) -> dict:
        """The parameters a checkpoint must agree on, as JSON values.

        All of ``get_params`` but those that cannot change the result
        (``_NOT_FINGERPRINTED``); the mask as the fit resolved it."""
        params = self.get_params(deep=False)
        for name in _NOT_FINGERPRINTED:
            params.pop(name, None)
        if "mask_img" in params:
            mask = getattr(self, "_mask", None)
            params["mask_img"] = None if mask is None else describe(mask)
        return {name: describe(value) for name, value in params.items()}

    def _open_checkpoint(
        self, X, data, device, warm: bool, writer: bool = True
    ) -> Checkpoint:
        """The checkpoint of this fit in ``checkpoint_dir``, read: a
        checkpoint of the same run is to be resumed, another one refused."""
        if isinstance(data, Dataset):
            targets = tuple(getattr(data, "targets", ()))
        else:
            targets = tuple(data[1:])
        fingerprint = {
            "estimator": type(self).__name__,
            "parameters": self._fingerprint_params(),
            "data": data_digest(X, targets),
            "device": device.type,
        }
        start = {"epoch": 0}
        if warm:  # continues the fitted model: the checkpoint must too
            # buffers fitted after training differ from the checkpoint's
            skip = sorted(getattr(self.module_, "fitted_after_training", ()))
            start = {
                "epoch": int(self.n_iter_),
                "seed": int(self._seed),
                "weights": state_digest(self.module_.state_dict(), skip),
                "weights_skip": skip,
            }
        path = os.path.join(
            os.fspath(self.checkpoint_dir), f"{type(self).__name__}.ckpt"
        )
        checkpoint = Checkpoint(path, fingerprint, start=start, writer=writer)
        if checkpoint.read() and not warm:
            seed = checkpoint.metadata.get("seed")
            if not (isinstance(seed, int) and not isinstance(seed, bool)):
                raise CheckpointError(
                    f"{path} holds an invalid seed ({seed!r}) and was not loaded. "
                    "Delete it to start afresh."
                )
        return checkpoint

    def fit(self, X, y=None):
        """Fit the model to ``X``.

        Parameters
        ----------
        X : array-like or Niimg-like
            Training data: flat features of shape (n_samples, n_features)
            (e.g. the output of a ``NiftiMasker``), volumes of shape
            (n_samples, x, y, z) or (n_samples, channels, x, y, z), or images:
            a 4-D image (samples along the 4th axis), or a list of 3-D images
            or of paths to NIfTI files. Images in files are read batch by
            batch, never all at once.
        y : None
            Ignored; present for API consistency.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        validate_params(self, self._parameter_rules)
        warm = bool(self.warm_start) and hasattr(self, "module_")
        built_from = getattr(self, "_built_from", None) or {}
        changed = [k for k, v in self._structure().items() if built_from.get(k) != v]
        if warm and changed:
            raise ValueError(
                f"{type(self).__name__}: warm_start=True but parameters that "
                f"define the network changed since the last fit: "
                f"{', '.join(changed)}. Set warm_start=False to train a new network."
            )
        if not warm:  # a failed fit must not leave a stale model looking fitted
            self.__dict__.pop("module_", None)
        X = self._check_X(X, reset=not warm)
        if not warm:  # warm starts keep the mask and scaling of the first fit
            self._fit_mask()
        context, device = resolve_distributed(self.distributed, self.device)
        make_scaler(device, self._param("precision"))  # "16" needs CUDA: fail now
        stats = self._statistics(X, context)
        if not warm:
            self._fit_scaling(stats)
        self._check_data(X, stats)
        data = self._training_data(X, y)
        checkpoint = None
        if self.checkpoint_dir is not None:
            writer = context is None or context.is_main
            checkpoint = self._open_checkpoint(X, data, device, warm, writer)
        if not warm:
            if checkpoint is not None and checkpoint.state is not None:
                self._seed = checkpoint.metadata["seed"]  # also for None
            else:
                self._seed = self._draw_seed(self.random_state)
            if context is not None:  # random_state=None: one seed for all
                self._seed = context.broadcast_object(self._seed)
            self._fit_dtype = (
                "float32" if isinstance(X, ImageCollection) else (X.dtype.name)
            )
        if checkpoint is not None:
            checkpoint.metadata = {"seed": self._seed}
        n_done = self.n_iter_ if warm else 0
        init_seed, shuffle_seed, noise_seed = (
            int(v)
            for v in np.random.SeedSequence([self._seed, n_done]).generate_state(3)
        )
        train_data, val_data = self._split(data, self._seed)
        train = self._batches(
            train_data, device, shuffle=True, seed=shuffle_seed, context=context
        )
        val = None
        if val_data is not None:
            val = self._batches(val_data, device, shuffle=False, context=context)
        if warm:  # train a copy: a failed or interrupted fit changes nothing
            module = copy.deepcopy(self.module_)
        else:
            with local_rng(init_seed):
                module = self._build_module(
                    self._sample_shape, self._likelihood_init(stats)
                )
        module.to(device)
        module.generator = torch.Generator(device=device).manual_seed(noise_seed)
        engine = Engine(
            module,
            self._engine_config(),
            device,
            schedules=self._schedules(),
            hooks=self._hooks(),
            distributed=context,
        )
        history = {k: list(v) for k, v in self.history_.items()} if warm else {}
        result = engine.fit(
            train, val, history=history, start_epoch=n_done, checkpoint=checkpoint
        )
        self._after_training(module, train_data, device, context)
        self.module_ = module
        self.history_ = result.history
        self.n_iter_ = n_done + result.n_epochs
        self.best_epoch_ = result.best_epoch
        self._built_from = self._structure()
        return self

    # ------------------------------------------------------------------
    # inference
    # ------------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        """Fitted once a trained module exists (a failed ``fit`` leaves none)."""
        return hasattr(self, "module_")

    @property
    def _n_features_out(self) -> int:
        return self.module_.n_components

    def _module_device(self) -> torch.device:
        param = next(self.module_.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _input_batches(self, data, batch_size: int):
        """Network-ready batches of ``data``: a tensor (used as is), an array
        of samples (converted one batch at a time) or streamed images."""
        if isinstance(data, torch.Tensor):
            for start in range(0, data.shape[0], batch_size):
                yield data[start : start + batch_size]
            return
        prep = self._preprocessing()
        if not isinstance(data, ImageCollection):
            for start in range(0, data.shape[0], batch_size):
                batch = self._to_tensor(data[start : start + batch_size], prep)
                yield batch
            return
        start = 0
        for batch in self._image_batches(data, batch_size, prep):
            finite = torch.isfinite(batch.flatten(1)).all(dim=1)
            if not finite.all():
                bad = start + int(torch.nonzero(~finite)[0])
                raise ValueError(
                    f"{data.where(bad)} contains NaN or infinite values"
                    + (" inside the mask." if prep.mask is not None else ".")
                )
            start += len(batch)
            yield batch

    @torch.no_grad()
    def _batched(self, fn, data) -> torch.Tensor:
        """Apply ``fn`` batch by batch in eval mode; results on the CPU.

        ``data`` is a tensor, an array of user samples converted one batch at
        a time, or streamed images, so memory holds one batch, not a float32
        copy of all of X.
        """
        module = self.module_
        module.eval()
        device = self._module_device()
        # encoding reads, decoding writes full samples: budget by the larger
        given = math.prod(data.shape[1:]) if hasattr(data, "dtype") else 0
        per_sample = max(given, self.n_features_in_, 1)
        batch_size = max(1, min(_INFERENCE_BATCH, _INFERENCE_VOXELS // per_sample))
        outputs = []
        for batch in self._input_batches(data, batch_size):
            with autocast(device, self._param("precision")):
                out = fn(batch.to(device))
            outputs.append(out.float().cpu())
        return torch.cat(outputs)

    @staticmethod
    def _dtype_of(X):
        """Output dtype for ``X``: its own, float32 for streamed images."""
        return np.float32 if isinstance(X, ImageCollection) else X.dtype

    def transform(self, X):
        """Posterior means of the latent codes of ``X``.

        Parameters
        ----------
        X : array-like or Niimg-like
            Data shaped as at ``fit``: arrays, or images on the training grid
            (files are streamed).

        Returns
        -------
        Z : ndarray of shape (n_samples, n_components)
            Posterior means, in the dtype of ``X`` (float32 or float64;
            float32 for images).
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        mu = self._batched(lambda b: self.module_.encode(b)[0], X)
        return mu.numpy().astype(self._dtype_of(X), copy=False)

    def reconstruct(self, X):
        """Reconstructions of ``X``: the decoded posterior means.

        Parameters
        ----------
        X : array-like or Niimg-like
            Data shaped as at ``fit``.

        Returns
        -------
        X_reconstructed : ndarray or Nifti1Image
            In raw intensities, zero outside the mask: an array shaped as the
            training data, or one 4-D image (samples along the 4th axis) on
            the training grid when the model was fitted on images.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        return self._to_output(self._reconstructions(X), self._dtype_of(X))

    def _reconstructions(self, X) -> torch.Tensor:
        """Decoded posterior means of checked ``X``, as the network outputs."""
        module = self.module_
        return self._batched(lambda b: module.decode(module.encode(b)[0]), X)

    def reconstruction_error(self, X):
        """Voxel-wise squared reconstruction error of each sample of ``X``.

        ``(x - reconstruct(x)) ** 2`` in raw intensities, zero outside the
        mask. In normative modelling, where the model is trained on healthy
        subjects, large errors mark tissue the model finds atypical.

        Parameters
        ----------
        X : array-like or Niimg-like
            Data shaped as at ``fit``.

        Returns
        -------
        errors : ndarray or Nifti1Image
            Shaped as :meth:`reconstruct`'s output: an array, or one 4-D image
            on the training grid when the model was fitted on images.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        dtype = self._dtype_of(X)
        recon = self._to_raw(self._reconstructions(X), dtype)
        raw = X.load() if isinstance(X, ImageCollection) else np.asarray(X, dtype)
        errors = (raw.reshape(recon.shape) - recon) ** 2
        if getattr(self, "_mask", None) is not None:
            errors[..., ~self._mask] = 0
        return self._as_output(errors)

    def _check_Z(self, Z) -> np.ndarray:
        Z = check_array(Z, dtype=_DTYPES, input_name="Z", estimator=self)
        if Z.shape[1] != self._n_features_out:
            raise ValueError(
                f"Z has {Z.shape[1]} columns, but {type(self).__name__}.transform "
                f"gives {self._n_features_out}."
            )
        return Z

    def _codes(self, Z: torch.Tensor) -> torch.Tensor:
        """Full latent codes for the decoder from ``transform``'s features."""
        return Z

    def inverse_transform(self, X):
        """Decode latent codes: the mean of p(x | z) for each row of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Latent codes, e.g. the output of :meth:`transform`.

        Returns
        -------
        X_original : ndarray or Nifti1Image
            Decoded samples in raw intensities (zero outside the mask), in the
            dtype of ``X``: an array shaped as the training data, or one 4-D
            image on the training grid when the model was fitted on images.
        """
        check_is_fitted(self)
        Z = self._check_Z(X)
        codes = self._codes(torch.tensor(Z, dtype=torch.float32))
        return self._to_output(self._batched(self.module_.decode, codes), Z.dtype)

    def sample(self, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Generate samples: decoder means of latent codes drawn from N(0, I).

        Observation noise is not added, so samples are as smooth as
        reconstructions.

        Parameters
        ----------
        n_samples : int, default=1
            Number of samples.
        random_state : int, RandomState instance or None, default=None
            Seed of the latent draws; None draws fresh ones.

        Returns
        -------
        X : ndarray of shape (n_samples, ...) or Nifti1Image
            Samples in raw intensities (zero outside the mask), in the
            training dtype: an array shaped as the training data, or one 4-D
            image on the training grid when the model was fitted on images.
        """
        return self._decode_prior(n_samples, random_state)

    def _decode_prior(self, n_samples, random_state, keep=None):
        """Decoded draws from N(0, I); ``keep`` (bool, one per latent
        dimension) sets the dimensions it marks False to zero."""
        check_is_fitted(self)
        check_value(self, "n_samples", n_samples, Interval(int, 1))
        check_value(
            self, "random_state", random_state, self._parameter_rules["random_state"]
        )
        generator = torch.Generator().manual_seed(self._draw_seed(random_state))
        z = torch.randn(int(n_samples), self.module_.n_components, generator=generator)
        if keep is not None:
            z = z * keep
        return self._to_output(self._batched(self.module_.decode, z), self._fit_dtype)

    def score_samples(self, X) -> np.ndarray:
        """Evidence lower bound (ELBO) of each sample, in nats.

        The expectation over the posterior is estimated with one draw of the
        reparameterisation noise, the same fixed draw for every sample (drawn
        at initialisation under ``random_state`` and saved with the weights),
        so scores are deterministic and do not depend on which other samples
        are scored with them.

        The ELBO is of the data in raw intensities: the network models the
        scaled data, and the log-Jacobian of the scaling,
        ``-n_values * log(intensity_scale_)``, is added. With a mask only the
        voxels inside it are modelled.

        Parameters
        ----------
        X : array-like or Niimg-like
            Data shaped as at ``fit``.

        Returns
        -------
        elbo : ndarray of shape (n_samples,)
            Per-sample ELBO; higher is better.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        return self._raw_elbo(self._batched(self.module_.elbo, X))

    def _raw_elbo(self, elbo: torch.Tensor) -> np.ndarray:
        """ELBOs of the scaled data (as the network models it) turned into
        ELBOs of the raw data: the log-Jacobian of the scaling added."""
        elbo = elbo.numpy().astype(np.float64)
        return elbo - self._n_likelihood_features() * math.log(self.intensity_scale_)

    def score(self, X, y=None) -> float:
        """Mean ELBO per sample (higher is better, as scikit-learn expects).

        Parameters
        ----------
        X : array-like or Niimg-like
            Data shaped as at ``fit``.
        y : None
            Ignored.

        Returns
        -------
        score : float
        """
        return float(np.mean(self.score_samples(X)))

    def bits_per_voxel(self, X) -> np.ndarray:
        """Negative ELBO of each sample in bits per voxel (lower is better).

        ``-score_samples(X) / (n_values * log(2))``, with ``n_values`` the
        modelled values of a sample: its voxels (times channels) inside the
        mask, or its features for flat data. The unit of very deep VAE
        papers, comparable across grids and models. Scores are of the raw
        intensities, so for continuous data it may be negative.

        Parameters
        ----------
        X : array-like or Niimg-like
            Data shaped as at ``fit``.

        Returns
        -------
        bpv : ndarray of shape (n_samples,)

        Examples
        --------
        >>> from sklearn.datasets import load_digits
        >>> from neurovae import VAE
        >>> X = load_digits().data
        >>> vae = VAE(n_components=4, max_iter=3, random_state=0).fit(X)
        >>> vae.bits_per_voxel(X[:5]).shape
        (5,)
        """
        return -self.score_samples(X) / (self._n_likelihood_features() * math.log(2))

    # ------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------
    def _module_state(self) -> dict[str, torch.Tensor]:
        """The fitted module's weights as CPU tensors (for pickle and ``save``)."""
        return {
            k: v.detach().cpu().clone() for k, v in self.module_.state_dict().items()
        }

    def __getstate__(self):
        state = dict(super().__getstate__())  # may be self.__dict__ itself
        if state.pop("module_", None) is not None:
            state["_module_state"] = self._module_state()
        return state

    def __setstate__(self, state):
        module_state = state.pop("_module_state", None)
        super().__setstate__(state)
        if module_state is not None:
            self.module_ = self._restore_module(module_state)

    def _restore_module(self, module_state: dict[str, torch.Tensor]) -> nn.Module:
        """Rebuild the fitted module from its weights (on CPU, or on the
        estimator's device where that device exists)."""
        with local_rng(0):
            module = self._build_module(self._sample_shape, {})
        module.load_state_dict(module_state)
        for name, schedule in self._schedules().items():
            setattr(module, name, schedule.final)
        self._built_from = self._structure()
        try:
            device = resolve_device(self.device)
        except ValueError:
            device = torch.device("cpu")
        return module.to(device).eval()

    def save(self, path) -> None:
        """Save the fitted model in neurovae's safe format.

        The file holds the weights and a JSON description of the parameters
        and fitted attributes; :func:`neurovae.load` reads it with
        ``torch.load(weights_only=True)``, so loading a file runs no code.

        In a script launched by ``torchrun`` (unless ``distributed=False``)
        only rank 0 writes the file; every rank may call ``save``.

        Parameters
        ----------
        path : str or path-like
            Destination file (conventionally ``*.nvae``).
        """
        from neurovae.persistence import save

        if is_main_process(self._distributed_param()):
            save(self, path)

    def _distributed_param(self):
        """``distributed``, as this estimator's fits resolve it."""
        return getattr(self, "distributed", "auto")

    # ------------------------------------------------------------------
    # tags
    # ------------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.allow_nan = False
        return tags
