"""VeryDeepVAE: a hierarchical 3-D VAE (Child 2021) as an estimator."""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import warnings
from importlib import resources

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from neurovae._fingerprint import describe
from neurovae._validation import Custom, Interval, IntSequence, Options, check_value
from neurovae.base import BaseVAE
from neurovae.nn import VeryDeepVAEModule
from neurovae.training import Constant, EngineConfig, Linear, Schedule
from neurovae.vae import _COMMON_ATTRIBUTES, _TRAINING_PARAMETERS, _signature_defaults

__all__ = ["VeryDeepVAE", "config_schema", "read_config"]

_LISTS = (
    "channels",
    "channels_hidden",
    "channels_per_latent",
    "latents_per_resolution",
    "kernel_sizes",
)

# ---------------------------------------------------------------------------
# configurations in the key names of the reference implementation
# ---------------------------------------------------------------------------
SCHEMA_FILE = "very_deep_vae.schema.json"

# reference key -> VeryDeepVAE parameter
_CONFIG_PARAMETERS = {
    "channels": "channels",
    "channels_hidden": "channels_hidden",
    "channels_per_latent": "channels_per_latent",
    "latent_feature_maps_per_resolution": "latents_per_resolution",
    "latents_per_channel": "latents_per_resolution",
    "kernel_sizes_bottom_up": "kernel_sizes",
    "kernel_sizes_top_down": "kernel_sizes",
    "total_epochs": "max_iter",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate_init",
    "gradient_clipping_value": "max_grad_norm",
    "gradient_skipping_value": "skip_threshold",
    "warmup_iterations": "skip_warmup_steps",
}
# keys that must repeat another key (neurovae's top-down path has the
# bottom-up widths)
_CONFIG_SAME = {
    "channels_top_down": "channels",
    "channels_hidden_top_down": "channels_hidden",
}
# switches of the reference network that neurovae builds one way: the value
# that describes neurovae. Another value is not applied, with a warning.
_CONFIG_FIXED = {
    "l2_reg_coeff": 0,
    "predict_x_var": False,
    "predict_x_scale": False,
    "use_tanh_output": False,
    "output_activation_function": "identity",
    "convolutional_downsampling": False,
    "bottleneck_resnet_encoder": True,
    "only_use_one_conv_block_at_top": False,
    "normalise_weight_by_depth": True,
    "zero_biases": False,
    "use_rezero": False,
    "veto_batch_norm": True,
    "use_precision_reweighting": False,
    "use_abs_not_square": False,
    "separate_hidden_loc_scale_convs": False,
    "separate_output_loc_scale_convs": False,
    "latents_per_channel_weight_sharing": "none",
    "latent_feature_maps_per_resolution_weight_sharing": "none",
    "latents_to_use": "all",
    "latents_to_optimise": "all",
}
# names of a linear output activation (output_activation_function)
_LINEAR_NAMES = ("identity", "linear", "none")


@functools.cache
def config_schema() -> dict:
    """The JSON schema of :class:`VeryDeepVAE` configurations.

    The schema (JSON Schema draft 2020-12) ships with the package as
    ``neurovae/schemas/very_deep_vae.schema.json``. It lists the keys of the
    configuration files of the 3-D reference implementation that
    ``VeryDeepVAE(config=...)`` reads, each with its type and what neurovae
    does with it; unknown keys are errors.

    Returns
    -------
    schema : dict
        The parsed schema (shared: copy it before changing it).

    Examples
    --------
    >>> from neurovae.very_deep import config_schema
    >>> schema = config_schema()
    >>> schema["properties"]["total_epochs"]["description"]
    'Epochs of training (max_iter).'
    """
    text = resources.files("neurovae.schemas").joinpath(SCHEMA_FILE).read_text()
    return json.loads(text)


def _load_config(config) -> dict:
    """The configuration as a dict: ``config`` itself or a JSON file's."""
    if isinstance(config, dict):
        return config
    path = os.fspath(config)
    with open(path, encoding="utf-8") as f:
        try:
            loaded = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path!r} is not valid JSON: {exc}") from None
    return loaded


