"""VAE and BetaVAE estimators."""

from __future__ import annotations

import inspect
import re

from neurovae._validation import Interval, Options
from neurovae.base import BaseVAE
from neurovae.nn import VAEModule
from neurovae.training import Constant, Linear, Schedule

# parameters of the families built on a backbone pair (not VeryDeepVAE)
_NETWORK_PARAMETERS = """
    backbone : {"auto", "mlp", "conv", "resnet"} or (encoder, decoder), \
default="auto"
        Network of the encoder and decoder. "auto" picks "mlp" for 2-D input
        and "conv" for volumes. "conv" is a 3-D convolutional network with
        GroupNorm (one stride-2 level per entry of ``channels``); "resnet"
        adds residual blocks at every level. Both handle any grid, odd sizes
        included. A pair of ``torch.nn.Module`` objects is used as is (copied):
        the encoder maps a batch of samples to features of any shape (its
        output size is inferred), the decoder maps ``(n, n_components)`` to
        the output (the mean, or logits for "bernoulli") of the input's shape.
        Both see ``(n, x, y, z)`` volumes with a channel axis,
        ``(n, 1, x, y, z)``.
    hidden_layer_sizes : tuple of int, default=(256, 128)
        Hidden widths of the "mlp" encoder; the decoder mirrors them.
    channels : tuple of int, default=(16, 32, 64)
        Channels of each level of the "conv" and "resnet" backbones.
    likelihood : {"gaussian", "laplace", "bernoulli"}, default="gaussian"
        Observation model p(x | z). "gaussian" and "laplace" learn their scale
        (so the ELBO is a proper bound and the model does not collapse to the
        mean image); "bernoulli" needs data in [0, 1].
    likelihood_scale : {"global", "feature"}, default="global"
        Learn one scale for all features, or one per feature (voxel)."""

