"""neurovae: variational autoencoders for neuroimaging, the scikit-learn way."""

from neurovae._version import __version__
from neurovae.contrastive import ContrastiveVAE
from neurovae.persistence import load
from neurovae.recurrent import RecurrentVAE
from neurovae.vae import VAE, BetaVAE
from neurovae.very_deep import VeryDeepVAE

__all__ = [
    "VAE",
    "BetaVAE",
    "ContrastiveVAE",
    "RecurrentVAE",
    "VeryDeepVAE",
    "__version__",
    "load",
]
