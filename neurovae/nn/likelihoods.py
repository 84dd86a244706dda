"""Observation models p(x | z) for the decoders.

Each likelihood takes the raw decoder output and returns per-sample
log-likelihoods (summed over features) and the mean of the distribution.
The Gaussian and Laplace likelihoods learn their scale (one shared value or
one per feature), bounded below so that a feature that never varies cannot
drive the log-likelihood to infinity. A Gaussian with a fixed unit variance is
deliberately not offered as a default: its reconstruction term is so weak
against the KL term that the model collapses towards the mean image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LOG_2PI = math.log(2.0 * math.pi)


def _sum_features(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample sum over features, of those inside ``mask`` when given."""
    if mask is not None:
        values = values * mask
    return values.flatten(1).sum(dim=1)


def _register_mask(module: nn.Module, mask) -> None:
    """A float 0 / 1 buffer ``mask`` (None: every feature counts)."""
    if mask is not None:
        mask = torch.as_tensor(mask).to(torch.float32)
    module.register_buffer("mask", mask)


def _inverse_softplus(y: float) -> float:
    # softplus(x) = log(1 + exp(x)); stable inverse for y > 0.
    return y + math.log(-math.expm1(-y))


class _LearnedScaleLikelihood(nn.Module):
    """Shared machinery of the location-scale likelihoods."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        scale: str = "global",
        init_scale: float = 1.0,
        min_scale: float = 1e-3,
        mask: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        _register_mask(self, mask)
        if scale not in ("global", "feature"):
            raise ValueError(f"scale must be 'global' or 'feature', got {scale!r}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be > 0, got {min_scale!r}")
        self.scale_kind = scale
        self.register_buffer("min_scale", torch.tensor(float(min_scale)))
        shape = () if scale == "global" else tuple(event_shape)
        raw = _inverse_softplus(max(float(init_scale) - min_scale, 1e-6))
        self.raw_scale = nn.Parameter(torch.full(shape, raw))

    @property
    def scale(self) -> torch.Tensor:
        """The current scale, ``softplus(raw_scale) + min_scale``."""
        return F.softplus(self.raw_scale) + self.min_scale

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) given the decoder output."""
        return out

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each sample of ``x``, summed over its features."""
        residual = x - out.float()
        return _sum_features(self._log_density(residual, self.scale), self.mask)

    def _log_density(self, residual: torch.Tensor, scale: torch.Tensor):
        """Per-feature log-density of ``x - location`` at ``scale``."""
        raise NotImplementedError


class GaussianLikelihood(_LearnedScaleLikelihood):
    """Gaussian p(x | z) = N(decoder(z), scale**2) with a learned scale.

    Parameters
    ----------
    event_shape : tuple of int
        Shape of one sample (features, or channels and voxels).
    scale : {"global", "feature"}, default="global"
        One scale shared by every feature, or one per feature (voxel).
    init_scale : float, default=1.0
        Starting value of the scale, typically the data's standard deviation.
    min_scale : float, default=1e-3
        Lower bound of the scale.
    mask : torch.Tensor, optional
        Features that count (1) and those ignored (0), broadcast to one sample
        (e.g. a brain mask of shape ``(x, y, z)``); None counts all.

    Attributes
    ----------
    scale : torch.Tensor
        The current scale, a scalar (``scale="global"``) or of shape
        ``event_shape`` (``scale="feature"``).

    See Also
    --------
    LaplaceLikelihood : Heavier tails, more robust to outlying voxels.
    make_likelihood : Build a likelihood by name.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import GaussianLikelihood
    >>> likelihood = GaussianLikelihood((2, 3), scale="feature")
    >>> likelihood.scale.shape  # one learned scale per feature
    torch.Size([2, 3])
    >>> x, out = torch.zeros(4, 2, 3), torch.zeros(4, 2, 3)
    >>> likelihood.log_prob(x, out).shape  # one value per sample
    torch.Size([4])
    >>> likelihood.mean(out) is out  # the decoder output is the mean
    True
    """

    def _log_density(self, residual: torch.Tensor, scale: torch.Tensor):
        return -0.5 * (residual / scale).pow(2) - torch.log(scale) - 0.5 * _LOG_2PI


class LaplaceLikelihood(_LearnedScaleLikelihood):
    """Laplace p(x | z) with location decoder(z) and a learned scale.

    More robust than the Gaussian to outlying voxels (artefacts, lesions).

    Parameters
    ----------
    event_shape : tuple of int
        Shape of one sample (features, or channels and voxels).
    scale : {"global", "feature"}, default="global"
        One scale shared by every feature, or one per feature (voxel).
    init_scale : float, default=1.0
        Starting value of the scale.
    min_scale : float, default=1e-3
        Lower bound of the scale.
    mask : torch.Tensor, optional
        Features that count (1) and those ignored (0), broadcast to one sample
        (e.g. a brain mask of shape ``(x, y, z)``); None counts all.

    Attributes
    ----------
    scale : torch.Tensor
        The current scale, a scalar (``scale="global"``) or of shape
        ``event_shape`` (``scale="feature"``).

    See Also
    --------
    GaussianLikelihood : The Gaussian counterpart.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import GaussianLikelihood, LaplaceLikelihood
    >>> out = torch.zeros(1, 3)
    >>> x = torch.tensor([[0.0, 0.0, 10.0]])  # one outlying feature
    >>> laplace, gauss = LaplaceLikelihood((3,)), GaussianLikelihood((3,))
    >>> laplace.log_prob(x, out).shape
    torch.Size([1])
    >>> bool(laplace.log_prob(x, out) > gauss.log_prob(x, out))  # less penalised
    True
    """

    def _log_density(self, residual: torch.Tensor, scale: torch.Tensor):
        return -residual.abs() / scale - torch.log(2.0 * scale)


class BernoulliLikelihood(nn.Module):
    """Bernoulli p(x | z) with logits decoder(z), for data in [0, 1].

    Values strictly between 0 and 1 are treated as probabilities (the
    continuous relaxation used for grey-level images). It has no parameters.

    Parameters
    ----------
    mask : torch.Tensor, optional
        Features that count (1) and those ignored (0), broadcast to one
        sample; None counts all.

    See Also
    --------
    make_likelihood : Build a likelihood by name.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import BernoulliLikelihood
    >>> likelihood = BernoulliLikelihood()
    >>> logits = torch.zeros(1, 2)  # raw decoder output
    >>> likelihood.mean(logits)  # probabilities
    tensor([[0.5000, 0.5000]])
    >>> likelihood.log_prob(torch.ones(1, 2), logits)  # 2 * log(0.5)
    tensor([-1.3863])
    """

    def __init__(self, mask: torch.Tensor | None = None) -> None:
        super().__init__()
        _register_mask(self, mask)

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each sample of ``x``, summed over its features."""
        nll = F.binary_cross_entropy_with_logits(out.float(), x, reduction="none")
        return -_sum_features(nll, self.mask)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """Success probabilities, ``sigmoid(out)``."""
        return torch.sigmoid(out)


