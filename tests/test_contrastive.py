"""ContrastiveVAE: the estimator face, its groups, and evidence that it works."""

import pickle

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.model_selection import cross_val_predict, cross_val_score
from sklearn.pipeline import make_pipeline

from neurovae import VAE, ContrastiveVAE, load
from neurovae.datasets import make_contrastive
from neurovae.nn import ContrastiveVAEModule

AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])


@pytest.fixture
def data():
    """60 background and 40 target samples of 10 features."""
    X, y, info = make_contrastive(60, 40, 10, random_state=0)
    return X, y, info


@pytest.fixture
def tiny():
    return dict(
        n_components=2,
        n_salient_components=2,
        hidden_layer_sizes=(16,),
        max_iter=3,
        batch_size=8,
        device="cpu",
        random_state=0,
    )


def weights_equal(a, b):
    wa, wb = a.module_.state_dict(), b.module_.state_dict()
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ----------------------------------------------------------------------
# the estimator face
# ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_spaces_shapes_dtypes_and_names(data, tiny, dtype):
    X, y, _ = data
    X = X.astype(dtype)
    est = ContrastiveVAE(**{**tiny, "n_components": 3}).fit(X, y)
    expected = {
        "salient": ["contrastivevae_s0", "contrastivevae_s1"],
        "shared": ["contrastivevae_z0", "contrastivevae_z1", "contrastivevae_z2"],
    }
    expected["both"] = expected["salient"] + expected["shared"]
    full = est.set_params(transform_space="both").transform(X)
    for space, names in expected.items():
        est.set_params(transform_space=space)
        Z = est.transform(X)
        assert Z.shape == (100, len(names)) and Z.dtype == dtype
        assert est.get_feature_names_out().tolist() == names
        # the spaces are the columns of one encoding
        np.testing.assert_array_equal(
            Z, full[:, [expected["both"].index(n) for n in names]]
        )
        decoded = est.inverse_transform(Z)
        assert decoded.shape == X.shape and decoded.dtype == dtype
    # the default space is the salient one
    assert ContrastiveVAE().transform_space == "salient"


def test_inverse_transform_of_both_spaces_is_the_reconstruction(data, tiny):
    X, y, _ = data
    est = ContrastiveVAE(**tiny, transform_space="both").fit(X, y)
    np.testing.assert_allclose(
        est.inverse_transform(est.transform(X)),
        est.reconstruct(X),
        rtol=1e-5,
        atol=1e-6,
    )
    # one space alone decodes with the other at zero (the prior mean)
    est.set_params(transform_space="shared")
    twin, _ = est.background_twin(X)
    np.testing.assert_allclose(
        est.inverse_transform(est.transform(X)), twin, rtol=1e-5, atol=1e-6
    )


def test_set_output_pandas(data, tiny):
    X, y, _ = data
    est = ContrastiveVAE(**tiny, transform_space="both").set_output(transform="pandas")
    frame = est.fit(X, y).transform(X)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns[:3]) == [
        "contrastivevae_s0",
        "contrastivevae_s1",
        "contrastivevae_z0",
    ]


def test_labels_of_any_type_and_several_target_groups(data, tiny):
    X, y, _ = data
    words = np.where(y == 0, "control", np.where(np.arange(100) % 2, "asd", "adhd"))
    a = ContrastiveVAE(**tiny, background_label="control").fit(X, words)
    b = ContrastiveVAE(**tiny).fit(X, y)  # same split into two groups
    assert weights_equal(a, b)
    # a column vector works too (with scikit-learn's DataConversionWarning)
    with pytest.warns(Warning, match="column-vector y"):
        c = ContrastiveVAE(**tiny).fit(X, y[:, None])
    assert weights_equal(b, c)


@pytest.mark.parametrize(
    "labels, match",
    [
        (None, "requires y to be passed"),
        ("all_background", "no target sample"),
        ("no_background", "no background sample"),
        ("short", "inconsistent numbers of samples"),
    ],
)
def test_bad_labels(data, tiny, labels, match):
    X, y, _ = data
    y = {
        None: None,
        "all_background": np.zeros(100),
        "no_background": y + 1,
        "short": y[:-1],
    }[labels]
    with pytest.raises(ValueError, match=match):
        ContrastiveVAE(**tiny).fit(X, y)


def test_group_too_small_for_a_batch(tiny):
    X, y, _ = make_contrastive(30, 5, 4, random_state=0)
    with pytest.raises(
        ValueError, match="target group has 5 training sample.*batch_size=8"
    ):
        ContrastiveVAE(**tiny).fit(X, y)
    ContrastiveVAE(**{**tiny, "batch_size": 5}).fit(X, y)  # fits
    # the held-out validation share counts too
    with pytest.raises(
        ValueError, match="target group has 4 training sample.*validation"
    ):
        ContrastiveVAE(**{**tiny, "batch_size": 5}, early_stopping=True).fit(X, y)
    # a group of one sample is too small even for batch_size="auto"
    X, y, _ = make_contrastive(30, 1, 4, random_state=0)
    with pytest.raises(ValueError, match="target group has 1 training sample"):
        ContrastiveVAE(**{**tiny, "batch_size": "auto"}).fit(X, y)


@pytest.mark.parametrize(
    "param, value",
    [
        ("n_salient_components", 0),
        ("transform_space", "all"),
        ("gamma", -1.0),
        ("deterministic", "yes"),
        ("beta_schedule", "step"),
        ("background_label", None),
    ],
)
def test_invalid_parameters(data, tiny, param, value):
    X, y, _ = data
    with pytest.raises(ValueError, match=param):
        ContrastiveVAE(**tiny).set_params(**{param: value}).fit(X, y)


def test_steps_draw_both_groups_at_the_same_rate(tiny, monkeypatch):
    # 80 background and 16 target samples: every step sees 8 of each
    X, y, _ = make_contrastive(80, 16, 5, random_state=0)
    seen = []
    loss = ContrastiveVAEModule.loss

    def spy(self, batch):
        if self.training:
            seen.append((int(batch[1].sum()), len(batch[1])))
        return loss(self, batch)

    monkeypatch.setattr(ContrastiveVAEModule, "loss", spy)
    ContrastiveVAE(**{**tiny, "max_iter": 1}).fit(X, y)
    assert seen == [(8, 16)] * 10  # one pass over the 80 background samples


def test_same_seed_same_model_and_determinism(data, tiny):
    X, y, _ = data
    a = ContrastiveVAE(**tiny).fit(X, y)
    b = ContrastiveVAE(**tiny).fit(X, y)
    assert weights_equal(a, b)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    np.testing.assert_array_equal(a.score_samples(X, y), b.score_samples(X, y))
    np.testing.assert_array_equal(
        a.sample(3, random_state=1), b.sample(3, random_state=1)
    )
    c = ContrastiveVAE(**{**tiny, "random_state": 1}).fit(X, y)
    assert not np.allclose(a.transform(X), c.transform(X))


def test_transform_does_not_depend_on_the_calls(data, tiny):
    # unlike contrastive PCA packages that re-centre what they are given
    X, y, _ = data
    est = ContrastiveVAE(**tiny, transform_space="both").fit(X, y)
    full = est.transform(X)
    parts = np.concatenate(
        [est.transform(X[:7]), est.transform(X[7:60]), est.transform(X[60:])]
    )
    alone = np.concatenate([est.transform(X[i : i + 1]) for i in range(100)])
    np.testing.assert_allclose(parts, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone, full, rtol=1e-5, atol=1e-6)


def test_sample_groups(data, tiny):
    X, y, _ = data
    est = ContrastiveVAE(**tiny).fit(X, y)
    target = est.sample(5, random_state=0)
    background = est.sample(5, group="background", random_state=0)
    assert target.shape == background.shape == (5, 10)
    assert not np.allclose(target, background)
    # background samples are the decoded shared draws with s = 0
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(5, 4, generator=generator)
    codes[:, 2:] = 0
    est.set_params(transform_space="both")
    np.testing.assert_allclose(
        est.inverse_transform(np.c_[codes[:, 2:], codes[:, :2]].astype(np.float64)),
        background,
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="group"):
        est.sample(2, group="patients")


def test_background_twin(data, tiny):
    X, y, _ = data
    est = ContrastiveVAE(**tiny).fit(X, y)
    twin, difference = est.background_twin(X[y == 1])
    assert twin.shape == difference.shape == (40, 10)
    np.testing.assert_allclose(
        twin + difference, est.reconstruct(X[y == 1]), rtol=1e-5, atol=1e-5
    )