# parameters of every family: training, device, data
_TRAINING_PARAMETERS = """
    optimizer : {"adam", "adamw", "sgd", "adamax"}, default="adam"
        Optimiser of the network weights.
    learning_rate_init : float, default=1e-3
        Learning rate of the optimiser.
    weight_decay : float, default=0.0
        Weight decay of the optimiser (decoupled for "adamw").
    max_grad_norm : float or None, default=None
        Clip the gradient norm to this value, and skip steps whose gradient
        norm is not finite. Steps whose loss is not finite are always skipped
        (and counted in ``history_["n_skipped"]``).
    batch_size : int or "auto", default="auto"
        Minibatch size; "auto" is ``min(200, n_samples)``.
    max_iter : int, default=300
        Number of epochs (passes over the training data).
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the data, stop when the
        validation loss has not improved by ``tol`` for ``n_iter_no_change``
        epochs, and restore the weights of the best epoch.
    validation_fraction : float, default=0.1
        Share of the samples held out for early stopping.
    n_iter_no_change : int, default=10
        Epochs without improvement before early stopping.
    tol : float, default=1e-4
        Minimal improvement of the validation loss.
    device : str, default="auto"
        "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:1", ...
        Resolved in ``fit``.
    precision : {"32", "bf16", "16"}, default="32"
        Float32; bfloat16 autocast (on CPU and GPU); or float16 autocast
        with a gradient scaler, on CUDA only (``fit`` on another device is
        an error). Steps the scaler skips while it calibrates its scale are
        counted in ``history_["n_skipped_scaler"]``, apart from the
        divergence skips of ``n_skipped``. A model trained with "16" runs
        in float32 once moved to (or unpickled on) a CPU.
    random_state : int, RandomState instance or None, default=None
        Controls weight initialisation, shuffling, the validation split, the
        reparameterisation noise and scoring. Global random generators are
        never touched.
    verbose : int, default=0
        0 silent, 1 a progress bar with the current loss, 2 one line per epoch.
    warm_start : bool, default=False
        Continue from the fitted weights (with a fresh optimiser) instead of
        starting from scratch; ``history_`` and ``n_iter_`` accumulate. The
        mask and scaling of the first fit are kept.
    mask_img : Niimg-like, ndarray of bool or None, default=None
        Brain mask of volume data: a 3-D image or path (resampled to the
        training grid with nearest-neighbour interpolation if its grid
        differs), or a boolean array of the volumes' spatial shape. Only
        voxels inside it count in the loss, and outputs are zero outside it
        (where input values, even NaN, are ignored). Not for 2-D X: a
        ``NiftiMasker`` has already applied its mask.
    scaling : {"auto", "minmax", "zscore"} or None, default="auto"
        Intensity scaling fitted on the training data (inside the mask): to
        [0, 1] ("minmax"), or to zero mean and unit variance ("zscore"), with
        one offset and one scale for all voxels (and features), so that raw
        scanner intensities train without manual preprocessing. "auto" is
        "minmax" for ``likelihood="bernoulli"`` (which needs [0, 1]) and
        "zscore" otherwise; None leaves the data as it is. Outputs are mapped
        back to raw intensities and scores are of the raw data;
        ``history_`` holds losses of the scaled data.
    num_workers : int, default=0
        Worker processes reading images from files while the model trains
        (a ``torch`` ``DataLoader``); 0 reads them in the main process. Only
        used for Niimg-like input that lives on disk.
    checkpoint_dir : str, path-like or None, default=None
        Directory where ``fit`` keeps a checkpoint, ``<ClassName>.ckpt``,
        rewritten atomically after every epoch with all the training state
        (weights, optimisers, random generators, early-stopping state,
        ``history_``). A ``fit`` with the same parameters and data that finds
        it resumes where it stopped, even after the process was killed, and
        ends with the same weights as an uninterrupted fit (bitwise on the
        CPU); with ``random_state=None`` it reuses the interrupted fit's
        seed. The checkpoint of a finished fit is kept, so fitting again
        returns the same model without training. A checkpoint written with
        other parameters (``verbose``, ``warm_start``, ``num_workers`` and
        the device index excepted) or other data, or a corrupt one, is an
        error, never loaded: delete the file or use another directory (one
        per fit, e.g. per cross-validation fold). With ``warm_start=True``
        on a fitted model, the checkpoint follows the continued training: it
        replaces the finished checkpoint that ended with the model's weights,
        even if training parameters such as ``max_iter`` changed (an
        unfinished one is an error), and a continuation killed midway resumes
        when the same fitted model is fitted again. None writes no checkpoint. In
        distributed training only rank 0 writes it, and every rank resumes
        from it.
    distributed : {"auto", True, False}, default="auto"
        Train with ``torch`` DistributedDataParallel over the processes of a
        launch such as ``torchrun --nproc_per_node=N script.py`` (one or
        many nodes), every process running the same script and ``fit``.
        ``"auto"`` does so when the script was launched that way (or a
        ``torch.distributed`` process group of several processes is
        initialised); True requires it (an error otherwise); False trains
        in each process on its own. The process group is formed on the
        first such fit (NCCL on CUDA, one GPU per process, Gloo on the CPU)
        and kept until the script ends; a group you initialised yourself is
        used and left alone. ``batch_size`` is the global batch, split
        among the processes, so results do not depend on their number (up
        to float rounding); images from files are read only by the process
        that trains on them. Every process ends ``fit`` with the same
        weights, so any can ``transform``; only rank 0 prints progress and
        writes files (checkpoints, :meth:`save`)."""

_COMMON_PARAMETERS = _NETWORK_PARAMETERS + _TRAINING_PARAMETERS


def _signature_defaults(doc: str, init) -> str:
    """``doc`` with the ``default=`` of every parameter line taken from the
    signature of ``init``, for a family whose defaults differ from the shared
    text (a parameter line is ``    name : description, default=value``)."""
    for name, param in inspect.signature(init).parameters.items():
        if param.default is inspect.Parameter.empty:
            continue
        value = param.default
        text = f'"{value}"' if isinstance(value, str) else repr(value)
        doc = re.sub(rf"(\n    {name} : [^\n]*default=)[^\n]*", rf"\g<1>{text}", doc)
    return doc


