"""VeryDeepVAE: a hierarchical 3-D VAE (Child 2021) as an estimator."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from neurovae._validation import Custom, Interval, IntSequence, Options, check_value
from neurovae.base import BaseVAE
from neurovae.nn import VeryDeepVAEModule
from neurovae.training import Constant, EngineConfig, Linear, Schedule

_LISTS = (
    "channels",
    "channels_hidden",
    "channels_per_latent",
    "latents_per_resolution",
    "kernel_sizes",
)


def _is_fraction(value) -> bool:
    return (
        value is None
        or isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and 0 < value < 1
    )


class VeryDeepVAE(BaseVAE):
    """Very deep hierarchical VAE for 3-D volumes (work in progress)."""

    # a learned, bounded per-voxel Gaussian scale, as in the reference
    likelihood = "gaussian"
    likelihood_scale = "feature"

    _structure_params = (*_LISTS, "n_blocks_per_resolution")
    _parameter_rules = {
        **{
            k: v
            for k, v in BaseVAE._parameter_rules.items()
            if k
            not in (
                "n_components",
                "backbone",
                "hidden_layer_sizes",
                "channels",
                "likelihood",
                "likelihood_scale",
            )
        },
        "channels": IntSequence(),
        "channels_hidden": IntSequence(),
        "channels_per_latent": IntSequence(),
        "latents_per_resolution": IntSequence(minimum=0),
        "kernel_sizes": IntSequence(),
        "n_blocks_per_resolution": Interval(int, 1),
        "n_transform_groups": Interval(int, 1),
        "warmup_iter": Interval(int, 0),
        "skip_threshold": Interval(float, 0.0, low_open=True, none_ok=True),
        "ema_decay": Custom(_is_fraction, "None or a float in (0, 1)"),
        "gradient_checkpointing": Options((True, False)),
    }

    def __init__(
        self,
        channels=(8, 16, 32, 64),
        channels_hidden=(4, 8, 16, 32),
        channels_per_latent=(1, 2, 4, 8),
        latents_per_resolution=(0, 1, 2, 2),
        kernel_sizes=(1, 3, 3, 3),
        *,
        n_blocks_per_resolution=1,
        n_transform_groups=1,
        beta=1.0,
        warmup_iter=0,
        optimizer="adamax",
        learning_rate_init=2e-3,
        weight_decay=0.0,
        max_grad_norm=None,
        skip_threshold=None,
        ema_decay=None,
        gradient_checkpointing=False,
        batch_size="auto",
        max_iter=50,
        early_stopping=False,
        validation_fraction=0.1,
        n_iter_no_change=10,
        tol=1e-4,
        device="auto",
        precision="32",
        random_state=None,
        verbose=0,
        warm_start=False,
        mask_img=None,
        scaling="auto",
        num_workers=0,
    ):
        self.channels = channels
        self.channels_hidden = channels_hidden
        self.channels_per_latent = channels_per_latent
        self.latents_per_resolution = latents_per_resolution
        self.kernel_sizes = kernel_sizes
        self.n_blocks_per_resolution = n_blocks_per_resolution
        self.n_transform_groups = n_transform_groups
        self.beta = beta
        self.warmup_iter = warmup_iter
        self.optimizer = optimizer
        self.learning_rate_init = learning_rate_init
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.skip_threshold = skip_threshold
        self.ema_decay = ema_decay
        self.gradient_checkpointing = gradient_checkpointing
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.device = device
        self.precision = precision
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.mask_img = mask_img
        self.scaling = scaling
        self.num_workers = num_workers

    # ------------------------------------------------------------------
    # the model
    # ------------------------------------------------------------------
    def _check_data(self, X, stats) -> None:
        if len(self.input_shape_) not in (3, 4):
            raise ValueError(
                f"{type(self).__name__} needs volumes: a 4-D array (n_samples, x, "
                "y, z), a 5-D array (n_samples, channels, x, y, z) or images; X "
                f"has samples of shape {self.input_shape_}."
            )
        n = len(self.channels)
        for name in _LISTS[1:]:
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{type(self).__name__}: {name} has {len(getattr(self, name))} "
                    f"entries but channels has {n}; every list has one entry per "
                    "resolution, highest first."
                )

    def _build_module(self, sample_shape, stats) -> VeryDeepVAEModule:
        return VeryDeepVAEModule(
            sample_shape[0],
            sample_shape[1:],
            channels=tuple(self.channels),
            channels_hidden=tuple(self.channels_hidden),
            channels_per_latent=tuple(self.channels_per_latent),
            latents_per_resolution=tuple(self.latents_per_resolution),
            kernel_sizes=tuple(self.kernel_sizes),
            likelihood=self._likelihood(sample_shape, stats),
            n_blocks_per_resolution=self.n_blocks_per_resolution,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def _schedules(self) -> dict[str, Schedule]:
        if self.warmup_iter:
            return {"beta": Linear(self.beta, warmup_iter=self.warmup_iter)}
        return {"beta": Constant(self.beta)}

    def _engine_config(self) -> EngineConfig:
        config = super()._engine_config()
        config.skip_threshold = self.skip_threshold
        config.ema_decay = self.ema_decay
        return config

    # ------------------------------------------------------------------
    # inference
    # ------------------------------------------------------------------
    def _top_groups(self) -> int:
        n_groups = self.module_.n_latent_groups
        if self.n_transform_groups > n_groups:
            raise ValueError(
                f"{type(self).__name__}: n_transform_groups="
                f"{self.n_transform_groups} but the model has {n_groups} latent "
                "groups."
            )
        return self.n_transform_groups

    @property
    def _n_features_out(self) -> int:
        shapes = self.module_.latent_shapes[: self._top_groups()]
        return int(sum(math.prod(s) for s in shapes))

    def transform(self, X):
        """Posterior means of the top (coarsest) latent groups, flattened.

        Parameters
        ----------
        X : array-like or Niimg-like
            Volumes shaped as at ``fit``.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_features_out)
            The means of the first ``n_transform_groups`` groups in top-down
            order, each flattened (channels, then space), side by side.
        """
        check_is_fitted(self)
        k = self._top_groups()
        X = self._check_X(X, reset=False)

        def top(batch):
            return torch.cat([m.flatten(1) for m in self.module_.encode(batch)[:k]], 1)

        return self._batched(top, X).numpy().astype(self._dtype_of(X), copy=False)

    def transform_levels(self, X) -> list[np.ndarray]:
        """Posterior means of every latent group, coarsest first.

        Parameters
        ----------
        X : array-like or Niimg-like
            Volumes shaped as at ``fit``.

        Returns
        -------
        levels : list of ndarray
            One array per group, of shape ``(n_samples, channels, x, y, z)``
            on that group's grid (``module_.latent_shapes``).
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        shapes = self.module_.latent_shapes
        sizes = [math.prod(s) for s in shapes]
        flat = self._batched(
            lambda b: torch.cat([m.flatten(1) for m in self.module_.encode(b)], 1), X
        ).numpy()
        dtype = self._dtype_of(X)
        out, start = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(flat[:, start : start + size].reshape(-1, *shape).astype(dtype))
            start += size
        return out

    def _codes(self, Z: torch.Tensor):
        groups, start = [], 0
        for shape in self.module_.latent_shapes[: self._top_groups()]:
            size = math.prod(shape)
            groups.append(Z[:, start : start + size].reshape(-1, *shape))
            start += size
        return groups

    def inverse_transform(self, X):
        """Decode top-group codes; the finer groups take their prior means.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_out)
            Codes as :meth:`transform` returns them.

        Returns
        -------
        X_original : ndarray or Nifti1Image
            Decoded volumes in raw intensities.
        """
        check_is_fitted(self)
        Z = torch.tensor(self._check_Z(X), dtype=torch.float32)
        module = self.module_

        def decode(batch):
            return module.decode_latents(self._codes(batch))

        return self._to_output(self._batched(decode, Z), self._check_Z(X).dtype)

    def _reconstructions(self, X) -> torch.Tensor:
        module = self.module_
        return self._batched(lambda b: module.decode_latents(module.encode(b)), X)

    def sample(self, n_samples=1, temperature=1.0, random_state=None):
        """Generate volumes from the hierarchical prior.

        Parameters
        ----------
        n_samples : int, default=1
            Number of volumes.
        temperature : float, default=1.0
            Factor on the standard deviations of the priors; lower values
            give smoother, more typical samples (0: the prior means).
        random_state : int, RandomState instance or None, default=None
            Seed of the draws.

        Returns
        -------
        X : ndarray or Nifti1Image
            Decoder means, in raw intensities.
        """
        check_is_fitted(self)
        check_value(self, "n_samples", n_samples, Interval(int, 1))
        check_value(self, "temperature", temperature, Interval(float, 0.0))
        check_value(
            self, "random_state", random_state, self._parameter_rules["random_state"]
        )
        device = self._module_device()
        generator = torch.Generator(device=device).manual_seed(
            self._draw_seed(random_state)
        )
        module = self.module_.eval()
        chunks, left = [], int(n_samples)
        size = max(1, 2**22 // self.n_features_in_)
        while left:
            n = min(size, left)
            out = module.sample(n, temperature=float(temperature), generator=generator)
            chunks.append(out.float().cpu())
            left -= n
        return self._to_output(torch.cat(chunks), self._fit_dtype)

    def bits_per_voxel(self, X) -> np.ndarray:
        """Negative ELBO of each volume in bits per voxel (lower is better).

        ``-score_samples(X) / (n_values * log(2))``, with ``n_values`` the
        voxels (times channels) inside the mask: the usual unit of very deep
        VAEs, comparable across grids. For continuous data it may be
        negative.

        Parameters
        ----------
        X : array-like or Niimg-like
            Volumes shaped as at ``fit``.

        Returns
        -------
        bpv : ndarray of shape (n_samples,)
        """
        return -self.score_samples(X) / (self._n_likelihood_features() * math.log(2))
