"""neurovae: variational autoencoders for neuroimaging, the scikit-learn way."""

from neurovae._version import __version__
from neurovae.contrastive import ContrastiveVAE
from neurovae.persistence import load
from neurovae.vae import VAE, BetaVAE

__all__ = ["VAE", "BetaVAE", "ContrastiveVAE", "__version__", "load"]