_VAE_ATTRIBUTES = """
    module_ : neurovae.nn.VAEModule
        The trained torch module.
    history_ : dict of str to list
        Per-epoch ``loss`` (the training objective), ``recon`` (negative
        log-likelihood), ``kl``, the scheduled weights, ``n_skipped`` (steps
        skipped for a non-finite loss), ``time`` (seconds) and, with early
        stopping, the same terms on the validation set prefixed ``val_``."""

# fitted attributes of every family (after its module_ and history_)
_COMMON_ATTRIBUTES = """
    n_iter_ : int
        Epochs run.
    best_epoch_ : int or None
        Epoch (0-based) whose weights are kept: the best validation epoch
        with early stopping, otherwise the last.
    n_features_in_ : int
        Number of features (voxels times channels for volumes).
    feature_names_in_ : ndarray of str
        Feature names, when ``X`` had string column names.
    input_shape_ : tuple of int
        Shape of one training sample: ``(n_features,)``, ``(x, y, z)`` or
        ``(channels, x, y, z)``.
    affine_ : ndarray of shape (4, 4)
        Voxel-to-world affine of the training images (only when fitted on
        images); outputs are images on this grid.
    mask_img_ : Nifti1Image or ndarray of bool
        The mask on the training grid (only with ``mask_img``): an image when
        fitted on images, otherwise a boolean array.
    intensity_offset_, intensity_scale_ : float
        The fitted scaling: the network sees ``(X - intensity_offset_) /
        intensity_scale_`` (0 and 1 with ``scaling=None``)."""


class VAE(BaseVAE):
    __doc__ = f"""Variational autoencoder with the scikit-learn interface.

    Encodes each sample into a diagonal Gaussian posterior over
    ``n_components`` latent variables and decodes latent codes through a
    learned likelihood. Trained by maximising the evidence lower bound (ELBO)
    ``E_q[log p(x | z)] - beta * KL(q(z | x) || N(0, I))``. Works on flat
    features (2-D arrays, e.g. masked brain images) and on volumes
    (``(n, x, y, z)`` or ``(n, channels, x, y, z)`` arrays).

    Parameters
    ----------
    n_components : int, default=8
        Dimension of the latent space.
{_COMMON_PARAMETERS}
    beta : float, default=1.0
        Weight of the KL term; 1 gives the ELBO.

    Attributes
    ----------{_VAE_ATTRIBUTES}{_COMMON_ATTRIBUTES}

    See Also
    --------
    BetaVAE : KL weights above one, schedules and controlled capacity.
    sklearn.decomposition.PCA : The linear baseline.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from neurovae import VAE
    >>> X = load_digits().data / 16.0
    >>> vae = VAE(n_components=4, max_iter=5, random_state=0).fit(X)
    >>> vae.transform(X).shape
    (1797, 4)
    >>> vae.inverse_transform(vae.transform(X[:3])).shape
    (3, 64)
    >>> vae.get_feature_names_out()[:2].tolist()
    ['vae0', 'vae1']
    """

    def __init__(
        self,
        n_components=8,
        *,
        backbone="auto",
        hidden_layer_sizes=(256, 128),
        channels=(16, 32, 64),
        likelihood="gaussian",
        likelihood_scale="global",
        beta=1.0,
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
        self.backbone = backbone
        self.hidden_layer_sizes = hidden_layer_sizes
        self.channels = channels
        self.likelihood = likelihood
        self.likelihood_scale = likelihood_scale
        self.beta = beta
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

    def _build_module(self, sample_shape, stats) -> VAEModule:
        return self._vae_module(sample_shape, stats)

    def _schedules(self) -> dict[str, Schedule]:
        return {"beta": Constant(self.beta)}


class BetaVAE(VAE):
    __doc__ = f"""β-VAE: a VAE with a heavier, optionally scheduled, KL term.

    The disentanglement model of Higgins et al. (2017): ``beta > 1`` presses
    the posterior towards the factorised prior. The KL weight can follow a
    schedule (linear warm-up, or cyclical annealing as in Fu et al. 2019),
    or be replaced by controlled capacity (Burgess et al. 2018): the objective
    ``recon + gamma * |KL - C|`` with the target ``C`` rising linearly from 0
    to ``capacity`` nats over ``capacity_iter`` epochs (by default, the whole
    training).

    Parameters
    ----------
    n_components : int, default=8
        Dimension of the latent space.
{_COMMON_PARAMETERS}
    beta : float, default=4.0
        Weight of the KL term (its final value under a schedule).
    beta_schedule : {{"constant", "linear", "cyclical"}}, default="constant"
        "linear" ramps the weight from 0 to ``beta`` over ``warmup_iter``
        epochs; "cyclical" repeats ``n_cycles`` ramps over ``max_iter``
        epochs, each rising over the first half of its cycle.
    warmup_iter : int, default=10
        Epochs of the linear ramp of ``beta``.
    n_cycles : int, default=4
        Number of cycles of the "cyclical" schedule.
    capacity : float or None, default=None
        Final KL target in nats; when set, ``beta`` and ``beta_schedule`` are
        not used.
    capacity_iter : int or None, default=None
        Epochs over which the KL target rises from 0 to ``capacity``; None
        spreads the rise over the whole training (``max_iter``), as in
        Burgess et al.
    gamma : float, default=100.0
        Weight of ``|KL - C|`` under controlled capacity.

    Attributes
    ----------{_VAE_ATTRIBUTES}{_COMMON_ATTRIBUTES}

    See Also
    --------
    VAE : The plain VAE (``beta=1``).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from neurovae import BetaVAE
    >>> X = load_digits().data / 16.0
    >>> model = BetaVAE(n_components=4, beta=4.0, beta_schedule="linear",
    ...                 warmup_iter=2, max_iter=4, random_state=0).fit(X)
    >>> [round(b, 2) for b in model.history_["beta"]]
    [1.78, 3.78, 4.0, 4.0]
    >>> model.get_feature_names_out()[:2].tolist()
    ['betavae0', 'betavae1']
    """

    _parameter_rules = {
        **VAE._parameter_rules,
        "beta_schedule": Options(("constant", "linear", "cyclical")),
        "warmup_iter": Interval(int, 1),
        "n_cycles": Interval(int, 1),
        "capacity": Interval(float, 0.0, none_ok=True),
        "capacity_iter": Interval(int, 1, none_ok=True),
        "gamma": Interval(float, 0.0),
    }

    def __init__(
        self,
        n_components=8,
        *,
        backbone="auto",
        hidden_layer_sizes=(256, 128),
        channels=(16, 32, 64),
        likelihood="gaussian",
        likelihood_scale="global",
        beta=4.0,
        beta_schedule="constant",
        warmup_iter=10,
        n_cycles=4,
        capacity=None,
        capacity_iter=None,
        gamma=100.0,
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
        super().__init__(
            n_components,
            backbone=backbone,
            hidden_layer_sizes=hidden_layer_sizes,
            channels=channels,
            likelihood=likelihood,
            likelihood_scale=likelihood_scale,
            beta=beta,
            optimizer=optimizer,
            learning_rate_init=learning_rate_init,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            batch_size=batch_size,
            max_iter=max_iter,
            early_stopping=early_stopping,
            validation_fraction=validation_fraction,
            n_iter_no_change=n_iter_no_change,
            tol=tol,
            device=device,
            precision=precision,
            random_state=random_state,
            verbose=verbose,
            warm_start=warm_start,
            mask_img=mask_img,
            scaling=scaling,
            num_workers=num_workers,
            checkpoint_dir=checkpoint_dir,
            distributed=distributed,
        )
        self.beta_schedule = beta_schedule
        self.warmup_iter = warmup_iter
        self.n_cycles = n_cycles
        self.capacity = capacity
        self.capacity_iter = capacity_iter
        self.gamma = gamma

    def _schedules(self) -> dict[str, Schedule]:
        if self.capacity is not None:
            return {
                "capacity": Linear(
                    self.capacity, warmup_iter=self.capacity_iter or self.max_iter
                ),
                "gamma": Constant(self.gamma),
            }
        return {"beta": self._beta_schedule()}
