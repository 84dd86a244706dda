"""ContrastiveVAE: salient and shared latent spaces of a target group."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from sklearn.utils.validation import (
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
)

from neurovae._validation import Custom, Interval, Options, check_value
from neurovae.base import BaseVAE
from neurovae.nn import ContrastiveVAEModule, GaussianLatent, PairDiscriminator
from neurovae.training import Constant, DiscriminatorHook, Hook, Schedule
from neurovae.vae import _COMMON_ATTRIBUTES, _COMMON_PARAMETERS, BetaVAE

_SPACES = ("salient", "shared", "both")


def _is_label(value) -> bool:
    return isinstance(value, (numbers.Number, str, np.generic)) and value is not None


class ContrastiveVAE(BaseVAE):
    __doc__ = f"""Contrastive VAE: what is specific to a target group, apart from
    what it shares with a background group.

    The model of Abid & Zou (2019), used by Aglinskas et al. (2022) to
    separate autism-specific from shared neuroanatomical variation. A shared
    encoder maps every sample to a shared code ``z``; a salient encoder maps
    it to a salient code ``s``; one decoder maps ``[z, s]`` back. Target
    samples (e.g. patients) are decoded from both codes, background samples
    (e.g. controls) with ``s = 0``, so the salient space must hold what only
    the target group has (the disease) and the shared space what both groups
    have (age, head size, scanner).

    Training minimises, per sample, the negative log-likelihood plus ``beta``
    times the KL of the shared posterior (all samples) and the salient
    posterior (target samples), plus ``gamma`` times the total correlation
    between ``s`` and ``z`` on the target samples. The total correlation is
    estimated by a discriminator that tells true ``(s, z)`` pairs from pairs
    whose shared codes are permuted across the batch; the discriminator is
    trained with its own optimiser and loss on detached codes, so its loss
    never reaches the encoders. Every step draws ``batch_size`` target and
    ``batch_size`` background samples, so both groups are seen at the same
    rate whatever their sizes; an epoch is one pass over the larger group.

    Parameters
    ----------
    n_components : int, default=8
        Dimension of the shared latent space (``z``); the decoder takes
        ``n_components + n_salient_components`` values.
    n_salient_components : int, default=2
        Dimension of the salient latent space (``s``).
    background_label : int, float, str or bool, default=0
        The label of ``y`` that marks background samples; every other label
        is target (so ``y`` may hold several patient groups).
    transform_space : {{"salient", "shared", "both"}}, default="salient"
        What :meth:`transform` returns: the salient posterior means, the
        shared ones, or both (salient first). :meth:`inverse_transform` takes
        the same columns and decodes with the other space at zero, the prior
        mean.
{_COMMON_PARAMETERS}
        For this model the decoder of a user backbone maps codes of size
        ``n_components + n_salient_components`` (``[z, s]``); the encoder is
        copied twice, for the shared and the salient space. ``batch_size``
        counts samples *per group*: every step takes ``batch_size`` target
        and ``batch_size`` background samples ("auto": at most 200, and no
        more than the smaller group holds); a group with fewer training
        samples than an integer ``batch_size`` (or than 2) is an error.
    beta : float, default=1.0
        Weight of the KL terms (its final value under a schedule); with
        ``deterministic=True`` the weight of the L2 penalty.
    beta_schedule : {{"constant", "linear", "cyclical"}}, default="constant"
        "linear" ramps the weight from 0 to ``beta`` over ``warmup_iter``
        epochs; "cyclical" repeats ``n_cycles`` ramps over ``max_iter``
        epochs (cyclical KL annealing, Fu et al. 2019, as used by
        Aglinskas et al.).
    warmup_iter : int, default=10
        Epochs of the linear ramp of ``beta``.
    n_cycles : int, default=4
        Number of cycles of the "cyclical" schedule.
    gamma : float, default=1.0
        Weight of the total-correlation penalty; 0 turns the discriminator
        off. Larger values press harder for independent salient and shared
        codes, at some cost in reconstruction. The estimated total
        correlation is of the order of one nat per sample, while the
        reconstruction term grows with the number of features (thousands of
        nats for a brain image), so on images the penalty mostly breaks ties;
        very large values let the encoders fool the discriminator rather than
        separate the spaces.
    deterministic : bool, default=False
        Train a regularised autoencoder instead of a VAE: the codes are the
        posterior means (no sampling) and the KL terms are replaced by the
        L2 penalty ``0.5 * ||code||^2``. Scores are then the negative
        regularised objective, not a bound on the likelihood.

    Attributes
    ----------
    module_ : neurovae.nn.ContrastiveVAEModule
        The trained torch module.
    history_ : dict of str to list
        Per-epoch ``loss`` (the training objective), ``recon`` (negative
        log-likelihood), ``kl`` (KL of shared and salient posteriors; the L2
        penalty when deterministic), ``tc`` (estimated total correlation)
        and ``discriminator`` (the discriminator's loss; ``log(4) ~ 1.39``
        when it cannot tell true pairs from permuted ones) when ``gamma > 0``,
        the scheduled weights, ``n_skipped``, ``time`` and, with early
        stopping, the validation terms prefixed ``val_``.{_COMMON_ATTRIBUTES}

    See Also
    --------
    VAE : One latent space for all samples.
    sklearn.decomposition.PCA : The linear, non-contrastive baseline.

    References
    ----------
    .. [1] A. Abid and J. Zou, "Contrastive variational autoencoder enhances
       salient features", arXiv:1902.04601, 2019.
    .. [2] A. Aglinskas, J. K. Hartshorne and S. Anzellotti, "Contrastive
       machine learning reveals the structure of neuroanatomical variation
       within autism", Science 376(6597), 2022.

    Examples
    --------
    >>> from neurovae import ContrastiveVAE
    >>> from neurovae.datasets import make_contrastive
    >>> X, y, info = make_contrastive(100, 100, 20, random_state=0)
    >>> cvae = ContrastiveVAE(n_components=2, n_salient_components=2,
    ...                       max_iter=5, random_state=0).fit(X, y)
    >>> cvae.transform(X).shape  # salient means
    (200, 2)
    >>> cvae.set_params(transform_space="both").get_feature_names_out().tolist()
    ['contrastivevae_s0', 'contrastivevae_s1', 'contrastivevae_z0', \
'contrastivevae_z1']
    >>> twin, difference = cvae.background_twin(X[y == 1][:3])
    >>> twin.shape, difference.shape
    ((3, 20), (3, 20))
    """

    _group_target = 0  # training batches draw target and background equally
    _structure_params = (
        *BaseVAE._structure_params,
        "n_salient_components",
        "deterministic",
        "discriminator",
    )
    _parameter_rules = {
        **BaseVAE._parameter_rules,
        "n_salient_components": Interval(int, 1),
        "background_label": Custom(_is_label, "a number, a string or a bool"),
        "transform_space": Options(_SPACES),
        "beta_schedule": BetaVAE._parameter_rules["beta_schedule"],
        "warmup_iter": BetaVAE._parameter_rules["warmup_iter"],
        "n_cycles": BetaVAE._parameter_rules["n_cycles"],
        "gamma": Interval(float, 0.0),
        "deterministic": Options((True, False)),
    }

    def __init__(
        self,
        n_components=8,
        n_salient_components=2,
        *,
        background_label=0,
        transform_space="salient",
        backbone="auto",
        hidden_layer_sizes=(256, 128),
        channels=(16, 32, 64),
        likelihood="gaussian",
        likelihood_scale="global",
        beta=1.0,
        beta_schedule="constant",
        warmup_iter=10,
        n_cycles=4,
        gamma=1.0,
        deterministic=False,
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
        self.n_salient_components = n_salient_components
        self.background_label = background_label
        self.transform_space = transform_space
        self.backbone = backbone
        self.hidden_layer_sizes = hidden_layer_sizes
        self.channels = channels
        self.likelihood = likelihood
        self.likelihood_scale = likelihood_scale
        self.beta = beta
        self.beta_schedule = beta_schedule
        self.warmup_iter = warmup_iter
        self.n_cycles = n_cycles
        self.gamma = gamma
        self.deterministic = deterministic
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
    @property
    def discriminator(self) -> bool:
        """Whether the model has a total-correlation discriminator."""
        return self.gamma > 0

    def _build_module(self, sample_shape, stats) -> ContrastiveVAEModule:
        n_z, n_s = self.n_components, self.n_salient_components
        shared_encoder, decoder, n_features = self._encoder_decoder(
            sample_shape, n_z + n_s
        )
        salient_encoder, _, _ = self._encoder_decoder(sample_shape, n_z + n_s)
        return ContrastiveVAEModule(
            shared_encoder,
            salient_encoder,
            decoder,
            GaussianLatent(n_features, n_z),
            GaussianLatent(n_features, n_s),
            self._likelihood(sample_shape, stats),
            PairDiscriminator(n_s, n_z) if self.discriminator else None,
            deterministic=self.deterministic,
        )

    def _schedules(self) -> dict[str, Schedule]:
        return {"beta": self._beta_schedule(), "gamma": Constant(self.gamma)}

    def _hooks(self) -> list[Hook]:
        if not self.discriminator:
            return []
        return [DiscriminatorHook(self.optimizer, self.learning_rate_init)]

    # ------------------------------------------------------------------
    # groups
    # ------------------------------------------------------------------
    def _is_target(self, y, n_samples: int, *, fitting: bool) -> np.ndarray:
        """Bool array: which samples are target (label != background_label)."""
        name = type(self).__name__
        if y is None:
            raise ValueError(
                f"{name} requires y to be passed, but the target y is None. y "
                "labels each sample: samples labelled background_label="
                f"{self.background_label!r} form the background group, all others "
                "the target group."
            )
        y = column_or_1d(y, warn=True)
        check_consistent_length(np.empty(n_samples), y)
        target = np.asarray(y != self.background_label, dtype=bool).reshape(-1)
        if not fitting:
            return target
        n_target = int(target.sum())
        n_background = n_samples - n_target
        if n_background == 0 or n_target == 0:
            labels = np.unique(y).tolist()
            missing = "background" if n_background == 0 else "target"
            raise ValueError(
                f"{name}.fit needs two groups but y has no {missing} sample: "
                f"labels {labels[:10]}, background_label={self.background_label!r}."
                " Pass y with background samples (labelled background_label) and "
                "target samples (any other label)."
            )
        for group, size in (("background", n_background), ("target", n_target)):
            n_train = size
            if self.early_stopping:
                n_train = size - int(np.ceil(self.validation_fraction * size))
            smallest = 2 if self.batch_size == "auto" else max(2, self.batch_size)
            if n_train < smallest:
                held = " after holding out the validation share" * self.early_stopping
                raise ValueError(
                    f"{name}.fit: the {group} group has {n_train} training "
                    f"sample(s){held}, too few for a batch of batch_size="
                    f"{self.batch_size!r} per group (and at least 2). Pass more "
                    f"{group} samples or a smaller batch_size."
                )
        return target

    def _targets(self, y, n_samples: int) -> tuple[torch.Tensor, ...]:
        return (torch.from_numpy(self._is_target(y, n_samples, fitting=True)),)

    def fit(self, X, y=None):
        """Fit the model to background and target samples.

        Parameters
        ----------
        X : array-like or Niimg-like
            Training data, as for :meth:`neurovae.VAE.fit`: flat features,
            volumes, or images (files are streamed).
        y : array-like of shape (n_samples,)
            Label of each sample: ``background_label`` marks the background
            group, every other value the target group. Required.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        return super().fit(X, y)

    # ------------------------------------------------------------------
    # spaces and inference
    # ------------------------------------------------------------------
    def _space_columns(self) -> np.ndarray:
        """Columns of the ``[z, s]`` code that ``transform`` returns."""
        check_value(self, "transform_space", self.transform_space, Options(_SPACES))
        n_z = self.module_.n_shared
        salient = np.arange(n_z, self.module_.n_components)
        shared = np.arange(n_z)
        return {
            "salient": salient,
            "shared": shared,
            "both": np.concatenate([salient, shared]),
        }[self.transform_space]

    @property
    def _n_features_out(self) -> int:
        return len(self._space_columns())

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """Names of the output features: ``contrastivevae_s0, ...`` for the
        salient space and ``contrastivevae_z0, ...`` for the shared one.

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
        n_z = self.module_.n_shared
        names = [
            f"{prefix}_z{c}" if c < n_z else f"{prefix}_s{c - n_z}"
            for c in self._space_columns()
        ]
        return np.asarray(names, dtype=object)

    def transform(self, X):
        """Posterior means of ``X`` in ``transform_space`` (salient by default).

        Deterministic, and computed sample by sample: the result does not
        depend on which other samples are passed in the same call.

        The salient encoder is trained on target samples only: the salient
        codes of background samples are what it extrapolates to (in practice
        near those of the least affected targets), not zero.

        Parameters
        ----------
        X : array-like or Niimg-like
            Data shaped as at ``fit``.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_features_out)
            Salient means, shared means, or both (salient first), in the
            dtype of ``X`` (float32 for images).
        """
        check_is_fitted(self)
        columns = torch.from_numpy(self._space_columns())
        X = self._check_X(X, reset=False)
        mu = self._batched(lambda b: self.module_.encode(b)[0][:, columns], X)
        return mu.numpy().astype(self._dtype_of(X), copy=False)

    def _codes(self, Z: torch.Tensor) -> torch.Tensor:
        """Full ``[z, s]`` codes from ``transform``'s columns (others zero)."""
        codes = torch.zeros(len(Z), self.module_.n_components)
        codes[:, torch.from_numpy(self._space_columns())] = Z
        return codes

    def _salient_mask(self, target: bool) -> torch.Tensor:
        """Which code dimensions a group uses: all, or the shared ones only."""
        keep = torch.ones(self.module_.n_components)
        if not target:
            keep[self.module_.n_shared :] = 0
        return keep

    def sample(self, n_samples=1, group="target", random_state=None):
        """Generate samples of the target or the background group.

        Latent codes are drawn from N(0, I) (with ``s = 0`` for the
        background) and decoded to their means, without observation noise.

        Parameters
        ----------
        n_samples : int, default=1
            Number of samples.
        group : {"target", "background"}, default="target"
            Which group's model to sample.
        random_state : int, RandomState instance or None, default=None
            Seed of the latent draws; None draws fresh ones.

        Returns
        -------
        X : ndarray or Nifti1Image
            Samples in raw intensities, shaped as the training data (one 4-D
            image when fitted on images).
        """
        check_is_fitted(self)
        check_value(self, "group", group, Options(("target", "background")))
        keep = self._salient_mask(group == "target")
        return self._decode_prior(n_samples, random_state, keep=keep)

    def background_twin(self, X):
        """The "healthy twin" of each sample: its reconstruction without its
        salient code, and what the salient code adds.

        For target samples (e.g. patients) this is the background-like
        (control-like) version of each subject that Aglinskas et al. (2022)
        compare with the subject: the shared code is kept and the salient
        code set to zero. The difference ``full reconstruction - twin`` is
        where and how much the target-specific variation changes this
        subject's data. For background samples the salient code is the
        encoder's extrapolation (see :meth:`transform`), so their difference
        is small but not zero.

        Parameters
        ----------
        X : array-like or Niimg-like
            Samples shaped as at ``fit`` (usually target samples).

        Returns
        -------
        twin : ndarray or Nifti1Image
            Decoded ``[z, 0]`` of each sample, in raw intensities.
        difference : ndarray or Nifti1Image
            Decoded ``[z, s]`` minus ``twin``, in raw intensity units (zero
            outside the mask). Both are arrays shaped as the training data,
            or one 4-D image each when the model was fitted on images.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        module = self.module_
        keep = self._salient_mask(False)

        def twin_and_full(batch):
            mu = module.encode(batch)[0]
            return torch.stack(
                [module.decode(mu * keep.to(mu.device)), module.decode(mu)], dim=1
            )

        values = self._batched(twin_and_full, X)
        dtype = self._dtype_of(X)
        twin = self._to_raw(values[:, 0], dtype)
        difference = self._to_raw(values[:, 1], dtype) - twin
        return self._as_output(twin), self._as_output(difference)

    def score_samples(self, X, y=None) -> np.ndarray:
        """Evidence lower bound (ELBO) of each sample, in nats.

        With ``y``, each sample is scored under the model of its group:
        background samples with ``s = 0``, target samples with both codes.
        Without ``y`` every sample is scored as target. As for
        :meth:`neurovae.VAE.score_samples`, one fixed draw of the noise is
        used and the ELBO is of the raw data.

        Parameters
        ----------
        X : array-like or Niimg-like
            Data shaped as at ``fit``.
        y : array-like of shape (n_samples,), optional
            Labels, as at ``fit``.

        Returns
        -------
        elbo : ndarray of shape (n_samples,)
            Per-sample ELBO; higher is better.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        if y is None:
            return self._raw_elbo(self._batched(self.module_.elbo, X))
        target = torch.from_numpy(self._is_target(y, len(X), fitting=False))
        both = self._batched(self.module_.elbo_groups, X)
        return self._raw_elbo(torch.where(target, both[:, 1], both[:, 0]))

    def score(self, X, y=None) -> float:
        """Mean ELBO per sample (see :meth:`score_samples`); higher is better.

        Parameters
        ----------
        X : array-like or Niimg-like
            Data shaped as at ``fit``.
        y : array-like of shape (n_samples,), optional
            Labels: each sample is scored under its group's model.

        Returns
        -------
        score : float
        """
        return float(np.mean(self.score_samples(X, y)))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags
