"""scikit-learn's own estimator checks on VAE and BetaVAE (2-D data)."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from neurovae import VAE, BetaVAE

SMALL = dict(hidden_layer_sizes=(8,), max_iter=3, batch_size=16, device="cpu")


@parametrize_with_checks(
    [VAE(n_components=2, **SMALL), BetaVAE(n_components=2, **SMALL)],
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