def make_likelihood(
    name: str,
    event_shape: tuple[int, ...],
    scale: str = "global",
    init_scale: float = 1.0,
    min_scale: float = 1e-3,
    mask: torch.Tensor | None = None,
) -> nn.Module:
    """Build the likelihood called ``name`` ("gaussian", "laplace", "bernoulli").

    Parameters
    ----------
    name : {"gaussian", "laplace", "bernoulli"}
        Observation model.
    event_shape : tuple of int
        Shape of one sample.
    scale : {"global", "feature"}, default="global"
        Scale sharing of the Gaussian and Laplace likelihoods.
    init_scale : float, default=1.0
        Starting scale of the Gaussian and Laplace likelihoods.
    min_scale : float, default=1e-3
        Lower bound of the scale of the Gaussian and Laplace likelihoods.
    mask : torch.Tensor, optional
        Features counted in the log-likelihood (1) and ignored (0), broadcast
        to one sample; None counts every feature.

    Returns
    -------
    torch.nn.Module
        A module with ``log_prob(x, out)`` and ``mean(out)``. The scale
        parameters are ignored for "bernoulli".

    Raises
    ------
    ValueError
        If ``name`` is not one of the above.

    Examples
    --------
    >>> from neurovae.nn import make_likelihood
    >>> make_likelihood("laplace", (2, 3), scale="feature").scale.shape
    torch.Size([2, 3])
    >>> make_likelihood("bernoulli", (2, 3))
    BernoulliLikelihood()
    """
    if name == "gaussian":
        return GaussianLikelihood(event_shape, scale, init_scale, min_scale, mask)
    if name == "laplace":
        return LaplaceLikelihood(event_shape, scale, init_scale, min_scale, mask)
    if name == "bernoulli":
        return BernoulliLikelihood(mask)
    raise ValueError(f"unknown likelihood {name!r}")
