"""A very deep hierarchical VAE in 3-D (Child 2021, "Very Deep VAEs").

The model follows openai/vdvae as streamlined for 3-D neuroimaging by Gray,
Graham, Cardoso et al.: a bottom-up encoder of residual bottleneck blocks
keeps its activation at every resolution; a top-down decoder starts from a
learned constant at the coarsest resolution and, group after group, draws a
latent volume from the posterior q(z_g | z_<g, x) (training, evaluation) or
the prior p(z_g | z_<g) (generation, and in training the samples that go
through the global latent alone), adds its projection to the top-down
state and refines the state with a residual block. Small modules, one idea
per block:

* :class:`BottleneckBlock3d` -- act, 1x1, kxkxk, kxkxk, 1x1 conv, residual add;
* :class:`TopDownBlock3d` -- one latent group: prior head, posterior head,
  sampling, KL, projection of z and a residual block;
* :func:`kl_diagonal_gaussians` -- the closed-form KL between the two.
* ``_GlobalLatent`` -- an optional latent vector above the coarsest grid,
  whose prior can be fitted to the training posteriors after training.

Orders used throughout: lists of the constructor have one entry per
resolution, **highest resolution first** (resolution ``K`` has sides
``input_shape / 2**K``); latent groups are numbered in **top-down order**
(coarsest resolution first), as :meth:`VeryDeepVAEModule.encode` returns
them; ``kl_levelK`` is the KL of the groups at resolution ``K`` (so
``kl_level0`` is the highest resolution).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from neurovae.nn.latent import LOGVAR_MAX, LOGVAR_MIN
from neurovae.nn.noise import standard_normal

# Bounds on the log standard deviations of the posterior and prior: those of
# the single-level model's log-variance, halved.
LOGSTD_MIN = 0.5 * LOGVAR_MIN
LOGSTD_MAX = 0.5 * LOGVAR_MAX

_ACTIVATIONS = {"gelu": nn.GELU, "silu": nn.SiLU}

# A noise source: called with a shape, returns standard-normal noise of it.
Noise = Callable[[tuple[int, ...]], torch.Tensor]


def _activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; use one of {sorted(_ACTIVATIONS)}"
        ) from None


def kl_diagonal_gaussians(
    q_mean: torch.Tensor,
    q_logstd: torch.Tensor,
    p_mean: torch.Tensor,
    p_logstd: torch.Tensor,
) -> torch.Tensor:
    """KL(q || p) of two diagonal Gaussians, summed over all but the batch axis.

    Parameters
    ----------
    q_mean, q_logstd : torch.Tensor of shape (n, ...)
        Mean and log standard deviation of q.
    p_mean, p_logstd : torch.Tensor of shape (n, ...)
        Mean and log standard deviation of p.

    Returns
    -------
    torch.Tensor of shape (n,)
        The divergence of each sample, in nats, computed in float32 at least.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import kl_diagonal_gaussians
    >>> zero = torch.zeros(2, 3)
    >>> kl_diagonal_gaussians(zero, zero, zero, zero)  # q equals p
    tensor([0., 0.])
    >>> kl_diagonal_gaussians(torch.ones(1, 3), zero[:1], zero[:1], zero[:1])
    tensor([1.5000])
    """
    dtype = torch.promote_types(q_mean.dtype, torch.float32)
    q_mean, q_logstd = q_mean.to(dtype), q_logstd.to(dtype)
    p_mean, p_logstd = p_mean.to(dtype), p_logstd.to(dtype)
    ratio = torch.exp(2.0 * (q_logstd - p_logstd))
    distance = ((q_mean - p_mean) * torch.exp(-p_logstd)).pow(2)
    kl = p_logstd - q_logstd + 0.5 * (ratio + distance) - 0.5
    return kl.flatten(1).sum(dim=1)


def _posterior_draw(
    q_mean: torch.Tensor, q_logstd: torch.Tensor, noise: Noise | None
) -> torch.Tensor:
    """A draw of a diagonal Gaussian posterior (its mean without ``noise``)."""
    if noise is None:
        return q_mean
    return q_mean + torch.exp(q_logstd) * noise(tuple(q_mean.shape))


class _SameConv3d(nn.Conv3d):
    """A stride-1 convolution whose output keeps its input's grid, for any
    kernel size: odd kernels pad symmetrically, even ones pad one voxel more
    at the end of each axis than at the start (as ``padding="same"``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        odd = kernel_size % 2 == 1
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            padding=kernel_size // 2 if odd else 0,
        )
        self._pad = None if odd else ((kernel_size - 1) // 2, kernel_size // 2) * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._pad is not None:
            x = F.pad(x, self._pad)
        return super().forward(x)


class BottleneckBlock3d(nn.Module):
    """Residual bottleneck of VDVAE: (act, conv) x 4 with 1x1, k, k, 1x1 kernels.

    Parameters
    ----------
    in_channels : int
        Channels of the input.
    hidden_channels : int
        Width of the bottleneck (the two middle convolutions).
    out_channels : int
        Channels of the output; must equal ``in_channels`` when ``residual``.
    kernel_size : int, default=3
        Kernel size of the two middle convolutions (1 makes the block purely
        channel-wise, the cheap choice at high resolution). The output keeps
        the input's grid; an even size pads one voxel more at the end of
        each axis than at the start.
    residual : bool, default=True
        Add the input to the output.
    zero_last : bool, default=False
        Initialise the last convolution to zero (the block then outputs zero,
        or the identity when residual).
    last_scale : float, default=1.0
        Factor applied to the last convolution's initial weights, typically
        ``1 / sqrt(number of blocks)`` so that a deep stack stays stable.
    activation : {"gelu", "silu"}, default="gelu"
        Activation before each convolution.

    Attributes
    ----------
    gradient_checkpointing : bool
        Recompute the block's activations in the backward pass instead of
        storing them (only in training mode with gradients enabled).

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import BottleneckBlock3d
    >>> block = BottleneckBlock3d(8, 4, 8, kernel_size=3)
    >>> block(torch.zeros(2, 8, 4, 4, 4)).shape
    torch.Size([2, 8, 4, 4, 4])
    >>> head = BottleneckBlock3d(8, 4, 6, residual=False, zero_last=True)
    >>> bool(head(torch.randn(2, 8, 4, 4, 4)).eq(0).all())  # starts at zero
    True
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        residual: bool = True,
        zero_last: bool = False,
        last_scale: float = 1.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError(
                "a residual block needs in_channels == out_channels, got "
                f"{in_channels} and {out_channels}"
            )
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.residual = residual
        self.gradient_checkpointing = False
        self.act = _activation(activation)
        self.convs = nn.ModuleList(
            [
                nn.Conv3d(in_channels, hidden_channels, 1),
                _SameConv3d(hidden_channels, hidden_channels, kernel_size),
                _SameConv3d(hidden_channels, hidden_channels, kernel_size),
                nn.Conv3d(hidden_channels, out_channels, 1),
            ]
        )
        last = self.convs[-1]
        if zero_last:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        else:
            with torch.no_grad():
                last.weight.mul_(last_scale)

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(self.act(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            out = checkpoint(self._branch, x, use_reentrant=False)
        else:
            out = self._branch(x)
        return x + out if self.residual else out


class TopDownBlock3d(nn.Module):
    """One latent group of the top-down decoder.

    From the top-down state ``h``, the prior head gives ``(p_mean, p_logstd,
    h_residual)``; from ``concat(h, encoder activation)`` the posterior head
    gives ``(q_mean, q_logstd)``. A latent ``z`` is drawn (from q when the
    activation is given, else from p with its standard deviation scaled by
    ``temperature``), then ``h <- resblock(h + h_residual + conv1x1(z))``.
    The prior head's last convolution starts at zero, so the prior starts as
    N(0, I) and ``h_residual`` as 0. The first group of the model has no prior
    head: its prior is N(0, I).

    Parameters
    ----------
    channels : int
        Width of the top-down state (and of the encoder activation).
    hidden_channels : int
        Bottleneck width of the heads and of the residual block.
    latent_channels : int
        Channels of the latent volume ``z`` (same grid as ``h``).
    kernel_size : int, default=3
        Middle kernel size of the heads and of the residual block.
    last_scale : float, default=1.0
        Initial scale of the projection of ``z`` and of the residual block's
        last convolution (``1 / sqrt(number of decoder blocks)``).
    first : bool, default=False
        The first group: no prior head, p = N(0, I).
    activation : {"gelu", "silu"}, default="gelu"
        Activation of the blocks.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import TopDownBlock3d
    >>> block = TopDownBlock3d(channels=8, hidden_channels=4, latent_channels=2)
    >>> h, act = torch.zeros(3, 8, 4, 4, 4), torch.randn(3, 8, 4, 4, 4)
    >>> h, group = block(h, act, noise=torch.randn)  # a posterior draw
    >>> h.shape, group["z"].shape, group["kl"].shape
    (torch.Size([3, 8, 4, 4, 4]), torch.Size([3, 2, 4, 4, 4]), torch.Size([3]))
    >>> int(group["p_logstd"].count_nonzero())  # zero-initialised prior head
    0
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        latent_channels: int,
        kernel_size: int = 3,
        last_scale: float = 1.0,
        first: bool = False,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.latent_channels = latent_channels
        self.posterior = BottleneckBlock3d(
            2 * channels,
            hidden_channels,
            2 * latent_channels,
            kernel_size,
            residual=False,
            activation=activation,
        )
        self.prior = (
            None
            if first
            else BottleneckBlock3d(
                channels,
                hidden_channels,
                2 * latent_channels + channels,
                kernel_size,
                residual=False,
                zero_last=True,
                activation=activation,
            )
        )
        self.z_proj = nn.Conv3d(latent_channels, channels, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(last_scale)
        self.resnet = BottleneckBlock3d(
            channels,
            hidden_channels,
            channels,
            kernel_size,
            last_scale=last_scale,
            activation=activation,
        )

    def prior_params(
        self, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(p_mean, p_logstd, h_residual)``; ``h_residual`` is None if first."""
        if self.prior is None:
            zeros = h.new_zeros((h.shape[0], self.latent_channels, *h.shape[2:]))
            return zeros, zeros, None
        feats = self.prior(h)
        z2 = 2 * self.latent_channels
        p_mean, p_logstd = feats[:, :z2].chunk(2, dim=1)
        return p_mean, p_logstd.clamp(LOGSTD_MIN, LOGSTD_MAX), feats[:, z2:]

    def posterior_params(
        self, h: torch.Tensor, act: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_mean, q_logstd)`` of q(z | h, encoder activation)."""
        q_mean, q_logstd = self.posterior(torch.cat([h, act], dim=1)).chunk(2, dim=1)
        return q_mean, q_logstd.clamp(LOGSTD_MIN, LOGSTD_MAX)

    def forward(
        self,
        h: torch.Tensor,
        act: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        noise: Noise | None = None,
        temperature: float = 1.0,
        closed: bool = False,
        prior_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Update the top-down state with one latent group.

        Parameters
        ----------
        h : torch.Tensor of shape (n, channels, x, y, z)
            Top-down state.
        act : torch.Tensor of shape (n, channels, x, y, z), optional
            Encoder activation: z is drawn from the posterior and the KL is
            computed. None draws z from the prior.
        z : torch.Tensor of shape (n, latent_channels, x, y, z), optional
            Use this latent instead of drawing one.
        noise : callable, optional
            ``noise(shape)`` returns the standard-normal noise of a draw; None
            uses the mean of the distribution.
        temperature : float, default=1.0
            Factor on the prior standard deviation (prior draws only).
        closed : bool, default=False
            With ``act``: pass no information. z is the prior mean (unless
            given), ``q_mean`` and ``q_logstd`` are the prior's and the KL is
            0; the posterior head still runs (its KL enters the graph at
            weight 0, so that every parameter takes part in the loss, as
            distributed training needs).
        prior_rows : torch.Tensor of bool, shape (n,), optional
            With ``act``: the samples whose posterior is replaced by the
            prior (q = p, KL 0), so that their z is a prior draw (with
            ``noise``) that the decoder has to make the best of.

        Returns
        -------
        h : torch.Tensor
            The updated state.
        group : dict of torch.Tensor
            ``z``, ``p_mean``, ``p_logstd`` and, with ``act``, ``q_mean``,
            ``q_logstd`` and the per-sample ``kl`` of shape ``(n,)``.
        """
        p_mean, p_logstd, h_residual = self.prior_params(h)
        group = {"p_mean": p_mean, "p_logstd": p_logstd}
        if act is not None:
            q_mean, q_logstd = self.posterior_params(h, act)
            kl = kl_diagonal_gaussians(q_mean, q_logstd, p_mean, p_logstd)
            if closed:
                z = p_mean if z is None else z
                q_mean, q_logstd, kl = p_mean, p_logstd, 0.0 * kl
            else:
                if prior_rows is not None:
                    rows = prior_rows.view(-1, *([1] * (q_mean.dim() - 1)))
                    q_mean = torch.where(rows, p_mean.to(q_mean.dtype), q_mean)
                    q_logstd = torch.where(rows, p_logstd.to(q_logstd.dtype), q_logstd)
                    kl = kl.masked_fill(prior_rows, 0.0)
                if z is None:
                    z = _posterior_draw(q_mean, q_logstd, noise)
            group.update(q_mean=q_mean, q_logstd=q_logstd, kl=kl)
        elif z is None:
            z = p_mean
            if noise is not None and temperature != 0:
                eps = noise(tuple(p_mean.shape))
                z = z + temperature * torch.exp(p_logstd) * eps
        group["z"] = z
        if h_residual is not None:
            h = h + h_residual
        h = self.resnet(h + self.z_proj(z.to(h.dtype)))
        return h, group


class _GlobalLatent(nn.Module):
    """A global latent vector above the coarsest grid.

    Its posterior comes from the coarsest encoder activation (flattened, one
    linear layer); a draw is mapped by a second linear layer to a volume
    added to the learned constant that starts the top-down state, so that the
    first spatial group already knows where things are. Its prior is
    ``N(prior_mean, prior_scale_tril @ prior_scale_tril.T)``: the standard
    normal until :meth:`fit_prior` replaces it by the Gaussian that best fits
    the training posteriors.

    Parameters
    ----------
    n_features : int
        Size of the coarsest encoder activation and of the top-down state
        (``channels * x * y * z`` at the coarsest resolution).
    dim : int
        Dimension of the latent vector.
    """

    def __init__(self, n_features: int, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.posterior = nn.Linear(n_features, 2 * self.dim)
        self.proj = nn.Linear(self.dim, n_features)
        self.register_buffer("prior_mean", torch.zeros(self.dim))
        self.register_buffer("prior_scale_tril", torch.eye(self.dim))

    def posterior_params(self, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q_mean, q_logstd)`` of q(z | coarsest encoder activation)."""
        q_mean, q_logstd = self.posterior(act.flatten(1)).chunk(2, dim=1)
        return q_mean, q_logstd.clamp(LOGSTD_MIN, LOGSTD_MAX)

    def kl(self, q_mean: torch.Tensor, q_logstd: torch.Tensor) -> torch.Tensor:
        """KL(q || prior) per sample, for a diagonal q and the full prior."""
        dtype = torch.promote_types(q_mean.dtype, torch.float32)
        tril = self.prior_scale_tril.to(dtype)
        q_mean, q_logstd = q_mean.to(dtype), q_logstd.to(dtype)
        # L^-1 (m - mu) and L^-1 diag(s): Mahalanobis distance and trace term
        diff = torch.linalg.solve_triangular(
            tril, (q_mean - self.prior_mean.to(dtype)).T, upper=False
        )
        spread = torch.linalg.solve_triangular(
            tril, torch.diag_embed(torch.exp(q_logstd)), upper=False, left=True
        )
        log_det = 2.0 * torch.log(torch.diagonal(tril)).sum()
        return 0.5 * (
            spread.pow(2).sum(dim=(1, 2))
            + diff.pow(2).sum(dim=0)
            - self.dim
            + log_det
            - 2.0 * q_logstd.sum(dim=1)
        )

    def prior_draw(
        self, n: int, noise: Noise | None, temperature: float
    ) -> torch.Tensor:
        """``n`` draws from the prior (its mean without ``noise`` or at T=0)."""
        z = self.prior_mean.expand(n, self.dim)
        if noise is not None and temperature != 0:
            eps = noise((n, self.dim)).to(z.dtype)
            z = z + temperature * eps @ self.prior_scale_tril.to(z.dtype).T
        return z

    @torch.no_grad()
    def fit_prior(
        self, n: float, total: torch.Tensor, outer: torch.Tensor, variance: torch.Tensor
    ) -> None:
        """Set the prior to the Gaussian closest to the training posteriors.

        The maximum-likelihood Gaussian of the aggregate posterior (the
        mixture of the posteriors of ``n`` training samples): its mean is
        the mean of the posterior means (``total / n``) and its covariance
        the covariance of the means (from ``outer``, the sum of their outer
        products) plus the average posterior variance (``variance / n``,
        the sum of the variances).
        """
        mean = total / n
        cov = outer / n - torch.outer(mean, mean) + torch.diag(variance / n)
        cov = 0.5 * (cov + cov.T) + 1e-6 * torch.eye(
            self.dim, dtype=cov.dtype, device=cov.device
        )
        self.prior_mean.copy_(mean)
        self.prior_scale_tril.copy_(torch.linalg.cholesky(cov))

    @torch.no_grad()
    def reset_prior(self) -> None:
        """Back to the standard normal prior."""
        self.prior_mean.zero_()
        self.prior_scale_tril.copy_(torch.eye(self.dim))


def _as_list(name: str, values, n: int | None) -> list[int]:
    values = [int(v) for v in (values if isinstance(values, Sequence) else [values])]
    if n is not None and len(values) != n:
        raise ValueError(
            f"{name} has {len(values)} entries but channels has {n}; give one "
            "entry per resolution (highest resolution first)"
        )
    return values


class VeryDeepVAEModule(nn.Module):
    """A very deep hierarchical VAE for 3-D volumes (VDVAE, Child 2021).

    Bottom-up: a 3x3x3 stem, then at each resolution (highest first)
    ``n_blocks_per_resolution`` :class:`BottleneckBlock3d` whose activation is
    kept, and an average pooling by 2 (with a 1x1 conv where the width
    changes). Top-down: a learned constant at the coarsest resolution (plus
    the projection of the global latent, with ``global_latent_dim``), then
    at each resolution (coarsest first) its :class:`TopDownBlock3d` latent
    groups (or ``n_blocks_per_resolution`` plain blocks if it has none), and
    a nearest upsampling by 2 (after a 1x1 conv where the width changes);
    an output convolution gives the likelihood's parameters.

    The training engine calls :meth:`loss` (also ``forward``) with a batch
    ``(x,)``; ``"loss"`` is ``recon + beta * kl`` averaged over the batch.

    Parameters
    ----------
    in_channels : int
        Channels of the input volumes (1 for a scalar image).
    input_shape : tuple of int
        ``(x, y, z)``. Sides that are not multiples of
        ``2**(n_resolutions - 1)`` are zero-padded (centred) to the next
        multiple in the encoder, and the decoder's output is cropped back;
        the likelihood sees the original grid only.
    channels : sequence of int
        Width of the residual stream at each resolution, highest first; its
        length is the number of resolutions.
    channels_hidden : sequence of int
        Bottleneck width of the blocks at each resolution.
    channels_per_latent : sequence of int
        Channels of the latent groups at each resolution.
    latents_per_resolution : sequence of int
        Number of latent groups at each resolution (0 allowed; at least one
        group in all).
    kernel_sizes : sequence of int
        Kernel size of the middle convolutions at each resolution (even sizes
        pad one voxel more at the end of each axis).
    likelihood : nn.Module
        Observation model with ``log_prob(x, out)`` and ``mean(out)``.
    n_blocks_per_resolution : int, default=2
        Residual blocks per resolution in the encoder (and in the decoder at a
        resolution without latent groups).
    out_channels : int, optional
        Channels of the decoder output (the likelihood's parameters);
        defaults to ``in_channels`` (the mean, or the logits).
    activation : {"gelu", "silu"}, default="gelu"
        Activation of the blocks.
    gradient_checkpointing : bool, default=False
        Recompute the blocks' activations in the backward pass (less memory,
        about a third more compute); also settable afterwards.
    global_latent_dim : int, default=0
        Size of a global latent vector above the coarsest grid (0: none).
        Its posterior is a linear map of the whole coarsest encoder
        activation; a draw, mapped linearly to a volume, is added to the
        learned constant that starts the top-down state. Its prior is the
        standard normal until :meth:`fit_global_prior` fits one (full
        covariance). With it, every spatial group has a learned prior.

    Attributes
    ----------
    n_latent_groups : int
        Number of latent groups.
    level_of_group : list of int
        Resolution of each group (groups in top-down order, coarsest first).
    latent_shapes : list of tuple of int
        ``(channels, x, y, z)`` of each group's latent volume.
    generator : torch.Generator or None
        Source of the training-mode noise (on the module's device).
    eval_seed : int
        Seed of the fixed noise used in eval mode: every call draws the same
        standard-normal volume per group (one, shared by the samples of the
        batch), so that :meth:`elbo` and the validation loss are
        deterministic and a sample's value does not depend on its batch.
    beta : float
        Weight of the KL term (for warm-up).
    spatial_open : float
        In training mode with a global latent, a value below 1 closes the
        spatial groups: they take their prior means and add no KL, so only
        the global latent carries information (1: open; scheduled by the
        estimator for its first epochs).
    global_only_fraction : float
        In training mode with a global latent and open spatial groups, the
        probability with which each sample of a batch draws its spatial
        groups from their priors instead of their posteriors (q = p, no
        KL): for those samples only the global latent carries information, and the
        decoder learns to render a volume from it and prior draws, as in
        sampling. 0 (the module's default) turns it off.
    global_latent : module or None
        The global latent (``posterior``, ``proj``, and the buffers
        ``prior_mean`` and ``prior_scale_tril``), or None.
    fitted_after_training : tuple of str
        The state-dict names of the buffers fitted once training has ended
        (the global latent's prior), which a checkpoint's final weights do
        not hold yet; empty without a global latent.

    Notes
    -----
    The initial last-layer scale is ``1 / sqrt(number of blocks)``, counted
    separately in the encoder and in the decoder (as in openai/vdvae).

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import VeryDeepVAEModule, make_likelihood
    >>> vae = VeryDeepVAEModule(
    ...     1, (8, 8, 8), channels=(8, 8), channels_hidden=(4, 4),
    ...     channels_per_latent=(1, 2), latents_per_resolution=(1, 2),
    ...     kernel_sizes=(1, 3), likelihood=make_likelihood("gaussian", (1, 8, 8, 8)),
    ... )
    >>> vae.n_latent_groups, vae.level_of_group  # coarsest groups first
    (3, [1, 1, 0])
    >>> x = torch.randn(2, 1, 8, 8, 8)
    >>> sorted(vae.loss((x,)))
    ['kl', 'kl_level0', 'kl_level1', 'loss', 'recon']
    >>> [tuple(z.shape) for z in vae.encode(x)]
    [(2, 2, 4, 4, 4), (2, 2, 4, 4, 4), (2, 1, 8, 8, 8)]
    >>> vae.sample(3, temperature=0.5).shape
    torch.Size([3, 1, 8, 8, 8])
    >>> vae.eval().elbo(x).shape
    torch.Size([2])
    """

    def __init__(
        self,
        in_channels: int,
        input_shape: Sequence[int],
        channels: Sequence[int],
        channels_hidden: Sequence[int],
        channels_per_latent: Sequence[int],
        latents_per_resolution: Sequence[int],
        kernel_sizes: Sequence[int],
        likelihood: nn.Module,
        *,
        n_blocks_per_resolution: int = 2,
        out_channels: int | None = None,
        activation: str = "gelu",
        gradient_checkpointing: bool = False,
        global_latent_dim: int = 0,
    ) -> None:
        super().__init__()
        channels = _as_list("channels", channels, None)
        n = len(channels)
        if n == 0:
            raise ValueError("channels needs at least one entry (one resolution)")
        hidden = _as_list("channels_hidden", channels_hidden, n)
        per_latent = _as_list("channels_per_latent", channels_per_latent, n)
        n_latents = _as_list("latents_per_resolution", latents_per_resolution, n)
        kernels = _as_list("kernel_sizes", kernel_sizes, n)
        for name, values in [
            ("channels", channels),
            ("channels_hidden", hidden),
            ("channels_per_latent", per_latent),
        ]:
            if min(values) < 1:
                raise ValueError(f"{name} must be positive, got {values}")
        if min(n_latents) < 0 or sum(n_latents) < 1:
            raise ValueError(
                "latents_per_resolution must be >= 0 with at least one group in "
                f"all, got {n_latents}"
            )
        if min(kernels) < 1:
            raise ValueError(f"kernel_sizes must be >= 1, got {kernels}")
        if n_blocks_per_resolution < 1:
            raise ValueError(
                f"n_blocks_per_resolution must be >= 1, got {n_blocks_per_resolution}"
            )
        if global_latent_dim < 0:
            raise ValueError(f"global_latent_dim must be >= 0, got {global_latent_dim}")
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (x, y, z), got {input_shape}")
        factor = 2 ** (n - 1)
        # sides are zero-padded (centred) up to a multiple of 2**(n - 1) and
        # outputs cropped back, so that any grid works (91 x 109 x 91 included)
        padded = tuple(-(-side // factor) * factor for side in input_shape)
        self.in_channels = int(in_channels)
        self.input_shape = input_shape
        self.padded_shape = padded
        self._pad = []
        for side, size in zip(reversed(input_shape), reversed(padded)):
            before = (size - side) // 2
            self._pad += [before, size - side - before]
        self._crop = tuple(
            slice(p0, p0 + side)
            for side, p0 in zip(input_shape, reversed(self._pad[::2]))
        )
        input_shape = padded
        self.shapes = [tuple(s // 2**r for s in input_shape) for r in range(n)]
        self.n_resolutions = n
        spatial = [r for r in reversed(range(n)) for _ in range(n_latents[r])]
        self.global_latent_dim = int(global_latent_dim)
        # the global latent counts as level n: one above the coarsest grid
        has_global = self.global_latent_dim > 0
        self.level_of_group = [n] * has_global + spatial
        self.n_latent_groups = len(self.level_of_group)
        self.latent_shapes = [(self.global_latent_dim,)] * has_global + [
            (per_latent[r], *self.shapes[r]) for r in spatial
        ]
        out_channels = self.in_channels if out_channels is None else int(out_channels)

        nb = int(n_blocks_per_resolution)
        enc_scale = 1.0 / math.sqrt(n * nb)
        n_dec = sum(n_latents[r] if n_latents[r] else nb for r in range(n))
        dec_scale = 1.0 / math.sqrt(n_dec)

        def block(r: int, scale: float) -> BottleneckBlock3d:
            return BottleneckBlock3d(
                channels[r],
                hidden[r],
                channels[r],
                kernels[r],
                last_scale=scale,
                activation=activation,
            )

        def width_conv(c_in: int, c_out: int) -> nn.Module:
            return nn.Identity() if c_in == c_out else nn.Conv3d(c_in, c_out, 1)

        # Bottom-up encoder.
        self.stem = nn.Conv3d(self.in_channels, channels[0], 3, padding=1)
        self.enc_blocks = nn.ModuleList(
            nn.ModuleList(block(r, enc_scale) for _ in range(nb)) for r in range(n)
        )
        self.enc_down = nn.ModuleList(
            width_conv(channels[r], channels[r + 1]) for r in range(n - 1)
        )

        # Top-down decoder, indexed by resolution like the encoder.
        self.h_top = nn.Parameter(torch.zeros(1, channels[-1], *self.shapes[-1]))
        self.global_latent = (
            _GlobalLatent(channels[-1] * math.prod(self.shapes[-1]), global_latent_dim)
            if has_global
            else None
        )
        # the first spatial group has the standard normal prior, unless the
        # global latent is above it
        top = -1 if has_global else max(r for r in range(n) if n_latents[r])
        self.dec_groups = nn.ModuleList(
            nn.ModuleList(
                TopDownBlock3d(
                    channels[r],
                    hidden[r],
                    per_latent[r],
                    kernels[r],
                    last_scale=dec_scale,
                    first=(r == top and g == 0),
                    activation=activation,
                )
                for g in range(n_latents[r])
            )
            for r in range(n)
        )
        self.dec_blocks = nn.ModuleList(
            nn.ModuleList(block(r, dec_scale) for _ in range(0 if n_latents[r] else nb))
            for r in range(n)
        )
        self.dec_up = nn.ModuleList(
            width_conv(channels[r + 1], channels[r]) for r in range(n - 1)
        )
        self.out_conv = nn.Sequential(
            _activation(activation),
            _SameConv3d(channels[0], out_channels, kernels[0]),
        )
        self.likelihood = likelihood

        self.generator: torch.Generator | None = None
        self.eval_seed = 0
        self.beta = 1.0
        self.spatial_open = 1.0
        self.global_only_fraction = 0.0
        self.gradient_checkpointing = gradient_checkpointing

    # -- configuration -----------------------------------------------------
    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the residual blocks recompute activations when training."""
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self._gradient_checkpointing = bool(value)
        for module in self.modules():
            if isinstance(module, BottleneckBlock3d):
                module.gradient_checkpointing = bool(value)

    def _device(self) -> torch.device:
        return self.h_top.device

    def _noise(self, generator: torch.Generator | None = None) -> Noise:
        """The noise source of the current mode (see :attr:`eval_seed`)."""
        device, dtype = self._device(), self.h_top.dtype
        if self.training:
            generator = self.generator if generator is None else generator

            def draw(shape):
                # the global batch's noise, this rank's rows, under DDP
                return standard_normal(shape, generator, device=device, dtype=dtype)

            return draw
        fixed = torch.Generator(device=device).manual_seed(int(self.eval_seed))

        def draw_fixed(shape):
            one = torch.randn(
                (1, *shape[1:]), generator=fixed, device=device, dtype=dtype
            )
            return one.expand(shape)

        return draw_fixed

    # -- the two passes ----------------------------------------------------
    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder activations at each resolution, highest resolution first."""
        if tuple(x.shape[1:]) != (self.in_channels, *self.input_shape):
            raise ValueError(
                f"expected volumes of shape {(self.in_channels, *self.input_shape)}"
                f", got {tuple(x.shape[1:])}"
            )
        if any(self._pad):
            x = F.pad(x, self._pad)
        h = self.stem(x)
        acts = []
        for r, blocks in enumerate(self.enc_blocks):
            for block in blocks:
                h = block(h)
            acts.append(h)
            if r < self.n_resolutions - 1:
                h = self.enc_down[r](F.avg_pool3d(h, 2))
        return acts

    def top_down(
        self,
        n: int,
        acts: list[torch.Tensor] | None = None,
        zs: Sequence[torch.Tensor] | None = None,
        noise: Noise | None = None,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """Run the decoder; return its raw output and one dict per group.

        Parameters
        ----------
        n : int
            Batch size.
        acts : list of torch.Tensor, optional
            Encoder activations (:meth:`bottom_up`): latents come from the
            posterior. None: from the prior.
        zs : sequence of torch.Tensor, optional
            Latents of the first ``len(zs)`` groups (top-down order), used
            as given; the others are drawn.
        noise : callable, optional
            Standard-normal noise source; None takes the means.
        temperature : float, default=1.0
            Factor on the prior standard deviation.

        Returns
        -------
        out : torch.Tensor
            Raw decoder output (the likelihood's parameters).
        groups : list of dict
            What :meth:`TopDownBlock3d.forward` returns, per group.
        """
        zs = list(zs) if zs is not None else []
        if len(zs) > self.n_latent_groups:
            raise ValueError(
                f"got {len(zs)} latents for {self.n_latent_groups} latent groups"
            )
        for g, z in enumerate(zs):
            if tuple(z.shape[1:]) != self.latent_shapes[g]:
                raise ValueError(
                    f"latent {g} must have shape (n, *{self.latent_shapes[g]}), "
                    f"got {tuple(z.shape)}"
                )
        h = self.h_top.expand(n, *self.h_top.shape[1:])
        groups: list[dict[str, torch.Tensor]] = []
        if self.global_latent is not None:
            group = self._global_group(
                n, acts, zs[0] if zs else None, noise, temperature
            )
            groups.append(group)
            h = h + self.global_latent.proj(group["z"].to(h.dtype)).view(h.shape)
        # while closed (the start of training), the spatial groups take their
        # prior means: all the information goes through the global latent
        closed = (
            self.training and self.spatial_open < 1 and self.global_latent is not None
        )
        prior_rows = None
        if self._global_only_rows_active(acts, noise, closed):
            prior_rows = self._draw_global_only_rows(n, noise)
        for r in reversed(range(self.n_resolutions)):
            if r < self.n_resolutions - 1:
                h = F.interpolate(self.dec_up[r](h), scale_factor=2, mode="nearest")
            for block in self.dec_groups[r]:
                g = len(groups)
                h, group = block(
                    h,
                    None if acts is None else acts[r],
                    z=zs[g] if g < len(zs) else None,
                    noise=noise,
                    temperature=temperature,
                    closed=closed,
                    prior_rows=prior_rows,
                )
                groups.append(group)
            for block in self.dec_blocks[r]:
                h = block(h)
        out = self.out_conv(h)
        if any(self._pad):
            out = out[(slice(None), slice(None), *self._crop)]
        return out, groups

    @property
    def fitted_after_training(self) -> tuple[str, ...]:
        if self.global_latent is None:
            return ()
        # the global latent's buffers are its prior, fitted by fit_global_prior
        return tuple(
            f"global_latent.{name}" for name, _ in self.global_latent.named_buffers()
        )

    def _global_only_rows_active(self, acts, noise, closed) -> bool:
        return (
            self.training
            and not closed
            and acts is not None
            and noise is not None
            and self.global_latent is not None
            and self.global_only_fraction > 0
        )

    def _draw_global_only_rows(self, n: int, noise: Noise) -> torch.Tensor:
        """A boolean mask of the ``n`` samples, each True with probability
        ``global_only_fraction``.

        Drawn from ``noise`` (a standard normal under the fraction's
        quantile), so the choice follows the training generator and, under
        DDP, the global batch.
        """
        fraction = float(self.global_only_fraction)
        u = noise((n,))
        if fraction >= 1:
            return torch.ones(n, dtype=torch.bool, device=u.device)
        return u < statistics.NormalDist().inv_cdf(fraction)

    def _global_group(self, n, acts, z, noise, temperature) -> dict:
        """The global latent's group dict (as :class:`TopDownBlock3d`'s)."""
        glob = self.global_latent
        p_mean = glob.prior_mean.expand(n, glob.dim)
        tril = glob.prior_scale_tril.expand(n, glob.dim, glob.dim)
        group = {"p_mean": p_mean, "p_scale_tril": tril}
        if acts is not None:
            q_mean, q_logstd = glob.posterior_params(acts[-1])
            if z is None:
                z = _posterior_draw(q_mean, q_logstd, noise)
            group.update(q_mean=q_mean, q_logstd=q_logstd)
            group["kl"] = glob.kl(q_mean, q_logstd)
        elif z is None:
            z = glob.prior_draw(n, noise, temperature)
        group["z"] = z
        return group

    @torch.no_grad()
    def fit_global_prior(self, batches, all_reduce=None) -> None:
        """Fit the global latent's prior to the posteriors of ``batches``.

        ``batches`` yields tuples whose first entry is a batch of volumes;
        ``all_reduce`` (optional) sums a tensor over processes, so that every
        process fits the same prior to the whole training set: the
        maximum-likelihood Gaussian of the aggregate posterior, whose mean
        is the mean of the posterior means and whose covariance is their
        covariance plus the mean posterior variance.
        """
        glob = self.global_latent
        if glob is None:
            raise ValueError("this model has no global latent")
        dim, device = glob.dim, self._device()
        # n, sum of means, sum of outer products, sum of variances: float64
        stats = torch.zeros(
            1 + dim + dim * dim + dim, dtype=torch.float64, device=device
        )
        for batch in batches:
            q_mean, q_logstd = glob.posterior_params(self.bottom_up(batch[0])[-1])
            q_mean, var = q_mean.double(), torch.exp(2 * q_logstd.double())
            stats += torch.cat(
                [
                    q_mean.new_tensor([len(q_mean)]),
                    q_mean.sum(0),
                    (q_mean.T @ q_mean).flatten(),
                    var.sum(0),
                ]
            )
        if all_reduce is not None:
            all_reduce(stats)
        n = float(stats[0])
        if n < 2:
            raise ValueError("fitting the global prior needs at least 2 samples")
        total, outer, variance = stats[1:].split([dim, dim * dim, dim])
        glob.fit_prior(n, total, outer.view(dim, dim), variance)

    # -- the VAE protocol --------------------------------------------------
    def latent_distributions(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per group: ``z`` drawn as in :meth:`loss`, q, p and the KL.

        Each dict holds ``q_mean``, ``q_logstd``, ``p_mean``, ``p_logstd``,
        ``z`` (shape ``(n, *latent_shapes[g])``) and ``kl`` (shape ``(n,)``);
        the global latent's has ``p_scale_tril`` (``(n, dim, dim)``, the
        Cholesky factor of its prior covariance) instead of ``p_logstd``.
        """
        return self.top_down(len(x), self.bottom_up(x), noise=self._noise())[1]

    def terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample negative log-likelihood ``(n,)`` and KL per group ``(n, G)``.

        Latents are posterior draws: random (from :attr:`generator`) in
        training mode, with the fixed noise of :attr:`eval_seed` in eval mode.
        In training mode the spatial groups of closed epochs
        (:attr:`spatial_open`) take their prior means, and those of the
        samples chosen by :attr:`global_only_fraction` their priors.
        """
        out, groups = self.top_down(len(x), self.bottom_up(x), noise=self._noise())
        nll = -self.likelihood.log_prob(x, out)
        return nll, torch.stack([group["kl"] for group in groups], dim=1)

    def loss(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Training objective and its terms, averaged over the batch.

        ``kl_levelK`` is the KL of the groups at resolution ``K`` (0 is the
        highest resolution; 0 for a resolution without groups), and
        ``kl_global`` the global latent's, if any.
        """
        nll, kl = self.terms(batch[0])
        kl_mean = kl.mean(dim=0)
        recon, total = nll.mean(), kl_mean.sum()
        out = {"loss": recon + self.beta * total, "recon": recon, "kl": total}
        levels = torch.tensor(self.level_of_group, device=kl.device)
        for r in range(self.n_resolutions):
            out[f"kl_level{r}"] = kl_mean[levels == r].sum()
        if self.global_latent is not None:
            out["kl_global"] = kl_mean[0]
        return out

    def forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return self.loss(batch)

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample evidence lower bound, one posterior draw (see :meth:`terms`).

        Deterministic in eval mode, and independent of the batch composition.
        """
        nll, kl = self.terms(x)
        return -(nll + kl.sum(dim=1))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Posterior means of the groups, coarsest first.

        The top-down pass takes ``z = q_mean`` at every group, so each mean is
        conditioned on the means of the groups above; deterministic in either
        mode. ``decode_latents(encode(x))`` is then a reconstruction.
        """
        groups = self.top_down(len(x), self.bottom_up(x), noise=None)[1]
        return [group["q_mean"] for group in groups]

    def decode_latents(
        self,
        zs: Sequence[torch.Tensor],
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decoder mean for the latents ``zs`` of the first ``len(zs)`` groups.

        Groups not given are drawn from the prior at ``temperature`` (the
        default 0 takes the prior means) with ``generator``.
        """
        if len(zs) == 0:
            raise ValueError("decode_latents needs at least one latent")
        noise = self._sample_noise(generator)
        out, _ = self.top_down(len(zs[0]), zs=zs, noise=noise, temperature=temperature)
        return self.likelihood.mean(out)

    def _sample_noise(self, generator: torch.Generator | None) -> Noise:
        device, dtype = self._device(), self.h_top.dtype

        def draw(shape):
            return torch.randn(shape, generator=generator, device=device, dtype=dtype)

        return draw

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decoder means of ``n`` draws from the prior (no gradients).

        ``temperature`` scales the prior standard deviations; 0 takes the
        prior means and gives the same output every call.
        """
        noise = self._sample_noise(generator)
        out, _ = self.top_down(int(n), noise=noise, temperature=temperature)
        return self.likelihood.mean(out)