def _config_errors(config: dict) -> list[str]:
    """What in ``config`` breaks the schema, one line per error."""
    import jsonschema  # a dependency; imported on use (it takes ~0.1 s)

    validator = jsonschema.Draft202012Validator(config_schema())
    lines = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(e.path)):
        where = "/".join(str(p) for p in error.path) or "(top level)"
        lines.append(f"{where}: {error.message}")
    return lines


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def read_config(config) -> tuple[dict, tuple[int, ...] | None, list[str]]:
    """Translate a reference configuration into :class:`VeryDeepVAE` terms.

    Parameters
    ----------
    config : dict, str or path-like
        The configuration, or the path of a JSON file holding it, in the key
        names of the 3-D reference implementation; see
        :func:`config_schema` and the ``config`` parameter of
        :class:`VeryDeepVAE`.

    Returns
    -------
    params : dict
        The VeryDeepVAE parameters the configuration sets.
    grid : tuple of int or None
        The training grid it was written for (``nii_target_shape``, or
        ``resolution`` for a cube), or None.
    not_applied : list of str
        ``key=value`` of the reference network's switches that neurovae
        builds another way (what :class:`VeryDeepVAE` warns about).

    Raises
    ------
    ValueError
        If the configuration breaks the schema (every error is listed), or
        asks for what neurovae does not do (a Bernoulli likelihood,
        top-down widths other than the bottom-up ones, different bottom-up
        and top-down kernel sizes).

    Examples
    --------
    >>> from neurovae.very_deep import read_config
    >>> params, grid, not_applied = read_config({
    ...     "total_epochs": 10, "resolution": 32,
    ...     "latent_feature_maps_per_resolution": [2, 5, 4, 3, 2, 1],
    ...     "kernel_sizes_bottom_up": [3, 3, 3, 3, 2, 1],
    ...     "use_tanh_output": True})
    >>> params
    {'latents_per_resolution': [2, 5, 4, 3, 2, 1], \
'kernel_sizes': [3, 3, 3, 3, 2, 1], 'max_iter': 10}
    >>> grid, not_applied
    ((32, 32, 32), ['use_tanh_output=True'])
    """
    config = _load_config(config)
    errors = _config_errors(config)
    if errors:
        raise ValueError(
            f"the configuration does not follow the schema ({SCHEMA_FILE}):\n  "
            + "\n  ".join(errors)
        )
    if config.get("likelihood", "Gaussian") != "Gaussian":
        raise ValueError(
            f"likelihood={config['likelihood']!r}: VeryDeepVAE has a Gaussian "
            "likelihood only."
        )
    params: dict = {}
    if config.get("half_precision", False):  # false: the estimator's precision
        params["precision"] = "16"  # float16 with a gradient scaler (CUDA)
    for key, name in _CONFIG_PARAMETERS.items():
        if key not in config:
            continue
        value = config[key]
        if name in params and not _same_value(params[name], value):
            raise ValueError(
                f"{key}={list(value)} differs from the value the configuration "
                f"gives {name} through another key, {list(params[name])}: "
                "neurovae uses one kernel size per resolution in both paths."
            )
        params[name] = value
    if config.get("train_frac", 1) < 1:
        params["validation_fraction"] = round(1.0 - config["train_frac"], 12)
    for key, other in _CONFIG_SAME.items():
        if key in config and other in config and config[key] != config[other]:
            raise ValueError(
                f"{key}={config[key]} differs from {other}={config[other]}: "
                "neurovae's top-down path has the widths of the bottom-up one."
            )
    not_applied = []
    for key, value in _CONFIG_FIXED.items():
        given = config.get(key, value)
        if key == "output_activation_function" and given.lower() in _LINEAR_NAMES:
            given = value  # another name of neurovae's linear output
        if not _same_value(given, value):
            not_applied.append(f"{key}={given!r}")
    grid = config.get("nii_target_shape")
    if grid is None and "resolution" in config:
        grid = [config["resolution"]] * 3
    return params, None if grid is None else tuple(grid), not_applied