def test_scores_follow_the_groups(data, tiny):
    X, y, _ = data
    est = ContrastiveVAE(**tiny).fit(X, y)
    as_target = est.score_samples(X)
    by_group = est.score_samples(X, y)
    np.testing.assert_array_equal(by_group[y == 1], as_target[y == 1])
    assert not np.allclose(by_group[y == 0], as_target[y == 0])
    assert est.score(X, y) == pytest.approx(by_group.mean())
    # scoring needs no second group (e.g. a test fold of patients only)
    est.score(X[y == 1], y[y == 1])


def test_pipeline_with_a_classifier_uses_the_same_y(tiny):
    X, y, _ = make_contrastive(60, 60, 10, random_state=0)
    pipe = make_pipeline(ContrastiveVAE(**tiny), LogisticRegression())
    pipe.fit(X, y)
    assert pipe.predict(X).shape == (120,)
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,)


def test_gamma_zero_has_no_discriminator(data, tiny):
    X, y, _ = data
    est = ContrastiveVAE(**tiny, gamma=0.0).fit(X, y)
    assert est.module_.discriminator is None
    assert "tc" not in est.history_ and "discriminator" not in est.history_
    with_tc = ContrastiveVAE(**tiny).fit(X, y)
    assert {"tc", "discriminator", "gamma"} <= set(with_tc.history_)


def test_deterministic_mode_does_not_sample(data, tiny):
    X, y, _ = data
    est = ContrastiveVAE(**tiny, deterministic=True).fit(X, y)
    module = est.module_.train()
    batch = (torch.as_tensor(X[:16], dtype=torch.float32), torch.as_tensor(y[:16] == 1))
    est.module_.last_codes = None
    first, second = module.loss(batch), module.loss(batch)
    assert torch.equal(first["recon"], second["recon"])
    # scores use the posterior means, not the fixed noise draw
    module.eval()
    mu = module.encode(batch[0])[0]
    nll = -module.likelihood.log_prob(batch[0], module.decoder(mu))
    penalty = 0.5 * mu.pow(2).sum(1)
    np.testing.assert_allclose(
        module.elbo(batch[0]).detach(), -(nll + penalty).detach(), rtol=1e-5
    )


def test_cyclical_kl_annealing(data, tiny):
    X, y, _ = data
    est = ContrastiveVAE(
        **{**tiny, "max_iter": 8, "batch_size": 40},
        beta_schedule="cyclical",
        n_cycles=2,
    ).fit(X, y)
    # 2 steps per epoch (60 background / 40); value at each epoch's last step
    np.testing.assert_allclose(
        est.history_["beta"], [0.25, 0.75, 1, 1, 0.25, 0.75, 1, 1]
    )


def test_warm_start(data, tiny):
    X, y, _ = data
    est = ContrastiveVAE(**tiny, warm_start=True).fit(X, y)
    est.fit(X, y)
    assert est.n_iter_ == 6 and len(est.history_["loss"]) == 6
    est.set_params(n_salient_components=3)
    with pytest.raises(ValueError, match="n_salient_components"):
        est.fit(X, y)


def test_early_stopping_split_is_stratified(tiny):
    X, y, _ = make_contrastive(90, 10, 5, random_state=0)
    est = ContrastiveVAE(
        **{**tiny, "batch_size": 4}, early_stopping=True, validation_fraction=0.2
    ).fit(X, y)
    assert "val_loss" in est.history_
    # 2 of the 10 targets are held out, whatever the seed
    train, val = est._split((torch.zeros(100), torch.from_numpy(y == 1)), seed=3)
    assert int(train[1].sum()) == 8 and int(val[1].sum()) == 2


def test_pickle_and_safe_format(data, tiny, tmp_path):
    X, y, _ = data
    words = np.where(y == 0, "control", "patient")
    est = ContrastiveVAE(**tiny, background_label="control").fit(X, words)
    path = tmp_path / "cvae.nvae"
    est.save(path)
    for loaded in (load(path), pickle.loads(pickle.dumps(est))):
        assert loaded.background_label == "control"
        np.testing.assert_array_equal(loaded.transform(X), est.transform(X))
        np.testing.assert_array_equal(
            loaded.score_samples(X, words), est.score_samples(X, words)
        )


# ----------------------------------------------------------------------
# images
# ----------------------------------------------------------------------
@pytest.fixture
def volumes():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(16, 8, 9, 7)).astype(np.float32)
    y = np.repeat([0, 1], 8)
    data[y == 1, 2:5, 3:6, 2:5] += 2.0  # a planted target effect
    return data, y


