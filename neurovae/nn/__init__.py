"""Torch modules of neurovae: backbones, latent heads, likelihoods and models.

Nothing in this subpackage imports from the rest of neurovae: the modules are
plain :class:`torch.nn.Module` objects that the estimators build and the
training engine drives through their ``loss(batch)`` method.
"""

from neurovae.nn.backbones import (
    ConvDecoder3d,
    ConvEncoder3d,
    MLPDecoder,
    MLPEncoder,
    ResNetDecoder3d,
    ResNetEncoder3d,
    dry_run,
    infer_output_size,
    make_backbone,
)
from neurovae.nn.contrastive import ContrastiveVAEModule, PairDiscriminator
from neurovae.nn.latent import GaussianLatent, kl_standard_normal
from neurovae.nn.likelihoods import (
    BernoulliLikelihood,
    GaussianLikelihood,
    LaplaceLikelihood,
    make_likelihood,
)
from neurovae.nn.noise import batch_shard, standard_normal
from neurovae.nn.recurrent import RecurrentVAEModule, solve_transition
from neurovae.nn.vae import VAEModule
from neurovae.nn.very_deep import (
    BottleneckBlock3d,
    TopDownBlock3d,
    VeryDeepVAEModule,
    kl_diagonal_gaussians,
)

__all__ = [
    "BernoulliLikelihood",
    "BottleneckBlock3d",
    "ContrastiveVAEModule",
    "ConvDecoder3d",
    "ConvEncoder3d",
    "GaussianLatent",
    "GaussianLikelihood",
    "LaplaceLikelihood",
    "MLPDecoder",
    "MLPEncoder",
    "ResNetDecoder3d",
    "ResNetEncoder3d",
    "PairDiscriminator",
    "RecurrentVAEModule",
    "TopDownBlock3d",
    "VAEModule",
    "VeryDeepVAEModule",
    "batch_shard",
    "dry_run",
    "infer_output_size",
    "make_backbone",
    "kl_diagonal_gaussians",
    "kl_standard_normal",
    "make_likelihood",
    "standard_normal",
    "solve_transition",
]
