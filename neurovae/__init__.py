"""neurovae: variational autoencoders for neuroimaging, the scikit-learn way."""

from neurovae._version import __version__
from neurovae.persistence import load
from neurovae.vae import VAE, BetaVAE

__all__ = ["VAE", "BetaVAE", "__version__", "load"]
