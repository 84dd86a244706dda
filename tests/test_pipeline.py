"""VAE and BetaVAE inside scikit-learn's tooling: clone, pipelines, search, CV."""

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from neurovae import VAE, BetaVAE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def Xy():
    """Two classes that differ along a direction in 8 features."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    X = rng.normal(size=(60, 8)) + 3.0 * y[:, None] * np.linspace(1, -1, 8)
    return X, y


@pytest.mark.parametrize("Estimator", [VAE, BetaVAE])
def test_clone(Estimator, X, small):
    est = Estimator(n_components=3, beta=2.0, **small)
    unfitted = clone(est)
    assert unfitted.get_params() == est.get_params()
    est.fit(X)
    copy = clone(est)
    assert copy.get_params() == est.get_params()
    assert not hasattr(copy, "module_")
    with pytest.raises(NotFittedError):
        copy.transform(X)
    # the clone refits to the same model (same random_state)
    np.testing.assert_array_equal(copy.fit(X).transform(X), est.transform(X))


def test_pipeline_fits_and_predicts(Xy, small):
    X, y = Xy
    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            ("vae", VAE(n_components=2, learning_rate_init=1e-2, **small)),
            ("clf", LogisticRegression()),
        ]
    )
    pipe.fit(X, y)
    pred = pipe.predict(X)
    assert pred.shape == (60,)
    assert set(pred) <= {0, 1}
    assert pipe.score(X, y) > 0.8  # the classes are separated in latent space
    assert pipe[:-1].get_feature_names_out().tolist() == ["vae0", "vae1"]
    assert pipe["vae"].n_features_in_ == 8


def test_grid_search_uses_the_elbo(X, small):
    search = GridSearchCV(
        VAE(**small),
        {"n_components": [1, 2], "beta": [0.5, 1.0]},
        cv=2,
    )
    search.fit(X)
    assert set(search.best_params_) == {"n_components", "beta"}
    assert search.best_params_["n_components"] in (1, 2)
    assert search.best_params_["beta"] in (0.5, 1.0)
    scores = search.cv_results_["mean_test_score"]
    assert len(scores) == 4 and np.all(np.isfinite(scores))
    # the score is the mean ELBO of the held-out samples
    best = search.best_estimator_
    assert best.score(X) == pytest.approx(best.score_samples(X).mean())
    assert search.score(X) == pytest.approx(best.score(X))


def test_grid_search_in_pipeline(Xy, small):
    X, y = Xy
    pipe = make_pipeline(StandardScaler(), BetaVAE(**small), LogisticRegression())
    search = GridSearchCV(pipe, {"betavae__n_components": [1, 2]}, cv=2).fit(X, y)
    assert search.best_params_["betavae__n_components"] in (1, 2)
    assert search.predict(X).shape == (60,)


def test_cross_val_score_in_parallel(Xy, small):
    X, y = Xy
    pipe = make_pipeline(StandardScaler(), VAE(n_components=2, **small))
    scores = cross_val_score(pipe[-1], X, cv=2, n_jobs=2)
    assert scores.shape == (2,) and np.all(np.isfinite(scores))
    # the same folds scored in this process give the same numbers
    np.testing.assert_allclose(
        scores, cross_val_score(pipe[-1], X, cv=2, n_jobs=1), rtol=1e-6
    )
    pipe = make_pipeline(
        StandardScaler(), VAE(n_components=2, **small), LogisticRegression()
    )
    accuracies = cross_val_score(pipe, X, y, cv=2, n_jobs=2)
    assert accuracies.shape == (2,) and np.all((accuracies >= 0) & (accuracies <= 1))


def test_set_output_pandas(X, small):
    est = VAE(n_components=3, **small).set_output(transform="pandas")
    index = pd.RangeIndex(100, 140)
    df = pd.DataFrame(X, columns=list("abcdef"), index=index)
    Z = est.fit_transform(df)
    assert isinstance(Z, pd.DataFrame)
    assert Z.columns.tolist() == ["vae0", "vae1", "vae2"]
    assert Z.index.equals(index)
    with pytest.warns(UserWarning, match="feature names"):
        Z2 = est.transform(X)  # arrays in, DataFrames out
    assert isinstance(Z2, pd.DataFrame)
    np.testing.assert_array_equal(Z2.to_numpy(), Z.to_numpy())
    assert est.inverse_transform(Z).shape == (40, 6)


def test_set_output_pandas_in_pipeline(X, small):
    pipe = make_pipeline(StandardScaler(), BetaVAE(n_components=2, **small))
    Z = pipe.set_output(transform="pandas").fit_transform(X)
    assert Z.columns.tolist() == ["betavae0", "betavae1"]


def test_dataframe_feature_names(X, small):
    columns = [f"voxel_{i}" for i in range(6)]
    df = pd.DataFrame(X, columns=columns)
    est = VAE(n_components=2, **small).fit(df)
    assert est.feature_names_in_.tolist() == columns
    assert est.n_features_in_ == 6
    with pytest.warns(UserWarning, match="feature names"):
        np.testing.assert_array_equal(est.transform(df), est.transform(X))
    with pytest.raises(ValueError, match="feature names"):
        est.transform(df[columns[::-1]])
    # refitting on an array forgets the names
    assert not hasattr(est.fit(X), "feature_names_in_")
    # and volumes have none
    est.fit(df)
    volumes = np.random.default_rng(0).normal(size=(4, 3, 3, 3))
    assert not hasattr(est.fit(volumes), "feature_names_in_")


# ----------------------------------------------------------------------
# nilearn: maskers and lists of images
# ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def brains():
    """60 brains on an 8 mm grid, half with planted atrophy, and their mask."""
    from neurovae.datasets import make_brain_population

    imgs, y, info = make_brain_population(
        60, resolution=8, effect=0.5, effect_fwhm=40.0, random_state=0
    )
    return imgs, y, info["mask"]


@pytest.fixture
def brain_files(brains, tmp_path):
    imgs, y, _ = brains
    paths = []
    for i, img in enumerate(imgs):
        paths.append(str(tmp_path / f"sub-{i:02d}.nii.gz"))
        img.to_filename(paths[-1])
    return paths, y


def masker_pipeline(mask, **vae_params):
    from nilearn.maskers import NiftiMasker

    params = dict(n_components=4, hidden_layer_sizes=(128,), max_iter=100)
    params.update(device="cpu", random_state=0)
    params.update(vae_params)
    return make_pipeline(
        NiftiMasker(mask_img=mask, standardize="zscore_sample"),
        VAE(**params),
        LogisticRegression(),
    )


def test_masker_pipeline_cross_validates_on_images(brains):
    imgs, y, mask = brains
    scores = cross_val_score(masker_pipeline(mask), imgs, y, cv=3)
    assert scores.shape == (3,)
    # the planted atrophy is found in latent space (PCA(4) in its place: 0.82)
    assert scores.mean() > 0.7


def test_masker_pipeline_in_parallel_on_files(brain_files, brains):
    paths, y = brain_files
    pipe = masker_pipeline(brains[2], max_iter=5)
    scores = cross_val_score(pipe, paths, y, cv=3, n_jobs=2)
    assert scores.shape == (3,) and np.isfinite(scores).all()


def test_masker_pipeline_grid_search(brains):
    imgs, y, mask = brains
    search = GridSearchCV(
        masker_pipeline(mask, max_iter=5),
        {"vae__n_components": [2, 4]},
        cv=2,
    )
    search.fit(imgs, y)
    assert search.best_params_["vae__n_components"] in (2, 4)
    assert search.predict(imgs[:3]).shape == (3,)


def test_masker_inverse_transform_gives_images(brains):
    from nilearn.maskers import NiftiMasker

    imgs, _, mask = brains
    masker = NiftiMasker(mask_img=mask, standardize="zscore_sample").fit()
    features = masker.transform(imgs)
    vae = VAE(n_components=3, hidden_layer_sizes=(32,), max_iter=10, device="cpu")
    vae.set_params(random_state=0).fit(features)
    decoded = masker.inverse_transform(vae.inverse_transform(vae.transform(features)))
    assert decoded.shape == (*imgs[0].shape, len(imgs))
    np.testing.assert_array_equal(decoded.affine, imgs[0].affine)
    assert np.all(decoded.get_fdata()[mask.get_fdata() == 0] == 0)


def test_conv_vae_on_images_in_a_pipeline(brain_files, brains):
    """A convolutional VAE takes the list of files directly (streamed)."""
    paths, y = brain_files
    vae = VAE(
        n_components=4,
        channels=(4, 8),
        max_iter=5,
        device="cpu",
        random_state=0,
        mask_img=brains[2],
    )
    pipe = make_pipeline(vae, LogisticRegression())
    scores = cross_val_score(pipe, paths[:30], y[:30], cv=3)
    assert scores.shape == (3,) and np.isfinite(scores).all()
