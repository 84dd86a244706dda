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
from collections.abc import Callable

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

from neurovae._validation import (
    AnyOf,
    Custom,
    Interval,
    IntSequence,
    Options,
    check_value,
    validate_params,
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
    Engine,
    EngineConfig,
    Hook,
    Schedule,
    TensorBatches,
    autocast,
    local_rng,
    resolve_device,
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


class BaseVAE(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Shared face of the neurovae estimators. Not for direct use.

    Subclasses define ``__init__`` (storing their arguments unchanged) and
    ``_build_module``; they may extend ``_parameter_rules`` and override
    ``_schedules`` and ``_hooks``.
    """

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
            make_likelihood(
                self.likelihood,
                sample_shape,
                scale=self.likelihood_scale,
                init_scale=stats.get("std", 1.0),
                min_scale=stats.get("min_scale", 1e-3),
            ),
        )

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
                self.input_shape_ = tuple(int(s) for s in X.shape[1:])
                self.n_features_in_ = int(math.prod(self.input_shape_))
                if hasattr(self, "feature_names_in_"):
                    del self.feature_names_in_
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
        return X

    @property
    def _sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample as the module sees it (a channel axis added)."""
        shape = self.input_shape_
        return (1, *shape) if len(shape) == 3 else tuple(shape)

    def _to_tensor(self, X: np.ndarray) -> torch.Tensor:
        # a float32 copy: never aliases (possibly read-only or strided) user memory
        X = np.array(X, dtype=np.float32, order="C", copy=True)
        return torch.from_numpy(X).reshape(X.shape[0], *self._sample_shape)

    def _to_output(self, values: torch.Tensor, dtype) -> np.ndarray:
        """Decoded samples back to the user's layout and dtype."""
        out = values.numpy().astype(dtype, copy=False)
        return out.reshape(out.shape[0], *self.input_shape_)

    def _check_data(self, X: np.ndarray) -> None:
        """Checks that depend on parameters (override to add more)."""
        if self.likelihood == "bernoulli":
            low, high = X.min(), X.max()
            if low < 0 or high > 1:
                raise ValueError(
                    f"{type(self).__name__}: likelihood='bernoulli' needs data in "
                    f"[0, 1]; X ranges over [{low:g}, {high:g}]. Rescale it "
                    "(e.g. MinMaxScaler) or use likelihood='gaussian'."
                )
        if self.backbone in ("conv", "resnet") and len(self.input_shape_) == 1:
            raise ValueError(
                f"{type(self).__name__}: backbone={self.backbone!r} needs volumes "
                "(a 4-D or 5-D X); X is 2-D. Use backbone='mlp' or 'auto'."
            )

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

    def _resolved_batch_size(self, n_samples: int) -> int:
        """``batch_size``, with "auto" bounded by samples and voxels."""
        if self.batch_size != "auto":
            return min(int(self.batch_size), n_samples)
        if len(self.input_shape_) == 1:
            return min(_AUTO_BATCH, n_samples)
        per_batch = max(1, _AUTO_VOXELS // self.n_features_in_)
        return min(_AUTO_BATCH, per_batch, n_samples)

    def _structure(self) -> tuple:
        """The parameters the module is built from (``warm_start`` keeps them)."""
        backbone = self.backbone
        if _is_module_pair(backbone):
            backbone = tuple(type(m).__name__ for m in backbone)
        return (
            self.n_components,
            backbone,
            tuple(self.hidden_layer_sizes),
            tuple(self.channels),
            self.likelihood,
            self.likelihood_scale,
        )

    def _engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_iter=self.max_iter,
            optimizer=self.optimizer,
            learning_rate_init=self.learning_rate_init,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
            early_stopping=self.early_stopping,
            n_iter_no_change=self.n_iter_no_change,
            tol=self.tol,
            precision=self.precision,
            verbose=self.verbose,
            name=type(self).__name__,
        )

    def _split(
        self, tensors: tuple[torch.Tensor, ...], seed: int
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
        """Training and validation tensors (a seeded split for early stopping).

        Without early stopping the tensors are returned as they are: no copy.
        """
        if not self.early_stopping:
            return tensors, None
        n_samples = tensors[0].shape[0]
        n_val = math.ceil(self.validation_fraction * n_samples)
        if n_val < 1 or n_samples - n_val < 1:
            raise ValueError(
                f"{type(self).__name__}: early_stopping with validation_fraction="
                f"{self.validation_fraction} leaves no training or validation "
                f"sample out of {n_samples}; pass more samples or set "
                "early_stopping=False."
            )
        perm = np.random.default_rng(seed).permutation(n_samples)
        train_idx = torch.from_numpy(np.sort(perm[n_val:]))
        val_idx = torch.from_numpy(np.sort(perm[:n_val]))
        return (
            tuple(t[train_idx] for t in tensors),
            tuple(t[val_idx] for t in tensors),
        )

    @staticmethod
    def _data_stats(X: torch.Tensor) -> dict:
        """Data statistics used to initialise the likelihood scale."""
        std = float(X.std()) if X.numel() > 1 else 1.0
        std = std if math.isfinite(std) and std > 0 else 1.0
        return {"std": std, "min_scale": 1e-3 * std}

    def _batches(self, tensors, device, *, shuffle, seed=None) -> TensorBatches:
        data = tuple(tensors)
        if device.type != "cpu" and sum(t.nbytes for t in data) <= _GPU_RESIDENT_BYTES:
            data = tuple(t.to(device) for t in data)
        generator = None
        if shuffle:
            generator = torch.Generator().manual_seed(int(seed))
        return TensorBatches(
            data,
            self._resolved_batch_size(data[0].shape[0]),
            shuffle=shuffle,
            generator=generator,
            device=device,
        )

    def _training_tensors(self, X: np.ndarray, y) -> tuple[torch.Tensor, ...]:
        """Tensors of one training batch tuple (override to add targets)."""
        return (self._to_tensor(X),)

    def fit(self, X, y=None):
        """Fit the model to ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), (n_samples, x, y, z) \
or (n_samples, channels, x, y, z)
            Training data: flat features (e.g. the output of a ``NiftiMasker``)
            or volumes.
        y : None
            Ignored; present for API consistency.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        validate_params(self, self._parameter_rules)
        warm = bool(self.warm_start) and hasattr(self, "module_")
        if warm and getattr(self, "_built_from", None) != self._structure():
            raise ValueError(
                f"{type(self).__name__}: warm_start=True but parameters that "
                "define the network (n_components, backbone, hidden_layer_sizes, "
                "channels, likelihood, likelihood_scale) changed since the last "
                "fit. Set warm_start=False to train a new network."
            )
        if not warm:  # a failed fit must not leave a stale model looking fitted
            self.__dict__.pop("module_", None)
        X = self._check_X(X, reset=not warm)
        self._check_data(X)
        device = resolve_device(self.device)
        if not warm:
            self._seed = self._draw_seed(self.random_state)
            self._fit_dtype = X.dtype.name
        n_done = self.n_iter_ if warm else 0
        init_seed, shuffle_seed, noise_seed = (
            int(v)
            for v in np.random.SeedSequence([self._seed, n_done]).generate_state(3)
        )
        train_tensors, val_tensors = self._split(
            self._training_tensors(X, y), self._seed
        )
        train = self._batches(train_tensors, device, shuffle=True, seed=shuffle_seed)
        val = None
        if val_tensors is not None:
            val = self._batches(val_tensors, device, shuffle=False)
        if warm:  # train a copy: a failed or interrupted fit changes nothing
            module = copy.deepcopy(self.module_)
        else:
            with local_rng(init_seed):
                module = self._build_module(
                    self._sample_shape, self._data_stats(train_tensors[0])
                )
        module.to(device)
        module.generator = torch.Generator(device=device).manual_seed(noise_seed)
        engine = Engine(
            module,
            self._engine_config(),
            device,
            schedules=self._schedules(),
            hooks=self._hooks(),
        )
        history = {k: list(v) for k, v in self.history_.items()} if warm else {}
        result = engine.fit(train, val, history=history, start_epoch=n_done)
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

    @torch.no_grad()
    def _batched(self, fn, data) -> torch.Tensor:
        """Apply ``fn`` batch by batch in eval mode; results on the CPU.

        ``data`` is a tensor, or an array of user samples converted one batch
        at a time, so memory holds one batch, not a float32 copy of all of X.
        """
        module = self.module_
        module.eval()
        device = self._module_device()
        # encoding reads, decoding writes full samples: budget by the larger
        per_sample = max(math.prod(data.shape[1:]), self.n_features_in_, 1)
        batch_size = max(1, min(_INFERENCE_BATCH, _INFERENCE_VOXELS // per_sample))
        outputs = []
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size]
            if isinstance(batch, np.ndarray):
                batch = self._to_tensor(batch)
            with autocast(device, self.precision):
                out = fn(batch.to(device))
            outputs.append(out.float().cpu())
        return torch.cat(outputs)

    def transform(self, X):
        """Posterior means of the latent codes of ``X``.

        Parameters
        ----------
        X : array-like
            Data shaped as at ``fit``.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_components)
            Posterior means, in the dtype of ``X`` (float32 or float64).
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        mu = self._batched(lambda b: self.module_.encode(b)[0], X)
        return mu.numpy().astype(X.dtype, copy=False)

    def _check_Z(self, Z) -> np.ndarray:
        Z = check_array(Z, dtype=_DTYPES, input_name="Z", estimator=self)
        if Z.shape[1] != self.module_.n_components:
            raise ValueError(
                f"Z has {Z.shape[1]} columns, but {type(self).__name__} has "
                f"n_components={self.module_.n_components}."
            )
        return Z

    def inverse_transform(self, X):
        """Decode latent codes: the mean of p(x | z) for each row of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_components)
            Latent codes, e.g. the output of :meth:`transform`.

        Returns
        -------
        X_original : ndarray
            Decoded samples shaped as the training data, in the dtype of ``X``.
        """
        check_is_fitted(self)
        Z = self._check_Z(X)
        values = self._batched(
            self.module_.decode, torch.tensor(Z, dtype=torch.float32)
        )
        return self._to_output(values, Z.dtype)

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
        X : ndarray of shape (n_samples, ...)
            Samples shaped as the training data, in the training dtype.
        """
        check_is_fitted(self)
        check_value(self, "n_samples", n_samples, Interval(int, 1))
        check_value(
            self, "random_state", random_state, self._parameter_rules["random_state"]
        )
        generator = torch.Generator().manual_seed(self._draw_seed(random_state))
        z = torch.randn(int(n_samples), self.module_.n_components, generator=generator)
        return self._to_output(self._batched(self.module_.decode, z), self._fit_dtype)

    def score_samples(self, X) -> np.ndarray:
        """Evidence lower bound (ELBO) of each sample, in nats.

        The expectation over the posterior is estimated with one draw of the
        reparameterisation noise, the same fixed draw for every sample (drawn
        at initialisation under ``random_state`` and saved with the weights),
        so scores are deterministic and do not depend on which other samples
        are scored with them.

        Parameters
        ----------
        X : array-like
            Data shaped as at ``fit``.

        Returns
        -------
        elbo : ndarray of shape (n_samples,)
            Per-sample ELBO; higher is better.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        return self._batched(self.module_.elbo, X).numpy().astype(np.float64)

    def score(self, X, y=None) -> float:
        """Mean ELBO per sample (higher is better, as scikit-learn expects).

        Parameters
        ----------
        X : array-like
            Data shaped as at ``fit``.
        y : None
            Ignored.

        Returns
        -------
        score : float
        """
        return float(np.mean(self.score_samples(X)))

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

        Parameters
        ----------
        path : str or path-like
            Destination file (conventionally ``*.nvae``).
        """
        from neurovae.persistence import save

        save(self, path)

    # ------------------------------------------------------------------
    # tags
    # ------------------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.allow_nan = False
        return tags
