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
    ) -> None:
        super().__init__()
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
    """

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each sample of ``x``, summed over its features."""
        scale = self.scale
        z = (x - out.float()) / scale
        per_feature = -0.5 * z.pow(2) - torch.log(scale) - 0.5 * _LOG_2PI
        return per_feature.flatten(1).sum(dim=1)


class LaplaceLikelihood(_LearnedScaleLikelihood):
    """Laplace p(x | z) with location decoder(z) and a learned scale.

    More robust than the Gaussian to outlying voxels (artefacts, lesions).
    Parameters as for :class:`GaussianLikelihood`.
    """

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each sample of ``x``, summed over its features."""
        scale = self.scale
        per_feature = -(x - out.float()).abs() / scale - torch.log(2.0 * scale)
        return per_feature.flatten(1).sum(dim=1)


class BernoulliLikelihood(nn.Module):
    """Bernoulli p(x | z) with logits decoder(z), for data in [0, 1].

    Values strictly between 0 and 1 are treated as probabilities (the
    continuous relaxation used for grey-level images).
    """

    def log_prob(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Log-likelihood of each sample of ``x``, summed over its features."""
        nll = F.binary_cross_entropy_with_logits(out.float(), x, reduction="none")
        return -nll.flatten(1).sum(dim=1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """Success probabilities, ``sigmoid(out)``."""
        return torch.sigmoid(out)


def make_likelihood(
    name: str,
    event_shape: tuple[int, ...],
    scale: str = "global",
    init_scale: float = 1.0,
    min_scale: float = 1e-3,
) -> nn.Module:
    """Build the likelihood called ``name`` ("gaussian", "laplace", "bernoulli")."""
    if name == "gaussian":
        return GaussianLikelihood(event_shape, scale, init_scale, min_scale)
    if name == "laplace":
        return LaplaceLikelihood(event_shape, scale, init_scale, min_scale)
    if name == "bernoulli":
        return BernoulliLikelihood()
    raise ValueError(f"unknown likelihood {name!r}")