@pytest.fixture
def conv():
    return dict(
        n_components=2,
        n_salient_components=1,
        channels=(4, 8),
        max_iter=2,
        batch_size=4,
        device="cpu",
        random_state=0,
    )


def test_images_in_images_out(volumes, conv, tmp_path, one_thread):
    data, y = volumes
    paths = []
    for i, volume in enumerate(data):
        paths.append(str(tmp_path / f"sub-{i}.nii.gz"))
        nib.save(nib.Nifti1Image(volume, AFFINE), paths[-1])
    mask = np.zeros(data.shape[1:], dtype=bool)
    mask[1:7, 1:8, 1:6] = True
    streamed = ContrastiveVAE(**conv, mask_img=mask).fit(paths, y)
    # files are streamed through the same group-balanced batches
    in_memory = ContrastiveVAE(**conv, mask_img=mask).fit(data, y)
    assert weights_equal(streamed, in_memory)
    twin, difference = streamed.background_twin(paths[8:])
    for img in (twin, difference, streamed.sample(3, group="background")):
        assert isinstance(img, nib.Nifti1Image)
        np.testing.assert_array_equal(img.affine, AFFINE)
        assert (img.get_fdata()[~mask] == 0).all()
    assert twin.shape == (8, 9, 7, 8)
    assert streamed.transform(paths).shape == (16, 1)


# ----------------------------------------------------------------------
# evidence that it works
# ----------------------------------------------------------------------
def _r2(features, factors):
    prediction = cross_val_predict(LinearRegression(), features, factors, cv=5)
    residual = ((factors - prediction) ** 2).sum(0)
    return float(np.mean(1 - residual / ((factors - factors.mean(0)) ** 2).sum(0)))


def test_salient_space_holds_the_target_factors(one_thread):
    X, y, info = make_contrastive(300, 300, 30, n_clusters=3, random_state=0)
    est = ContrastiveVAE(
        n_components=2,
        n_salient_components=2,
        batch_size=32,
        max_iter=60,
        random_state=0,
        device="cpu",
    ).fit(X, y)
    target = y == 1
    salient = est.transform(X)[target]
    shared = est.set_params(transform_space="shared").transform(X)[target]
    r2_salient = _r2(salient, info["salient_factors"][target])
    r2_shared_space = _r2(shared, info["salient_factors"][target])
    leak = _r2(salient, info["shared_factors"][target])
    assert r2_salient > 0.85 and r2_salient > r2_shared_space + 0.6
    assert leak < 0.1
    # the target subgroups separate better than in a plain VAE of the same size
    vae = VAE(n_components=4, batch_size=32, max_iter=60, random_state=0, device="cpu")
    plain = vae.fit(X).transform(X)[target]
    clusters = info["target_cluster"][target]
    assert (
        silhouette_score(salient, clusters) > silhouette_score(plain, clusters) + 0.15
    )
    # the loss fell and the discriminator saw little dependence left
    assert est.history_["loss"][-1] < est.history_["loss"][0]
    assert est.history_["discriminator"][-1] > 1.0  # log(4) = 1.39: no dependence


def test_healthy_twin_differences_concentrate_in_the_planted_region(one_thread):
    from neurovae.datasets import make_brain_population

    imgs, y, info = make_brain_population(
        48, resolution=8, effect=0.8, n_patients=24, effect_fwhm=40.0, random_state=0
    )
    est = ContrastiveVAE(
        n_components=4,
        n_salient_components=2,
        channels=(4, 8, 16),
        batch_size=8,
        learning_rate_init=3e-3,
        max_iter=15,
        mask_img=info["mask"],
        random_state=0,
        device="cpu",
    ).fit(imgs, y)
    patients = [img for img, label in zip(imgs, y) if label == 1]
    _, difference = est.background_twin(patients)
    inside = info["mask"].get_fdata() > 0
    atrophy = info["atrophy_map"].get_fdata()[inside]
    change = np.abs(difference.get_fdata()).mean(axis=-1)[inside]
    core = atrophy >= np.quantile(atrophy, 0.9)  # the 10 % most atrophied voxels
    assert change[core].mean() > 2.5 * change[~core].mean()
    assert np.corrcoef(change, atrophy)[0, 1] > 0.5