def _is_fraction(value) -> bool:
    return (
        value is None
        or isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and 0 < value < 1
    )


def _is_config(value) -> bool:
    return value is None or isinstance(value, (dict, str, os.PathLike))


_PARAMETERS = """
    channels : tuple of int, default=(8, 16, 32, 64)
        Width of the residual stream at each resolution, highest resolution
        first. Its length is the number of resolutions; each one halves the
        grid (average pooling), so ``2**(len(channels) - 1)`` may not exceed
        the smallest side of the volumes.
    channels_hidden : tuple of int, default=(4, 8, 16, 32)
        Width inside the bottleneck blocks at each resolution.
    channels_per_latent : tuple of int, default=(1, 2, 4, 8)
        Channels of each latent group at each resolution (a group is a
        latent volume on that resolution's grid).
    latents_per_resolution : tuple of int, default=(0, 1, 2, 2)
        Number of latent groups at each resolution (0: none there, the
        decoder then has ``n_blocks_per_resolution`` plain blocks).
    kernel_sizes : tuple of int, default=(3, 3, 3, 3)
        Kernel size of the blocks' middle convolutions at each resolution.
        1 makes a resolution's blocks channel-wise (cheaper), but at the
        highest resolution the output is then constant over the 2x2x2
        blocks of the nearest-neighbour upsampling: on 32^3 ellipsoids, 3
        there gave -1.63 bits per voxel and smooth samples, against -1.51
        and blocky texture with 1 (without a global latent; ``benchmarks/``).
    n_blocks_per_resolution : int, default=1
        Residual blocks per resolution in the encoder.
    global_latent_dim : int, default=8
        Size of a global latent vector above the coarsest grid (0: none).
        Its posterior comes from the whole coarsest encoder activation and
        a linear map turns it into the starting top-down state, so that one
        vector can say where and how large things are; the spatial groups
        then refine. Without it, the layout of a volume has to be spread
        over spatial groups whose priors are nearly independent from voxel
        to voxel, and samples are scattered blobs (``benchmarks/``).
    global_only_iter : int, default=20
        With a global latent, epochs at the start of training during which
        the spatial groups are closed (they take their prior means, carry
        no information and add no KL), so that the global latent learns the
        layout before the spatial groups can take it. 0 opens them from the
        start; ignored without a global latent.
    global_only_fraction : float in [0, 1], default=0.5
        With a global latent, once the spatial groups are open: the
        probability with which each training volume, at each step, draws
        its spatial groups from their priors instead of their posteriors
        (q = p for those groups, so they add no KL and the volume's
        objective is still an ELBO). For those volumes the global latent
        alone says what the volume is, so the decoder learns to render a
        volume from the global latent and prior draws of the spatial
        groups, which is what :meth:`sample` does. Without it the spatial
        groups can take over the layout once open, and a third to a half of
        the samples hold no object; the price is likelihood
        (``benchmarks/``). 0 trains every volume on its posteriors; 1 never
        trains the spatial posteriors (only of use to study the global
        latent alone); ignored without a global latent.
    global_prior : {"fitted", "standard"}, default="fitted"
        Prior of the global latent once trained. Training uses the standard
        normal; ``"fitted"`` then replaces it by the Gaussian (full
        covariance) that best fits the posteriors of the training volumes,
        the maximum-likelihood Gaussian of the aggregate posterior, as in
        ex-post density estimation [3]_. ``sample``, ``score`` and
        ``bits_per_voxel`` use it. The standard normal leaves the regions
        of latent space where no training volume lies as likely as the
        others, and samples drawn there are not volumes like the training
        ones (``benchmarks/``). ``"standard"`` keeps N(0, I).
    n_transform_groups : int, default=1
        How many of the top (coarsest) latent groups :meth:`transform`
        returns and :meth:`inverse_transform` takes; the first is the global
        latent when there is one.
    beta : float, default=1.0
        Weight of the KL term (its final value with ``warmup_iter``); 1
        gives the ELBO.
    warmup_iter : int, default=5
        Epochs of a linear ramp of the KL weight from 0 to ``beta`` (KL
        warm-up, against latent groups that switch off early); 0 trains on
        the ELBO from the start.
    skip_threshold : float or None, default=None
        Skip every update whose gradient norm (before clipping) is above
        this value, as the reference does against rare huge gradients;
        counted in ``history_["n_skipped_large"]``. An epoch whose every
        update is skipped raises :class:`~neurovae.training.DivergenceError`
        instead of stalling silently. Updates with a non-finite loss or
        gradient are always skipped. The loss is a sum over voxels (a 32³
        volume's is of the order of 10⁴ nats), and so are the gradients.
    skip_warmup_steps : int, default=0
        Training steps at the start that are never skipped for their size
        (only for a non-finite gradient): the reference's
        ``warmup_iterations``.
    ema_decay : float or None, default=None
        Keep an exponential moving average of the weights (e.g. 0.999), used
        for validation, and kept as the model after training (so for
        ``transform``, ``sample`` and ``score``).
    gradient_checkpointing : bool, default=False
        Recompute the blocks' activations in the backward pass rather than
        storing them: less memory for large volumes, about a third more
        compute.
    config : dict, str, path-like or None, default=None
        A configuration in the key names of the 3-D reference
        implementation, or the path of a JSON file holding one, checked
        against the JSON schema that ships with neurovae
        (:func:`neurovae.very_deep.config_schema`) when ``fit`` starts. The
        values it gives take precedence over the matching parameters:
        ``channels``, ``channels_hidden``, ``channels_per_latent``,
        ``latent_feature_maps_per_resolution`` (``latents_per_resolution``),
        ``kernel_sizes_bottom_up`` / ``kernel_sizes_top_down``
        (``kernel_sizes``), ``total_epochs`` (``max_iter``), ``batch_size``,
        ``learning_rate`` (``learning_rate_init``),
        ``gradient_clipping_value`` (``max_grad_norm``),
        ``gradient_skipping_value`` (``skip_threshold``),
        ``warmup_iterations`` (``skip_warmup_steps``), ``train_frac``
        (``validation_fraction = 1 - train_frac``, used with early
        stopping) and ``half_precision`` (true: ``precision="16"``, float16
        with a gradient scaler, which needs a CUDA device; false leaves
        ``precision`` as set). ``nii_target_shape`` or ``resolution`` must
        match the data's grid. The reference's network switches that
        neurovae builds its own way (``use_tanh_output``, ``predict_x_var``,
        ``l2_reg_coeff``, ...) are not applied, with a warning naming them;
        the settings of its training script (plots, checkpoints, DDP) are
        accepted and not used. A Bernoulli likelihood and top-down widths
        other than the bottom-up ones are errors.
        ``get_params`` still shows the parameters as set; the values in
        effect are in ``config_params_``."""


