"""RecurrentVAE: latent dynamics of fMRI runs with a closed-form transition.

The estimator face of :class:`~neurovae.nn.RecurrentVAEModule`. The model
and the derivation of its closed-form transition step are in the docstring
of :mod:`neurovae.nn.recurrent`; in short, with ``X`` the stacked inputs of
the transition term (the sampled previous states ``h~_{t-1}`` for
``temporal_loss="kl"``, the previous posterior means for "mse") and ``Y`` the
posterior means ``m_t`` of the next states, over the M transitions of an
epoch, F is set after every epoch to the solution of
``(X^T X + c I) F^T = X^T Y`` with ``c = 2 M sigma_h^2 ridge_alpha``: the
exact minimiser of the averaged temporal loss plus ``ridge_alpha ||F||^2``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.utils.validation import check_array, check_is_fitted

from neurovae._validation import Interval, Options, check_value
from neurovae.base import _INFERENCE_VOXELS, BaseVAE
from neurovae.io import DataStatistics, check_runs, is_niimg_like, to_img
from neurovae.nn import RecurrentVAEModule, make_likelihood
from neurovae.training import ClosedFormHook, Hook, autocast
from neurovae.vae import _COMMON_ATTRIBUTES, _COMMON_PARAMETERS

_DTYPES = (np.float64, np.float32)
_AUTO_RUNS = 32  # batch_size="auto": at most 32 runs ...
_AUTO_VALUES = 2**21  # ... and at most ~2M values per batch
_OFFSET_LEARNING_RATE = 0.05  # Adam step of the "table" offsets of new runs


class _Runs:
    """Checked sequences: each run an array ``(T, *frame_shape)`` in memory or
    an :class:`~neurovae.io.ImageCollection` read when asked for."""

    def __init__(self, runs, dtype, names, mask=None) -> None:
        self._runs = list(runs)
        self.dtype = np.dtype(dtype)
        self._names = names
        self.mask = mask
        self.lengths = np.array([len(r) for r in self._runs], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._runs)

    def where(self, i: int) -> str:
        return self._names[i]

    def run(self, i: int) -> np.ndarray:
        """Run ``i`` in the user's dtype, checked for NaN and inf (inside the
        mask)."""
        run = self._runs[i]
        values = run if isinstance(run, np.ndarray) else run.load(dtype=self.dtype)
        inside = values
        if self.mask is not None:
            inside = values[..., np.broadcast_to(self.mask, values.shape[-3:])]
        if not np.isfinite(inside).all():
            raise ValueError(f"{self.where(i)} contains NaN or infinite values.")
        return values


class RecurrentVAE(BaseVAE):
    __doc__ = f"""Recurrent VAE: latent dynamics of fMRI runs, with a linear
    transition solved in closed form.

    The model of the RecVAE study, a recurrent VAE for resting-state fMRI in
    the family of Kim et al. (2021). Each volume ``x_t`` of a run is encoded
    (by the same conv / MLP backbones as the other estimators, every frame of
    a batch at once) together with the previous latent state into a
    posterior over the state ``h_t``: ``q(h_t | x_t, h_(t-1)) = N(m_t, s_t^2)``
    with ``[m_t, log s_t^2] = W_o silu(W_x e(x_t) + W_h h_(t-1) + b)`` (hidden
    width ``max(64, 4 * n_components)``; ``h_0 = 0`` enters the first step).
    The decoder maps ``h_t + z_s`` to the volume, ``z_s`` a per-subject
    offset. States follow the linear-Gaussian prior ``h_1 ~ N(0, I)``,
    ``h_t ~ N(h_(t-1) F^T, sigma_h^2 I)``.

    F is not learned by gradient descent: after every epoch it is solved in
    closed form by ridge regression on the latent trajectories of that
    epoch's training steps (alternating optimisation), ``(X^T X + c I) F^T =
    X^T Y`` with ``c = 2 M sigma_h^2 ridge_alpha`` and M the number of
    transitions (summed over runs of any lengths). ``X`` stacks the sampled
    previous states ``h~_(t-1)`` (so that, on average, the posterior
    variances of the previous states are added to ``X^T X``), ``Y`` the
    posterior means ``m_t``; this F is the exact minimiser of the temporal
    loss the gradient steps see, averaged over transitions, plus
    ``ridge_alpha * ||F||^2`` (see :mod:`neurovae.nn.recurrent`). F starts at
    zero (stable); its spectral radius is logged in ``history_`` every epoch.

    Parameters
    ----------
    n_components : int, default=10
        Dimension of the latent state ``h_t`` (and of the offset ``z_s``).
    ridge_alpha : float, default=0.1
        Ridge penalty ``rho`` of the closed-form transition step, on
        ``||F||^2``, relative to the temporal loss averaged over transitions.
    sigma_h : float, default=0.5
        Standard deviation of the transition noise of the prior.
    sigma_x : float or None, default=None
        Fixed scale of the "gaussian" or "laplace" observation model, in
        scaled units (with the default ``scaling``, standard deviations of
        the data), as in the reference study; None learns it, as the other
        estimators do.
    temporal_loss : {{"kl", "mse"}}, default="kl"
        "kl": the proper ELBO term, ``KL(q(h_t) || N(h~_(t-1) F^T,
        sigma_h^2 I))`` summed over transitions. "mse": the reference
        study's squared-error proxy, every ``q(h_t)`` pulled to N(0, I) by
        its own KL plus ``||m_t - m_(t-1) F^T||^2 / (2 sigma_h^2)`` on the
        posterior means (then ``X`` holds the previous means), for
        comparison.
    subject_effects : {{"amortized", "table"}} or None, default="amortized"
        The per-subject offset ``z_s`` (one per run). "amortized": inferred
        from the run by an encoder of the time-averaged frame features, with
        prior N(0, I) and its KL in the loss, so :meth:`transform` works on
        new subjects directly. "table": one learned vector per training run
        (row ``i`` for ``X[i]``) with the L1 penalty ``subject_l1 *
        ||z_s||_1`` (the reference design), available as
        ``subject_effects_``; for any other data (the rule is: always, in
        every method that needs offsets, also when the training runs are
        passed again) ``z_s`` is fitted by ``subject_max_iter`` Adam steps
        on the reconstruction loss plus the L1 penalty, with the posterior
        means of the states and every weight frozen, starting from zero.
        None: no offset.
    subject_l1 : float, default=1.0
        Weight of the L1 penalty of "table" offsets (per run, against a
        reconstruction loss summed over the run's voxels and time points).
    subject_max_iter : int, default=50
        Adam steps (learning rate 0.05) fitting the "table" offsets of runs
        at inference.
{_COMMON_PARAMETERS}
        For this model a "sample" of ``batch_size`` is a run: batches hold
        whole runs (padded to the longest of the batch, padding masked out);
        "auto" takes at most 32 runs and about 2M values per batch. Runs,
        also from files, are held in memory for training.

    Attributes
    ----------
    module_ : neurovae.nn.RecurrentVAEModule
        The trained torch module.
    transition_ : ndarray of shape (n_components, n_components)
        The fitted transition F (``h_t = h_(t-1) F^T`` + noise).
    subject_effects_ : ndarray of shape (n_training_runs, n_components)
        The learned offsets of the training runs (only with
        ``subject_effects="table"``).
    history_ : dict of str to list
        Per-epoch ``loss`` (negative ELBO per run), ``recon`` (negative
        log-likelihood per run), ``kl`` (the temporal term per run),
        ``subject`` (KL or L1 term of the offsets), ``spectral_radius``
        (largest eigenvalue modulus of F after the epoch's closed-form
        step), ``n_skipped``, ``time`` and, with early stopping, the
        validation terms prefixed ``val_``.
    n_sequences_ : int
        Number of training runs.
    n_timepoints_ : int
        Length of the longest training run (the default length of
        :meth:`sample`).{_COMMON_ATTRIBUTES}
        For this model these describe one frame (volume) of a run.

    See Also
    --------
    VAE : Frames as independent samples, without dynamics.

    Notes
    -----
    Input: a list of 4-D images or paths (one run per subject, time along the
    4th axis, runs may differ in length), arrays of shape ``(n_sequences,
    n_timepoints, n_features)``, ``(n_sequences, n_timepoints, x, y, z)`` or
    ``(n_sequences, n_timepoints, channels, x, y, z)``, or a list of arrays
    ``(n_timepoints_i, ...)`` of unequal lengths. Fitting needs at least two
    runs of at least two time points each; inference takes runs of any
    length >= 1.

    Outputs: methods returning one item per run of its own length
    (:meth:`transform_sequence`, :meth:`reconstruct`) return lists; those of
    a fixed length (:meth:`forecast`, :meth:`sample`) an array ``(n, T,
    ...)``. When fitted on images, volumes come back as 4-D images on the
    training grid (time along the 4th axis), one per run.

    References
    ----------
    .. [1] J.-H. Kim, Y. Zhang, K. Han, Z. Wen, M. Choi and Z. Liu,
       "Representation learning of resting state fMRI with variational
       autoencoder", NeuroImage 241, 2021.

    Examples
    --------
    >>> from neurovae import RecurrentVAE
    >>> from neurovae.datasets import make_fmri_cohort
    >>> runs, y, info = make_fmri_cohort(4, 4, 12, shape=(8, 8, 8),
    ...                                  return_img=False, random_state=0)
    >>> runs.shape  # (n_sequences, n_timepoints, x, y, z)
    (8, 12, 8, 8, 8)
    >>> model = RecurrentVAE(n_components=3, channels=(4, 8), max_iter=2,
    ...                      random_state=0).fit(runs)
    >>> model.transform(runs).shape  # mean, std and offset per component
    (8, 9)
    >>> model.transform_sequence(runs)[0].shape
    (12, 3)
    >>> model.forecast(runs, n_steps=5).shape
    (8, 5, 8, 8, 8)
    >>> model.sample(2, n_timepoints=4, random_state=0).shape
    (2, 4, 8, 8, 8)
    >>> model.transition_.shape, len(model.history_["spectral_radius"])
    ((3, 3), 2)
    """

    _structure_params = (
        *BaseVAE._structure_params,
        "subject_effects",
        "temporal_loss",
        "sigma_h",
        "sigma_x",
        "ridge_alpha",
        "subject_l1",
    )
    _parameter_rules = {
        **{k: v for k, v in BaseVAE._parameter_rules.items() if k != "beta"},
        "ridge_alpha": Interval(float, 0.0),
        "sigma_h": Interval(float, 0.0, low_open=True),
        "sigma_x": Interval(float, 0.0, low_open=True, none_ok=True),
        "temporal_loss": Options(("kl", "mse")),
        "subject_effects": Options(("amortized", "table", None)),
        "subject_l1": Interval(float, 0.0),
        "subject_max_iter": Interval(int, 1),
    }

    def __init__(
        self,
        n_components=10,
        *,
        ridge_alpha=0.1,
        sigma_h=0.5,
        sigma_x=None,
        temporal_loss="kl",
        subject_effects="amortized",
        subject_l1=1.0,
        subject_max_iter=50,
        backbone="auto",
        hidden_layer_sizes=(256, 128),
        channels=(16, 32, 64),
        likelihood="gaussian",
        likelihood_scale="global",
        optimizer="adam",
        learning_rate_init=1e-3,
        weight_decay=0.0,
        max_grad_norm=None,
        batch_size="auto",
        max_iter=300,
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
        checkpoint_dir=None,
        distributed="auto",
    ):
        self.n_components = n_components
        self.ridge_alpha = ridge_alpha
        self.sigma_h = sigma_h
        self.sigma_x = sigma_x
        self.temporal_loss = temporal_loss
        self.subject_effects = subject_effects
        self.subject_l1 = subject_l1
        self.subject_max_iter = subject_max_iter
        self.backbone = backbone
        self.hidden_layer_sizes = hidden_layer_sizes
        self.channels = channels
        self.likelihood = likelihood
        self.likelihood_scale = likelihood_scale
        self.optimizer = optimizer
        self.learning_rate_init = learning_rate_init
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
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
        self.checkpoint_dir = checkpoint_dir
        self.distributed = distributed

    # ------------------------------------------------------------------
    # the model
    # ------------------------------------------------------------------
    def _build_module(self, sample_shape, stats) -> RecurrentVAEModule:
        k = self.n_components
        encoder, decoder, n_features = self._encoder_decoder(sample_shape, k)
        return RecurrentVAEModule(
            encoder,
            decoder,
            n_features,
            k,
            self._likelihood(sample_shape, stats),
            subject_effects=self.subject_effects,
            n_subjects=self.n_sequences_ if self.subject_effects == "table" else 0,
            temporal_loss=self.temporal_loss,
            sigma_h=self.sigma_h,
            ridge_alpha=self.ridge_alpha,
            subject_l1=self.subject_l1,
            n_hidden=max(64, 4 * k),
        )

    def _likelihood(self, sample_shape, stats):
        if self.sigma_x is None:
            return super()._likelihood(sample_shape, stats)
        sigma = float(self.sigma_x)
        likelihood = make_likelihood(
            self.likelihood,
            sample_shape,
            scale="global",
            init_scale=sigma,
            min_scale=min(1e-3, sigma / 2),
            mask=self._likelihood_mask(),
        )
        likelihood.raw_scale.requires_grad_(False)  # fixed: not trained
        return likelihood

    def _hooks(self) -> list[Hook]:
        return [ClosedFormHook()]

    @property
    def transition_(self) -> np.ndarray:
        """The fitted transition F, shape (n_components, n_components)."""
        check_is_fitted(self)
        return self.module_.transition.detach().cpu().double().numpy().copy()

    @property
    def subject_effects_(self) -> np.ndarray:
        """The learned offsets of the training runs ("table" only)."""
        check_is_fitted(self)
        table = self.module_.subject_table
        if table is None:
            raise AttributeError(
                "subject_effects_ exists only with subject_effects='table'."
            )
        return table.detach().cpu().double().numpy().copy()

    # ------------------------------------------------------------------
    # input checking
    # ------------------------------------------------------------------
    def _check_X(self, X, *, reset: bool) -> _Runs:
        """Validate sequences ``X``; when ``reset``, record the frame shape
        (``input_shape_``), ``n_sequences_`` and ``n_timepoints_``."""
        name = type(self).__name__
        affine = None
        if is_niimg_like(X):
            grid = {}
            if not reset:
                if len(self.input_shape_) != 3:
                    raise ValueError(
                        f"{name} was fitted on frames of shape "
                        f"{self.input_shape_}; images hold single-channel 3-D "
                        "volumes and cannot be passed to it."
                    )
                grid = {
                    "shape": self.input_shape_,
                    "affine": getattr(self, "affine_", None),
                }
            collections = check_runs(X, **grid)
            runs = [c.load() if c.in_memory else c for c in collections]
            names = [c.where(0).split(", volume")[0] for c in collections]
            frame_shape, affine = collections[0].shape, collections[0].affine
            dtype = np.float32
        else:
            runs, frame_shape, dtype = self._check_arrays(X)
            names = [f"X[{i}]" for i in range(len(runs))]
        if 0 in frame_shape:
            raise ValueError(
                f"{name}: X has frames of shape {tuple(frame_shape)}, with an "
                "empty axis."
            )
        if len(frame_shape) not in (1, 3, 4):
            raise ValueError(
                f"{name}: frames must be feature vectors (n_features,), volumes "
                "(x, y, z) or (channels, x, y, z); X has frames of shape "
                f"{tuple(frame_shape)}."
            )
        min_runs, min_length = (2, 2) if reset else (1, 1)
        if len(runs) < min_runs:
            raise ValueError(
                f"{name}.fit needs at least {min_runs} runs; X holds {len(runs)}."
            )
        for i, run in enumerate(runs):
            if len(run) < min_length:
                what = "to fit" if reset else ""
                raise ValueError(
                    f"{name}: {names[i]} has {len(run)} time point(s); runs need "
                    f"at least {min_length} {what}".rstrip()
                    + " (a transition needs two)."
                )
        if reset:
            self._set_volume_shape(frame_shape, affine)
            self.n_sequences_ = len(runs)
            self.n_timepoints_ = int(max(len(r) for r in runs))
        elif tuple(frame_shape) != tuple(self.input_shape_):
            raise ValueError(
                f"X has frames of shape {tuple(frame_shape)}, but {name} was "
                f"fitted on frames of shape {tuple(self.input_shape_)}."
            )
        return _Runs(runs, dtype, names, mask=getattr(self, "_mask", None))

    def _check_arrays(self, X):
        """Runs given as an array ``(n, T, ...)`` or a list of ``(T_i, ...)``."""
        name = type(self).__name__
        kwargs = dict(
            dtype=_DTYPES,
            ensure_2d=False,
            allow_nd=True,
            ensure_all_finite=False,  # checked per run, inside the mask
            ensure_min_samples=1,
        )
        if isinstance(X, (list, tuple)):
            if len(X) == 0:
                raise ValueError(f"{name}: X is an empty list; it must hold runs.")
            runs = []
            for i, item in enumerate(X):
                if np.ndim(item) < 2:
                    raise ValueError(
                        f"{name}: X[{i}] has shape {np.shape(item)}; a run is an "
                        "array (n_timepoints, n_features), (n_timepoints, x, y, "
                        "z) or (n_timepoints, channels, x, y, z)."
                    )
                runs.append(check_array(item, input_name=f"X[{i}]", **kwargs))
            shapes = [r.shape[1:] for r in runs]
            for i, shape in enumerate(shapes):
                if shape != shapes[0]:
                    raise ValueError(
                        f"{name}: X[{i}] has frames of shape {shape}, but X[0] "
                        f"has frames of shape {shapes[0]}; all runs must share "
                        "one frame shape (grid)."
                    )
            dtype = np.result_type(*(r.dtype for r in runs))
            return runs, shapes[0], dtype
        if hasattr(X, "toarray") or isinstance(X, (str, bytes)):
            raise TypeError(f"{name} takes dense arrays or images, not {type(X)}.")
        ndim = np.ndim(X)
        if ndim not in (3, 5, 6):
            raise ValueError(
                f"{name} takes sequences: a list of 4-D images (one run each), "
                "or an array (n_sequences, n_timepoints, n_features), "
                "(n_sequences, n_timepoints, x, y, z) or (n_sequences, "
                f"n_timepoints, channels, x, y, z); got a {ndim}-D array of "
                f"shape {np.shape(X)}."
                + (
                    " For one run (n_timepoints, n_features) pass X[None]."
                    if ndim == 2
                    else ""
                )
            )
        X = check_array(X, input_name="X", estimator=self, **kwargs)
        return list(X), X.shape[2:], X.dtype

    def _statistics(self, X: _Runs, context=None) -> DataStatistics:
        # the runs are in memory: every process reads all of them
        stats = DataStatistics()
        mask = getattr(self, "_mask", None)
        for i in range(len(X)):
            run = X.run(i)
            names = [f"{X.where(i)}, volume {t}" for t in range(len(run))]
            stats.update(run, mask=mask, where=names)
        return stats

    def _padded(self, X: _Runs, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs ``indices`` as the network sees them, padded with zeros to
        the longest: ``(n, T, *sample_shape)`` float32, and their lengths."""
        lengths = X.lengths[list(indices)]
        x = torch.zeros((len(indices), int(lengths.max()), *self._sample_shape))
        prep = self._preprocessing()
        for row, i in enumerate(indices):
            run = X.run(i)
            x[row, : len(run)] = self._to_tensor(run, prep)
        return x, torch.from_numpy(lengths)

    def _training_data(self, X: _Runs, y):
        if (
            self.subject_effects == "table"
            and hasattr(self, "module_")
            and len(X) != self.module_.subject_table.shape[0]
        ):
            raise ValueError(
                f"{type(self).__name__}: warm_start with subject_effects='table' "
                f"needs the same {self.module_.subject_table.shape[0]} training "
                f"runs (one table row each); X holds {len(X)}."
            )
        x, lengths = self._padded(X, range(len(X)))
        return (x, lengths, torch.arange(len(X)))

    def _open_checkpoint(self, X, data, device, warm, writer=True):
        # the fingerprint of the (padded, scaled) runs stands for the data
        x = data[0].numpy()
        return super()._open_checkpoint(x, data, device, warm, writer)

    def _resolved_batch_size(self, n_samples: int, n_groups: int = 1) -> int:
        batch_size = self.batch_size
        if batch_size != "auto":
            return min(int(batch_size), n_samples)
        per_run = self.n_features_in_ * self.n_timepoints_
        return max(1, min(_AUTO_RUNS, n_samples, _AUTO_VALUES // per_run))

    def fit(self, X, y=None):
        """Fit the model to runs ``X``.

        Parameters
        ----------
        X : list of Niimg-like, array-like or list of array-like
            Training runs (at least two, each of at least two time points):
            a list of 4-D images or paths (time along the 4th axis), an
            array ``(n_sequences, n_timepoints, n_features)``,
            ``(n_sequences, n_timepoints, x, y, z)`` or ``(n_sequences,
            n_timepoints, channels, x, y, z)``, or a list of arrays
            ``(n_timepoints_i, ...)`` of different lengths.
        y : None
            Ignored; present for API consistency.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        return super().fit(X, y)

    # ------------------------------------------------------------------
    # inference
    # ------------------------------------------------------------------
    def _inference_batches(self, X: _Runs):
        """Consecutive runs of ``X`` in batches of about 4M values."""
        per_frame = max(self.n_features_in_, 1)
        indices, size = [], 0
        for i, length in enumerate(X.lengths):
            cost = int(length) * per_frame
            if indices and size + cost > _INFERENCE_VOXELS:
                yield indices
                indices, size = [], 0
            indices.append(i)
            size += cost
        if indices:
            yield indices

    def _fit_offsets(self, x, lengths, mu) -> torch.Tensor:
        """Offsets of new runs for a "table" model: ``subject_max_iter`` Adam
        steps on reconstruction loss + L1 with the weights frozen."""
        module = self.module_
        valid = module.valid_mask(lengths, x.shape[1])
        z = torch.zeros(len(x), module.n_components, device=x.device)
        z.requires_grad_(True)
        optimizer = torch.optim.Adam([z], lr=_OFFSET_LEARNING_RATE)
        frames = x.flatten(0, 1)
        with torch.enable_grad():
            for _ in range(self.subject_max_iter):
                out = module.decoder((mu + z[:, None]).flatten(0, 1))
                nll = -module.likelihood.log_prob(frames, out).reshape(valid.shape)
                objective = (nll * valid).sum() + module.subject_l1 * z.abs().sum()
                (z.grad,) = torch.autograd.grad(objective, z)
                optimizer.step()
        return z.detach()

    @torch.no_grad()
    def _infer(self, X: _Runs, *, score: bool = False):
        """Per batch of runs: indices, padded input, lengths, the filtered
        posterior means ``(n, T, K)``, the offsets ``(n, K)`` and, with
        ``score``, the per-run ELBO."""
        module = self.module_
        module.eval()
        device = self._module_device()
        for indices in self._inference_batches(X):
            x, lengths = self._padded(X, indices)
            x, lengths = x.to(device), lengths.to(device)
            with autocast(device, self.precision):
                features = module.encode_frames(x)
                mu = module.encode_states(features)[0].float()
                if module.subject_effects == "amortized":
                    z = module.subject_posterior(features, lengths)[0].float()
                elif module.subject_effects == "table":
                    z = self._fit_offsets(x, lengths, mu)
                else:
                    z = torch.zeros_like(mu[:, 0])
                elbo = None
                if score:
                    offsets = z if module.subject_effects == "table" else None
                    elbo = module.elbo(x, lengths, offsets=offsets).float()
            yield indices, x, lengths, mu, z, elbo

    def _as_runs(self, values: list[torch.Tensor], dtype) -> list:
        """Decoded runs ``(T_i, *sample_shape)`` to arrays or 4-D images."""
        return self._as_runs_raw(
            [self._to_raw(run.float().cpu(), dtype) for run in values]
        )

    def _as_runs_raw(self, runs: list[np.ndarray]) -> list:
        """Runs in raw intensities as they are, or as 4-D images on the
        training grid when fitted on images."""
        affine = getattr(self, "affine_", None)
        return runs if affine is None else [to_img(run, affine) for run in runs]

    def _stacked(self, values: torch.Tensor, dtype):
        """Decoded runs of one length ``(n, T, *sample_shape)`` to an array,
        or a list of 4-D images when fitted on images."""
        if getattr(self, "affine_", None) is not None:
            return self._as_runs(list(values), dtype)
        n, t = values.shape[:2]
        raw = self._to_raw(values.flatten(0, 1).float().cpu(), dtype)
        return raw.reshape(n, t, *self.input_shape_)

    @property
    def _n_features_out(self) -> int:
        n_blocks = 2 if self.subject_effects is None else 3
        return n_blocks * self.module_.n_components

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """Names of the columns of :meth:`transform`.

        ``recurrentvae_mean0, ...`` (time average of each state component),
        ``recurrentvae_std0, ...`` (its standard deviation over time) and,
        with subject effects, ``recurrentvae_offset0, ...`` (``z_s``).

        Parameters
        ----------
        input_features : None
            Ignored (the names depend on the fitted model only).

        Returns
        -------
        feature_names_out : ndarray of str
        """
        check_is_fitted(self)
        prefix = type(self).__name__.lower()
        blocks = ["mean", "std"] + ([] if self.subject_effects is None else ["offset"])
        k = self.module_.n_components
        names = [f"{prefix}_{b}{c}" for b in blocks for c in range(k)]
        return np.asarray(names, dtype=object)

    def transform_sequence(self, X) -> list[np.ndarray]:
        """The latent trajectory of each run: filtered posterior means.

        The means ``m_t`` of ``q(h_t | x_t, h_(t-1))`` with the previous mean
        fed to each step (deterministic).

        Parameters
        ----------
        X : list of Niimg-like, array-like or list of array-like
            Runs, as at ``fit`` (any lengths >= 1).

        Returns
        -------
        trajectories : list of ndarray of shape (n_timepoints_i, n_components)
            One per run, in the dtype of ``X`` (float32 for images).

        Examples
        --------
        >>> import numpy as np
        >>> from neurovae import RecurrentVAE
        >>> X = np.random.default_rng(0).normal(size=(6, 10, 5))
        >>> model = RecurrentVAE(n_components=2, max_iter=2, random_state=0).fit(X)
        >>> [t.shape for t in model.transform_sequence([X[0], X[1, :4]])]
        [(10, 2), (4, 2)]
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        out = [None] * len(X)
        module = self.module_
        module.eval()
        device = self._module_device()
        with torch.no_grad():
            for indices in self._inference_batches(X):
                x, lengths = self._padded(X, indices)
                with autocast(device, self.precision):
                    features = module.encode_frames(x.to(device))
                    mu = module.encode_states(features)[0].float().cpu()
                for row, i in enumerate(indices):
                    out[i] = mu[row, : int(lengths[row])].numpy().astype(X.dtype)
        return out

    def transform(self, X) -> np.ndarray:
        """One row per run: a summary of its latent dynamics.

        The columns (see :meth:`get_feature_names_out`) are the time average
        of the trajectory (:meth:`transform_sequence`), its standard
        deviation over time (population, per component), and the subject
        offset ``z_s`` (amortized: the posterior mean; "table": fitted by
        the inner optimisation, see ``subject_effects``; absent for None).
        A 2-D array, so that a pipeline can classify subjects.

        Parameters
        ----------
        X : list of Niimg-like, array-like or list of array-like
            Runs, as at ``fit``.

        Returns
        -------
        Z : ndarray of shape (n_sequences, n_features_out)
            In the dtype of ``X`` (float32 for images).
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        rows = np.empty((len(X), self._n_features_out), dtype=np.float64)
        for indices, _, lengths, mu, z, _ in self._infer(X):
            valid = self.module_.valid_mask(lengths, mu.shape[1])[..., None]
            count = valid.sum(1)
            mean = (mu * valid).sum(1) / count
            std = (((mu - mean[:, None]) * valid).pow(2).sum(1) / count).sqrt()
            blocks = [mean, std] + ([] if self.subject_effects is None else [z])
            rows[indices] = torch.cat(blocks, dim=1).double().cpu().numpy()
        return rows.astype(X.dtype, copy=False)

    def _codes(self, Z: torch.Tensor) -> torch.Tensor:
        """Decoder codes ``mean + offset`` from rows of :meth:`transform`."""
        k = self.module_.n_components
        codes = Z[:, :k]
        if self.subject_effects is not None:
            codes = codes + Z[:, 2 * k :]
        return codes

    def inverse_transform(self, X):
        """Decode rows of :meth:`transform`, or latent trajectories.

        Parameters
        ----------
        X : array-like of shape (n_sequences, n_features_out), or list of \
array-like of shape (n_timepoints_i, n_components)
            Rows of :meth:`transform`: each is decoded at its mean state
            plus offset (``std`` columns are not used), giving one volume per
            run, the subject's typical frame. Or trajectories (a list of 2-D
            arrays, or a 3-D array ``(n_sequences, n_timepoints,
            n_components)``): every row is a decoder input ``h_t + z_s``
            (add the offset to a :meth:`transform_sequence` output for a
            subject's own reconstruction) and each is decoded to a run.

        Returns
        -------
        X_original : ndarray, Nifti1Image or list
            For rows: an array ``(n_sequences, *frame_shape)``, or one 4-D
            image when fitted on images. For trajectories: a list of runs,
            arrays ``(n_timepoints_i, *frame_shape)`` or 4-D images. Raw
            intensities, in the dtype of ``X``.
        """
        check_is_fitted(self)
        module = self.module_
        k = module.n_components
        device = self._module_device()
        if isinstance(X, (list, tuple)) and X and np.ndim(X[0]) == 2:
            out = []
            dtype = None
            for i, item in enumerate(X):
                codes = check_array(item, dtype=_DTYPES, input_name=f"X[{i}]")
                if codes.shape[1] != k:
                    raise ValueError(
                        f"X[{i}] has {codes.shape[1]} columns; trajectories have "
                        f"n_components={k}."
                    )
                dtype = codes.dtype if dtype is None else dtype
                with torch.no_grad():
                    tensor = torch.tensor(codes, dtype=torch.float32, device=device)
                    out.append(module.eval().decode(tensor))
            return self._as_runs(out, dtype)
        if np.ndim(X) == 3:
            codes = check_array(X, dtype=_DTYPES, allow_nd=True, input_name="X")
            return self.inverse_transform(list(codes))
        Z = self._check_Z(X)
        codes = self._codes(torch.tensor(Z, dtype=torch.float32))
        return self._to_output(self._batched(module.decode, codes), Z.dtype)

    def _reconstructions(self, X: _Runs) -> list[torch.Tensor]:
        """Decoded ``m_t + z_s`` of each checked run, as the network outputs."""
        out = [None] * len(X)
        for indices, _, lengths, mu, z, _ in self._infer(X):
            with torch.no_grad():
                decoded = self.module_.decode(mu + z[:, None]).float().cpu()
            for row, i in enumerate(indices):
                out[i] = decoded[row, : int(lengths[row])]
        return out

    def reconstruct(self, X) -> list:
        """Reconstructions of each run: the decoded ``m_t + z_s``.

        Parameters
        ----------
        X : list of Niimg-like, array-like or list of array-like
            Runs, as at ``fit``.

        Returns
        -------
        X_reconstructed : list
            One per run, in raw intensities (zero outside the mask): arrays
            ``(n_timepoints_i, *frame_shape)``, or 4-D images when fitted on
            images.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        return self._as_runs(self._reconstructions(X), X.dtype)

    def reconstruction_error(self, X) -> list:
        """Voxel-wise squared reconstruction error of each run.

        Parameters
        ----------
        X : list of Niimg-like, array-like or list of array-like
            Runs, as at ``fit``.

        Returns
        -------
        errors : list
            ``(x - reconstruct(x)) ** 2`` in raw intensities, zero outside
            the mask, shaped as :meth:`reconstruct`'s output.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        errors = []
        for i, values in enumerate(self._reconstructions(X)):
            recon = self._to_raw(values, X.dtype)
            error = (X.run(i).astype(X.dtype).reshape(recon.shape) - recon) ** 2
            if getattr(self, "_mask", None) is not None:
                error[..., ~self._mask] = 0
            errors.append(error)
        return self._as_runs_raw(errors)

    def forecast(self, X, n_steps: int = 1):
        """Roll the fitted dynamics forward from the end of each run.

        From the last filtered state ``m_T`` of each run, the predicted
        states are ``m_T F^T, m_T (F^T)^2, ...`` (the means of the
        transition prior), decoded with the run's offset ``z_s``: the decoded
        prediction of the next ``n_steps`` volumes.

        Parameters
        ----------
        X : list of Niimg-like, array-like or list of array-like
            Runs, as at ``fit`` (any lengths >= 1).
        n_steps : int, default=1
            Number of time points to forecast.

        Returns
        -------
        X_forecast : ndarray of shape (n_sequences, n_steps, ...) \
or list of Nifti1Image
            Raw intensities in the dtype of ``X`` (``...``: the shape of one
            frame); one 4-D image per run
            (time along the 4th axis) when fitted on images.

        Examples
        --------
        >>> import numpy as np
        >>> from neurovae import RecurrentVAE
        >>> X = np.random.default_rng(0).normal(size=(6, 10, 5))
        >>> model = RecurrentVAE(n_components=2, max_iter=2, random_state=0).fit(X)
        >>> model.forecast(X[:2], n_steps=3).shape
        (2, 3, 5)
        """
        check_is_fitted(self)
        check_value(self, "n_steps", n_steps, Interval(int, 1))
        X = self._check_X(X, reset=False)
        out = [None] * len(X)
        for indices, _, lengths, mu, z, _ in self._infer(X):
            last = mu[torch.arange(len(indices)), lengths.long() - 1]
            with torch.no_grad():
                states = self.module_.rollout(last, int(n_steps))
                decoded = self.module_.decode(states + z[:, None])
            for row, i in enumerate(indices):
                out[i] = decoded[row].float().cpu()
        return self._stacked(torch.stack(out), X.dtype)

    def sample(self, n_samples: int = 1, n_timepoints=None, random_state=None):
        """Generate whole synthetic runs from the prior.

        ``h_1 ~ N(0, I)`` (the prior of the first state), ``h_t = h_(t-1) F^T
        + sigma_h * noise``; the offset ``z_s`` is drawn from N(0, I) for
        "amortized" subject effects (its prior), as a row of the fitted table
        chosen uniformly at random for "table" (the empirical distribution of
        the training subjects), and is zero for None. Frames are the decoder
        means (no observation noise).

        Parameters
        ----------
        n_samples : int, default=1
            Number of runs.
        n_timepoints : int or None, default=None
            Length of each run; None is ``n_timepoints_``, the longest
            training run.
        random_state : int, RandomState instance or None, default=None
            Seed of the draws; None draws fresh ones.

        Returns
        -------
        X : ndarray of shape (n_samples, n_timepoints, ...) or \
list of Nifti1Image
            Raw intensities in the training dtype (``...``: the shape of one
            frame); one 4-D image per run
            when fitted on images.
        """
        check_is_fitted(self)
        check_value(self, "n_samples", n_samples, Interval(int, 1))
        check_value(self, "n_timepoints", n_timepoints, Interval(int, 1, none_ok=True))
        check_value(
            self, "random_state", random_state, self._parameter_rules["random_state"]
        )
        n, t_max = int(n_samples), int(n_timepoints or self.n_timepoints_)
        module = self.module_.eval()
        k = module.n_components
        generator = torch.Generator().manual_seed(self._draw_seed(random_state))
        transition = module.transition.detach().cpu().float()
        h = torch.randn(n, k, generator=generator)
        states = [h]
        for _ in range(t_max - 1):
            noise = torch.randn(n, k, generator=generator)
            h = h @ transition.T + module.sigma_h * noise
            states.append(h)
        states = torch.stack(states, dim=1)
        if module.subject_effects == "amortized":
            z = torch.randn(n, k, generator=generator)
        elif module.subject_effects == "table":
            table = module.subject_table.detach().cpu().float()
            z = table[torch.randint(len(table), (n,), generator=generator)]
        else:
            z = torch.zeros(n, k)
        codes = (states + z[:, None]).flatten(0, 1)
        decoded = self._batched(module.decode, codes)
        decoded = decoded.reshape(n, t_max, *decoded.shape[1:])
        return self._stacked(decoded, self._fit_dtype)

    def score_samples(self, X) -> np.ndarray:
        """Evidence lower bound (ELBO) of each run, in nats (summed over time).

        One fixed draw of the noise per time step (the same for every run,
        saved with the weights), so scores are deterministic and do not
        depend on the other runs passed. The ELBO is of the raw intensities
        (the log-Jacobian of the scaling added, per frame). For "table"
        subject effects it is the ELBO given the fitted offset (the L1 term
        and no KL for ``z_s``), not a bound on the marginal likelihood.

        Parameters
        ----------
        X : list of Niimg-like, array-like or list of array-like
            Runs, as at ``fit``.

        Returns
        -------
        elbo : ndarray of shape (n_sequences,)
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        elbo = np.empty(len(X))
        for indices, *_, values in self._infer(X, score=True):
            elbo[indices] = values.double().cpu().numpy()
        log_jacobian = self._n_likelihood_features() * math.log(self.intensity_scale_)
        return elbo - X.lengths * log_jacobian

    def score(self, X, y=None) -> float:
        """Mean ELBO per run (see :meth:`score_samples`); higher is better.

        Parameters
        ----------
        X : list of Niimg-like, array-like or list of array-like
            Runs, as at ``fit``.
        y : None
            Ignored.

        Returns
        -------
        score : float
        """
        return float(np.mean(self.score_samples(X)))

    def bits_per_voxel(self, X) -> np.ndarray:
        """Negative ELBO of each run in bits per modelled value and time point.

        Parameters
        ----------
        X : list of Niimg-like, array-like or list of array-like
            Runs, as at ``fit``.

        Returns
        -------
        bpv : ndarray of shape (n_sequences,)
        """
        check_is_fitted(self)
        lengths = self._check_X(X, reset=False).lengths
        per_run = self._n_likelihood_features() * lengths * math.log(2)
        return -self.score_samples(X) / per_run

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags
