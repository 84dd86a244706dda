"""Model files: pickle, joblib and neurovae's safe format."""

import json
import os
import pickle
import subprocess
import sys

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import NotFittedError
from torch import nn

import neurovae
from neurovae import VAE, BetaVAE, load
from neurovae.persistence import FORMAT_VERSION

pytestmark = pytest.mark.usefixtures("one_thread")


def _outputs(estimator, X):
    Z = estimator.transform(X)
    return (
        Z,
        estimator.inverse_transform(Z),
        estimator.score_samples(X),
        estimator.sample(3, random_state=0),
    )


def _assert_same_model(a, b, X):
    for out_a, out_b in zip(_outputs(a, X), _outputs(b, X)):
        assert out_a.dtype == out_b.dtype
        np.testing.assert_array_equal(out_a, out_b)
    assert a.get_params(deep=False).keys() == b.get_params(deep=False).keys()
    assert b.n_iter_ == a.n_iter_
    assert b.history_ == a.history_
    assert b.best_epoch_ == a.best_epoch_
    assert b.input_shape_ == a.input_shape_
    assert b.n_features_in_ == a.n_features_in_
    state_a, state_b = a.module_.state_dict(), b.module_.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def _pickle(estimator, tmp_path):
    return pickle.loads(pickle.dumps(estimator))


def _joblib(estimator, tmp_path):
    path = tmp_path / "model.joblib"
    joblib.dump(estimator, path)
    return joblib.load(path)


def _safe(estimator, tmp_path):
    path = tmp_path / "model.nvae"
    estimator.save(path)
    return load(path)


ROUND_TRIPS = [_pickle, _joblib, _safe]


@pytest.fixture
def fitted(X, small):
    return VAE(n_components=2, **small).fit(X.astype(np.float32))


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
def test_round_trip_2d(round_trip, fitted, X, tmp_path):
    X = X.astype(np.float32)
    loaded = round_trip(fitted, tmp_path)
    assert type(loaded) is VAE
    assert loaded.get_params() == fitted.get_params()
    _assert_same_model(fitted, loaded, X)
    assert loaded.transform(X.astype(np.float64)).dtype == np.float64


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
def test_round_trip_volumes(round_trip, volumes, tmp_path):
    est = VAE(
        n_components=2,
        channels=(4, 8),
        likelihood="laplace",
        likelihood_scale="feature",
        max_iter=2,
        batch_size=4,
        device="cpu",
        random_state=0,
    ).fit(volumes[:, None])  # (n, 1, x, y, z)
    loaded = round_trip(est, tmp_path)
    _assert_same_model(est, loaded, volumes[:, None])
    assert loaded.inverse_transform(np.zeros((1, 2))).shape == (1, 1, 9, 11, 7)


@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
def test_round_trip_beta_vae(round_trip, X, small, tmp_path):
    est = BetaVAE(
        n_components=3,
        beta=2.5,
        beta_schedule="cyclical",
        n_cycles=2,
        likelihood="bernoulli",
        early_stopping=True,
        **small,
    ).fit((X - X.min()) / (X.max() - X.min()))
    loaded = round_trip(est, tmp_path)
    assert type(loaded) is BetaVAE
    assert loaded.get_params() == est.get_params()
    assert "val_loss" in loaded.history_
    _assert_same_model(est, loaded, (X - X.min()) / (X.max() - X.min()))
    assert loaded.get_feature_names_out().tolist() == [
        "betavae0",
        "betavae1",
        "betavae2",
    ]


def test_loaded_model_keeps_training(fitted, X, tmp_path):
    loaded = _safe(fitted, tmp_path).set_params(warm_start=True)
    loaded.fit(X.astype(np.float32))
    assert loaded.n_iter_ == 2 * fitted.n_iter_
    assert len(loaded.history_["loss"]) == 2 * fitted.n_iter_


def test_parameter_types_survive_the_safe_format(X, tmp_path):
    est = BetaVAE(
        n_components=2,
        hidden_layer_sizes=(16, 8),
        capacity=3.0,
        max_grad_norm=1.0,
        max_iter=2,
        device="cpu",
        random_state=0,
    ).fit(X)
    loaded = _safe(est, tmp_path)
    assert loaded.get_params() == est.get_params()
    assert loaded.hidden_layer_sizes == (16, 8)
    assert loaded.capacity == 3.0 and loaded.max_grad_norm == 1.0
    assert loaded.random_state == 0


def test_safe_file_loads_with_weights_only(fitted, tmp_path):
    path = tmp_path / "model.nvae"
    fitted.save(path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "neurovae"
    assert payload["format_version"] == FORMAT_VERSION
    assert payload["estimator"] == "VAE"
    assert payload["neurovae_version"] == neurovae.__version__
    assert json.loads(payload["params"])["n_components"] == 2
    assert all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values())
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary file is gone


def test_safe_format_overwrites(fitted, X, small, tmp_path):
    path = tmp_path / "model.nvae"
    VAE(n_components=3, **small).fit(X).save(path)
    fitted.save(str(path))  # str paths too
    assert load(str(path)).n_components == 2


def test_dataframe_feature_names_survive(X, small, tmp_path):
    df = pd.DataFrame(X, columns=[f"roi_{i}" for i in range(6)])
    est = VAE(n_components=2, **small).fit(df)
    for round_trip in ROUND_TRIPS:
        loaded = round_trip(est, tmp_path)
        np.testing.assert_array_equal(loaded.feature_names_in_, df.columns)
        np.testing.assert_array_equal(loaded.transform(df), est.transform(df))
        with pytest.raises(ValueError, match="feature names"):
            loaded.transform(df.rename(columns={"roi_0": "other"}))


def _resave(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload.update(changes)
    torch.save(payload, path)


def test_unknown_key(fitted, tmp_path):
    path = tmp_path / "model.nvae"
    fitted.save(path)
    _resave(path, extra=torch.zeros(1))
    with pytest.raises(ValueError, match="unknown entries.*extra"):
        load(path)


def test_missing_key(fitted, tmp_path):
    path = tmp_path / "model.nvae"
    fitted.save(path)
    payload = torch.load(path, weights_only=True)
    del payload["fitted"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="missing entries.*fitted"):
        load(path)


def test_newer_format_version(fitted, tmp_path):
    path = tmp_path / "model.nvae"
    fitted.save(path)
    _resave(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ValueError, match="format version.*Upgrade neurovae"):
        load(path)


@pytest.mark.parametrize(
    "payload",
    [{"weights": torch.zeros(2)}, [1, 2, 3], {"format": "other"}],
    ids=["dict", "list", "other-format"],
)
def test_not_a_neurovae_file(payload, tmp_path):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="not a neurovae model"):
        load(path)


def test_unknown_estimator_or_parameters(fitted, tmp_path):
    path = tmp_path / "model.nvae"
    fitted.save(path)
    _resave(path, estimator="Pipeline")
    with pytest.raises(ValueError, match="unknown estimator 'Pipeline'"):
        load(path)
    fitted.save(path)
    params = json.loads(torch.load(path, weights_only=True)["params"])
    _resave(path, params=json.dumps({**params, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown parameters.*colour"):
        load(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_file_is_refused(fitted, tmp_path):
    # a pickle may run code on load: the safe loader must not unpickle it
    path = tmp_path / "model.pkl"
    joblib.dump(fitted, path)
    with pytest.raises(ValueError, match="not a readable neurovae model"):
        load(path)


@pytest.mark.parametrize("content", [b"", b"not a model at all", None])
def test_corrupt_file(content, fitted, tmp_path):
    path = tmp_path / "model.nvae"
    if content is None:  # a truncated model file
        fitted.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable neurovae model"):
        load(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing.nvae")


def test_custom_backbone_needs_pickle(X, small, tmp_path):
    encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
    decoder = nn.Linear(2, 6)
    est = VAE(n_components=2, backbone=(encoder, decoder), **small).fit(X)
    with pytest.raises(TypeError, match="backbone.*pickle"):
        est.save(tmp_path / "model.nvae")
    assert not list(tmp_path.iterdir())  # nothing half-written
    for round_trip in (_pickle, _joblib):
        _assert_same_model(est, round_trip(est, tmp_path), X)


def test_random_state_instance_needs_pickle(X, small, tmp_path):
    params = {**small, "random_state": np.random.RandomState(0)}
    est = VAE(n_components=2, **params).fit(X)
    with pytest.raises(TypeError, match="random_state"):
        est.save(tmp_path / "model.nvae")
    for round_trip in (_pickle, _joblib):
        _assert_same_model(est, round_trip(est, tmp_path), X)


def test_unfitted_model(tmp_path):
    with pytest.raises(NotFittedError):
        VAE().save(tmp_path / "model.nvae")
    # an unfitted estimator pickles as what it is
    loaded = pickle.loads(pickle.dumps(VAE(n_components=3)))
    assert loaded.n_components == 3 and not hasattr(loaded, "module_")


def test_pickle_does_not_hold_the_module(fitted):
    state = fitted.__getstate__()
    assert "module_" not in state
    assert all(
        isinstance(v, torch.Tensor) and v.device.type == "cpu"
        for v in state["_module_state"].values()
    )
    assert hasattr(fitted, "module_")  # pickling left the estimator intact


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only host")
@pytest.mark.parametrize("round_trip", ROUND_TRIPS)
def test_model_for_an_absent_device_loads_on_cpu(round_trip, fitted, X, tmp_path):
    # a model trained with device="cuda", opened on a machine without CUDA
    fitted.set_params(device="cuda")
    loaded = round_trip(fitted, tmp_path)
    assert loaded.device == "cuda"
    assert next(loaded.module_.parameters()).device.type == "cpu"
    X = X.astype(np.float32)
    np.testing.assert_array_equal(loaded.transform(X), fitted.transform(X))


_LOAD_ON_CPU = """
import sys, joblib, numpy as np
est = joblib.load(sys.argv[1])
np.save(sys.argv[3], est.transform(np.load(sys.argv[2])))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["32", "16"])
def test_gpu_model_unpickles_on_a_cpu_only_process(precision, X, small, tmp_path):
    params = {**small, "device": "cuda", "precision": precision}
    est = VAE(n_components=2, **params).fit(X)
    assert next(est.module_.parameters()).device.type == "cuda"
    model, data, out = (tmp_path / name for name in ("m.pkl", "X.npy", "Z.npy"))
    joblib.dump(est, model)
    np.save(data, X)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(
        [sys.executable, "-c", _LOAD_ON_CPU, str(model), str(data), str(out)],
        env=env,
        check=True,
    )
    # float16 on the GPU, float32 on the CPU: agreement to float16 precision
    tol = {"32": dict(rtol=1e-4, atol=1e-5), "16": dict(rtol=1e-2, atol=1e-2)}
    np.testing.assert_allclose(np.load(out), est.transform(X), **tol[precision])


def test_non_finite_history_values_survive(fitted, tmp_path):
    # a diverged validation epoch is logged as NaN / inf and must come back so
    fitted.history_["val_loss"] = [float("nan"), float("inf"), 1.5]
    path = tmp_path / "model.nvae"
    fitted.save(path)
    values = load(path).history_["val_loss"]
    assert np.isnan(values[0])
    assert values[1:] == [float("inf"), 1.5]


def _tampered(fitted, tmp_path, *, params=None, fitted_attrs=None, **entries):
    """Save ``fitted``, then rewrite parts of its JSON or its entries."""
    path = tmp_path / "model.nvae"
    fitted.save(path)
    payload = torch.load(path, weights_only=True)
    if params is not None:
        payload["params"] = json.dumps({**json.loads(payload["params"]), **params})
    if fitted_attrs is not None:
        attrs = {**json.loads(payload["fitted"]), **fitted_attrs}
        payload["fitted"] = json.dumps({k: v for k, v in attrs.items() if v != "DEL"})
    payload.update(entries)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(params={"n_components": -3}), "'n_components' must be"),
        (dict(params={"hidden_layer_sizes": [8, "a"]}), "'hidden_layer_sizes'"),
        (dict(params={"likelihood": "poisson"}), "'likelihood' must be"),
        (dict(params="5"), "must be dicts"),
        (dict(fitted_attrs={"_seed": "DEL"}), "missing fitted attributes.*_seed"),
        (dict(fitted_attrs={"input_shape_": [6, 0]}), "input_shape_"),
        (dict(fitted_attrs={"n_features_in_": 7}), "n_features_in_"),
        (dict(fitted_attrs={"n_iter_": True}), "n_iter_"),
        (dict(fitted_attrs={"_fit_dtype": "int8"}), "_fit_dtype"),
        (dict(format_version=True), "invalid format version"),
        (dict(state_dict={}), "weights do not fit"),
        (dict(state_dict=[1, 2]), "not a state dict"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else None,
)
def test_tampered_files_are_refused_clearly(change, match, fitted, tmp_path):
    if change.get("params") == "5":  # not a JSON object at all
        path = _tampered(fitted, tmp_path, **{**change, "params": None})
        _resave(path, params="5")
    else:
        path = _tampered(fitted, tmp_path, **change)
    with pytest.raises(ValueError, match=match):
        load(path)


def test_mismatched_weights_are_refused(fitted, tmp_path):
    path = tmp_path / "model.nvae"
    fitted.save(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    key = next(k for k in state if k.endswith("weight"))
    state[key] = torch.zeros(3, 3)
    _resave(path, state_dict=state)
    with pytest.raises(ValueError, match="weights do not fit"):
        load(path)


def test_training_objective_survives_persistence(X, small, tmp_path):
    # scheduled weights are module state too: a restored capacity BetaVAE
    # must evaluate the same objective as the fitted one
    est = BetaVAE(n_components=2, capacity=5.0, gamma=10.0, **small).fit(X)
    path = tmp_path / "model.nvae"
    est.save(path)
    for other in (pickle.loads(pickle.dumps(est)), load(path)):
        assert other.module_.capacity == est.module_.capacity == 5.0
        assert other.module_.gamma == est.module_.gamma == 10.0
