"""The models learn: against PCA on digits, the mean image on volumes, and beta."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split

from neurovae import VAE, BetaVAE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    X = load_digits().data / 16.0
    return train_test_split(X, test_size=0.2, random_state=0)


def _mse(a, b):
    return float(np.mean((a - b) ** 2))


def test_vae_beats_pca_on_digits(digits):
    X_train, X_test = digits
    vae = VAE(n_components=8, random_state=0).fit(X_train)  # the defaults
    vae_mse = _mse(vae.inverse_transform(vae.transform(X_test)), X_test)
    pca = PCA(8).fit(X_train)
    pca_mse = _mse(pca.inverse_transform(pca.transform(X_test)), X_test)
    assert vae_mse <= 1.2 * pca_mse, (vae_mse, pca_mse)

    loss = vae.history_["loss"]
    assert vae.n_iter_ == len(loss) == VAE().max_iter
    assert np.all(np.isfinite(loss))
    assert np.mean(loss[-10:]) < np.mean(loss[:10]) - 10  # nats per sample
    assert sum(vae.history_["n_skipped"]) == 0
    # the held-out ELBO is far above that of an untrained model
    untrained = VAE(n_components=8, max_iter=1, random_state=0).fit(X_train)
    assert vae.score(X_test) > untrained.score(X_test) + 10


def _blobs(n_samples, size=12, seed=0):
    """Smooth Gaussian blobs of random centre and width on a size**3 grid."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.arange(size)] * 3, indexing="ij")
    grid = np.stack(axes, axis=-1).astype(float)
    centres = rng.uniform(3, size - 3, size=(n_samples, 3))
    widths = rng.uniform(1.5, 3.0, size=n_samples)
    d2 = ((grid[None] - centres[:, None, None, None]) ** 2).sum(axis=-1)
    return np.exp(-d2 / (2 * widths[:, None, None, None] ** 2)).astype(np.float32)


def test_conv_vae_learns_volumes():
    X_train, X_test = _blobs(48, seed=0), _blobs(16, seed=1)
    vae = VAE(
        n_components=4,
        channels=(8, 16),
        max_iter=20,
        batch_size=8,
        learning_rate_init=3e-3,
        device="cpu",
        random_state=0,
    ).fit(X_train)
    assert type(vae.module_.encoder).__name__ == "ConvEncoder3d"
    loss = vae.history_["loss"]
    assert np.all(np.isfinite(loss))
    assert loss[-1] < loss[0] and np.mean(loss[-3:]) < np.mean(loss[:3])

    reconstruction = vae.inverse_transform(vae.transform(X_test))
    assert reconstruction.shape == X_test.shape
    vae_mse = _mse(reconstruction, X_test)
    mean_image_mse = _mse(X_train.mean(axis=0), X_test)
    assert vae_mse < 0.7 * mean_image_mse, (vae_mse, mean_image_mse)


def test_higher_beta_gives_lower_kl():
    X = load_digits().data[:500] / 16.0
    params = dict(n_components=4, hidden_layer_sizes=(64,), max_iter=30, device="cpu")
    kl, recon = {}, {}
    for beta in (1.0, 4.0):
        model = BetaVAE(beta=beta, random_state=0, **params).fit(X)
        kl[beta] = model.history_["kl"][-1]
        recon[beta] = model.history_["recon"][-1]
        assert model.history_["beta"][-1] == beta
    assert kl[4.0] < 0.5 * kl[1.0], kl
    assert recon[4.0] > recon[1.0], recon  # the price of the tighter code