class VeryDeepVAE(BaseVAE):
    __doc__ = f"""Very deep hierarchical VAE for 3-D volumes (Child 2021).

    The very deep VAE of Child [1]_ as streamlined for 3-D neuroimaging by
    Gray, Graham, Cardoso et al. [2]_. A bottom-up residual encoder runs
    over a pyramid of resolutions (highest first, each half the previous
    one). A top-down decoder then goes back up from the coarsest
    resolution: at each resolution it holds ``latents_per_resolution``
    latent groups, each a volume with a posterior (from the bottom-up
    activations and the top-down state) and a learned prior (from the
    top-down state alone). Above the coarsest grid sits a global latent
    vector (``global_latent_dim``; 0 leaves it out, and the first, coarsest
    group then has the standard normal prior): trained with a standard
    normal prior and, for the first ``global_only_iter`` epochs, alone,
    so that it learns the layout of the volumes (where things are, how
    large) before the spatial groups can take it, and afterwards, for a
    random share of the volumes, still alone (``global_only_fraction``);
    once trained, its prior is fitted to the training posteriors
    (``global_prior``). The voxels have a Gaussian likelihood with a learned
    scale per voxel, bounded below.

    Training maximises the ELBO with the reference's stabilisers: prior
    heads initialised at zero (every prior starts as N(0, I)), residual
    branches whose last layer is scaled by ``1 / sqrt(depth)``, Adamax,
    optional gradient-norm clipping (``max_grad_norm``) and skipping of
    updates with a huge gradient (``skip_threshold``), optional KL warm-up
    and an optional moving average of the weights (``ema_decay``).

    Volumes of any grid are accepted: sides that are not multiples of
    ``2**(len(channels) - 1)`` are zero-padded (centred) inside the network
    and its outputs cropped back, so the likelihood, the scores and every
    output see the original voxels only (a 91×109×91 MNI grid with 6
    resolutions is padded to 96×128×96). Nothing is resampled.

    Parameters
    ----------{_PARAMETERS}
{_TRAINING_PARAMETERS}

    Attributes
    ----------
    module_ : neurovae.nn.VeryDeepVAEModule
        The trained torch module (its ``latent_shapes`` give each group's
        ``(channels, x, y, z)``, coarsest first, after the global latent's
        ``(global_latent_dim,)``; its ``global_latent`` holds the fitted
        prior as ``prior_mean`` and ``prior_scale_tril``).
    history_ : dict of str to list
        Per-epoch ``loss``, ``recon`` (negative log-likelihood), ``kl`` (the
        sum over groups), ``kl_level0``, ``kl_level1``, ... (the KL of the
        groups of each resolution, 0 the highest), ``kl_global`` (the
        global latent's), ``beta``, ``spatial_open`` (below 1 while the
        spatial groups are closed), ``global_only_fraction`` (with a global
        latent), ``n_skipped`` (all skipped updates), ``n_skipped_large``
        (with ``skip_threshold``: those skipped for their size) and
        ``time``; with early stopping the validation terms prefixed
        ``val_``. Losses are per volume, in nats.
    config_params_ : dict
        The parameters ``config`` set (empty without one).{_COMMON_ATTRIBUTES}

    See Also
    --------
    VAE : One latent vector per volume; with ``backbone="conv"`` the
        single-level baseline of this model.

    Notes
    -----
    The default batch is small: on a 2-core CPU, an epoch of 100 volumes of
    32³ took 3.5 s at batch 8 against 7.3 s at batch 16, and more steps per
    epoch learn faster (held-out -1.01 bits per voxel after 12 epochs at
    batch 8, against -0.89 at batch 16 and -0.91 after 50 epochs at batch
    64). On a GPU larger batches pay.

    :meth:`bits_per_voxel` gives the negative ELBO in bits per voxel, the
    unit of very deep VAE papers; for continuous data it may be negative.
    With ``likelihood_scale`` per voxel and data z-scored by ``scaling``, a
    model that only learned the mean image scores about
    ``0.5 * log2(2 * pi * e) = 2.05`` bits per voxel.

    References
    ----------
    .. [1] R. Child, "Very deep VAEs generalize autoregressive models and can
       outperform them on images", ICLR 2021.
    .. [2] R. Gray, M. Graham, M. J. Cardoso et al., "3D very deep VAE",
       github.com/high-dimensional/3d_very_deep_vae.
    .. [3] P. Ghosh, M. S. M. Sajjadi, A. Vergari, M. Black and B. Schölkopf,
       "From variational to deterministic autoencoders", ICLR 2020.

    Examples
    --------
    >>> from neurovae import VeryDeepVAE
    >>> from neurovae.datasets import make_ellipsoids
    >>> X, _ = make_ellipsoids(20, shape=(16, 16, 16), random_state=0)
    >>> vdvae = VeryDeepVAE(channels=(4, 8, 8), channels_hidden=(2, 4, 4),
    ...                     channels_per_latent=(1, 2, 2),
    ...                     latents_per_resolution=(0, 1, 2),
    ...                     kernel_sizes=(1, 3, 3), global_latent_dim=8,
    ...                     global_only_iter=1, max_iter=2,
    ...                     random_state=0).fit(X)
    >>> vdvae.module_.latent_shapes  # the global latent, then coarsest first
    [(8,), (2, 4, 4, 4), (2, 4, 4, 4), (2, 8, 8, 8)]
    >>> vdvae.transform(X).shape  # the top group: the global latent
    (20, 8)
    >>> [z.shape for z in vdvae.transform_levels(X[:2])]
    [(2, 8), (2, 2, 4, 4, 4), (2, 2, 4, 4, 4), (2, 2, 8, 8, 8)]
    >>> vdvae.sample(3, temperature=0.5, random_state=0).shape
    (3, 16, 16, 16)
    >>> sorted(k for k in vdvae.history_ if k.startswith("kl"))
    ['kl', 'kl_global', 'kl_level0', 'kl_level1', 'kl_level2']
    >>> vdvae.history_["kl_level1"][0]  # epoch 1: only the global latent
    0.0
    """

    # a learned, bounded per-voxel Gaussian scale, as in the reference
    likelihood = "gaussian"
    likelihood_scale = "feature"

    _structure_params = (*_LISTS, "n_blocks_per_resolution", "global_latent_dim")
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
        "global_latent_dim": Interval(int, 0),
        "global_only_iter": Interval(int, 0),
        "global_only_fraction": Interval(float, 0.0, 1.0),
        "global_prior": Options(("fitted", "standard")),
        "n_transform_groups": Interval(int, 1),
        "warmup_iter": Interval(int, 0),
        "skip_threshold": Interval(float, 0.0, low_open=True, none_ok=True),
        "skip_warmup_steps": Interval(int, 0),
        "ema_decay": Custom(_is_fraction, "None or a float in (0, 1)"),
        "gradient_checkpointing": Options((True, False)),
        "config": Custom(_is_config, "None, a dict or the path of a JSON file"),
    }

    def __init__(
        self,
        channels=(8, 16, 32, 64),
        channels_hidden=(4, 8, 16, 32),
        channels_per_latent=(1, 2, 4, 8),
        latents_per_resolution=(0, 1, 2, 2),
        kernel_sizes=(3, 3, 3, 3),
        *,
        n_blocks_per_resolution=1,
        global_latent_dim=8,
        global_only_iter=20,
        global_only_fraction=0.5,
        global_prior="fitted",
        n_transform_groups=1,
        beta=1.0,
        warmup_iter=5,
        skip_threshold=None,
        skip_warmup_steps=0,
        ema_decay=None,
        gradient_checkpointing=False,
        config=None,
        optimizer="adamax",
        learning_rate_init=2e-3,
        weight_decay=0.0,
        max_grad_norm=None,
        batch_size=8,
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
        checkpoint_dir=None,
        distributed="auto",
    ):
        self.channels = channels
        self.channels_hidden = channels_hidden
        self.channels_per_latent = channels_per_latent
        self.latents_per_resolution = latents_per_resolution
        self.kernel_sizes = kernel_sizes
        self.n_blocks_per_resolution = n_blocks_per_resolution
        self.global_latent_dim = global_latent_dim
        self.global_only_iter = global_only_iter
        self.global_only_fraction = global_only_fraction
        self.global_prior = global_prior
        self.n_transform_groups = n_transform_groups
        self.beta = beta
        self.warmup_iter = warmup_iter
        self.skip_threshold = skip_threshold
        self.skip_warmup_steps = skip_warmup_steps
        self.ema_decay = ema_decay
        self.gradient_checkpointing = gradient_checkpointing
        self.config = config
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
    # the configuration
    # ------------------------------------------------------------------
    def _param(self, name: str):
        params = self.__dict__.get("config_params_") or {}
        return params[name] if name in params else getattr(self, name)

    def fit(self, X, y=None):
        check_value(self, "config", self.config, self._parameter_rules["config"])
        params, grid = {}, None
        if self.config is not None:
            params, grid, not_applied = read_config(self.config)
            for name, value in params.items():
                check_value(self, name, value, self._parameter_rules[name])
            if not_applied:
                warnings.warn(
                    f"{type(self).__name__}: the configuration's "
                    f"{', '.join(not_applied)} describe the reference network, "
                    "which neurovae builds its own way; they are not applied "
                    "(see the config parameter).",
                    UserWarning,
                    stacklevel=2,
                )
        previous = self.__dict__.get("config_params_")
        self.config_params_, self._config_grid = params, grid
        try:
            return super().fit(X, y)
        except BaseException:
            if previous is None:  # an unfitted estimator stays unfitted
                self.__dict__.pop("config_params_", None)
            else:  # a failed warm start keeps the model and its parameters
                self.config_params_ = previous
            raise
        finally:
            self.__dict__.pop("_config_grid", None)

    def _fingerprint_params(self) -> dict:
        # the configuration by what it sets (a path's content, not its name)
        params = super()._fingerprint_params()
        if self.config is not None:
            grid = self.__dict__.get("_config_grid")
            params["config"] = describe({"params": self.config_params_, "grid": grid})
        return params

    # ------------------------------------------------------------------
    # the model
    # ------------------------------------------------------------------
    def _check_data(self, X, stats) -> None:
        name = type(self).__name__
        # a warm start continues the schedule: epochs already run count
        done = self.n_iter_ if self.warm_start and hasattr(self, "module_") else 0
        last = done + self._param("max_iter")
        if self.global_latent_dim and self.global_only_iter >= last:
            warnings.warn(
                f"{name}: global_only_iter={self.global_only_iter} is not below "
                f"the {last} epochs this fit ends at (max_iter="
                f"{self._param('max_iter')}): the spatial latent groups never "
                "open and only the global latent is trained. Lower "
                "global_only_iter (0 opens them from the start).",
                UserWarning,
                stacklevel=3,
            )
        if len(self.input_shape_) not in (3, 4):
            raise ValueError(
                f"{name} needs volumes: a 4-D array (n_samples, x, y, z), a 5-D "
                "array (n_samples, channels, x, y, z) or images; X has samples "
                f"of shape {self.input_shape_}."
            )
        grid = tuple(self.input_shape_[-3:])
        wanted = self.__dict__.get("_config_grid")
        if wanted is not None and tuple(wanted) != grid:
            raise ValueError(
                f"{name}: the configuration was written for volumes of "
                f"{'x'.join(map(str, wanted))} voxels but X has "
                f"{'x'.join(map(str, grid))}; neurovae does not resample. Pass "
                "volumes on that grid (e.g. with nilearn.image.resample_img), or "
                "drop nii_target_shape / resolution from the configuration."
            )
        lists = {key: self._param(key) for key in _LISTS}
        n = len(lists["channels"])
        for key in _LISTS[1:]:
            if len(lists[key]) != n:
                raise ValueError(
                    f"{name}: {key} has {len(lists[key])} entries but channels "
                    f"has {n}; every list has one entry per resolution, highest "
                    "first."
                )
        if 2 ** (n - 1) > min(grid):
            most = int(math.log2(min(grid))) + 1
            raise ValueError(
                f"{name}: the lists have {n} entries (resolutions), too many "
                f"for volumes of {'x'.join(map(str, grid))} voxels: each "
                f"resolution halves the grid, so the smallest side, {min(grid)}, "
                f"allows at most {most}. Drop the coarsest entries of every list."
            )

    def _build_module(self, sample_shape, stats) -> VeryDeepVAEModule:
        return VeryDeepVAEModule(
            sample_shape[0],
            sample_shape[1:],
            **{key: tuple(self._param(key)) for key in _LISTS},
            likelihood=self._likelihood(sample_shape, stats),
            n_blocks_per_resolution=self.n_blocks_per_resolution,
            gradient_checkpointing=self.gradient_checkpointing,
            global_latent_dim=self.global_latent_dim,
        )

    def _schedules(self) -> dict[str, Schedule]:
        schedules: dict[str, Schedule] = {"beta": Constant(self.beta)}
        if self.warmup_iter:
            schedules["beta"] = Linear(self.beta, warmup_iter=self.warmup_iter)
        if self.global_latent_dim and self.global_only_iter:
            # below 1 the module keeps its spatial groups closed
            schedules["spatial_open"] = Linear(1.0, warmup_iter=self.global_only_iter)
        if self.global_latent_dim:
            # always set, so that a warm start can also turn it off
            schedules["global_only_fraction"] = Constant(
                float(self.global_only_fraction)
            )
        return schedules

    def _after_training(self, module, train_data, device, context) -> None:
        glob = module.global_latent
        if glob is None:
            return
        if self.global_prior == "standard":
            glob.reset_prior()
            return
        batches = self._batches(train_data, device, shuffle=False, context=context)

        def local(batches):  # this process's samples, stand-ins left out
            for batch, shard in zip(batches, batches.shards()):
                if shard.n_local:
                    yield (batch[0][: shard.n_local],)

        training = module.training
        module.eval()
        try:
            all_reduce = None if context is None else context.all_reduce
            module.fit_global_prior(local(batches), all_reduce)
        finally:
            module.train(training)

    def _engine_config(self) -> EngineConfig:
        config = super()._engine_config()
        config.skip_threshold = self._param("skip_threshold")
        config.skip_warmup = self._param("skip_warmup_steps")
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
        return self._flat_means(X, k).numpy().astype(self._dtype_of(X), copy=False)

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
            on that group's grid (``module_.latent_shapes``); the global
            latent's, first, is ``(n_samples, global_latent_dim)``.
        """
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        n_groups = self.module_.n_latent_groups
        flat = self._flat_means(X, n_groups).numpy()
        groups = self._groups_of(flat, n_groups)
        return [g.astype(self._dtype_of(X)) for g in groups]

    def _flat_means(self, X, n_groups: int) -> torch.Tensor:
        """Posterior means of the first ``n_groups`` groups of checked ``X``,
        each flattened, side by side."""
        module = self.module_

        def means(batch):
            return torch.cat([m.flatten(1) for m in module.encode(batch)[:n_groups]], 1)

        return self._batched(means, X)

    def _groups_of(self, flat, n_groups: int):
        """Split the flattened means of the first ``n_groups`` groups (an
        array or a tensor) back into ``(n, channels, x, y, z)`` volumes."""
        groups, start = [], 0
        for shape in self.module_.latent_shapes[:n_groups]:
            size = math.prod(shape)
            groups.append(flat[:, start : start + size].reshape(-1, *shape))
            start += size
        return groups

    def _codes(self, Z: torch.Tensor):
        return self._groups_of(Z, self._top_groups())

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
        Z = self._check_Z(X)
        module = self.module_

        def decode(batch):
            return module.decode_latents(self._codes(batch))

        codes = torch.tensor(Z, dtype=torch.float32)
        return self._to_output(self._batched(decode, codes), Z.dtype)

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
            Factor on the standard deviations of the priors (the global
            latent's included); lower values give smoother, more typical
            samples (0: the prior means).
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
        module = self.module_

        def draw(rows):  # rows: an empty placeholder per volume of the chunk
            return module.sample(len(rows), float(temperature), generator=generator)

        # _batched sizes the chunks and applies eval mode and the precision
        volumes = self._batched(draw, torch.empty(int(n_samples), 0))
        return self._to_output(volumes, self._fit_dtype)


# the shared training parameters, with this family's defaults
VeryDeepVAE.__doc__ = _signature_defaults(VeryDeepVAE.__doc__, VeryDeepVAE.__init__)
