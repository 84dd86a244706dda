"""The ``neurovae`` command line: demo, fit, sample, transform and errors."""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import neurovae
from neurovae import cli, load
from neurovae.cli import main
from neurovae.datasets import make_ellipsoids

SHAPE = (12, 12, 12)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-10.0, -12.0, 5.0]
TINY = {  # an MLP VAE that fits 6 volumes of 12^3 in a fraction of a second
    "n_components": 2,
    "backbone": "mlp",
    "hidden_layer_sizes": [8],
    "max_iter": 2,
    "batch_size": 3,
    "device": "cpu",
    "random_state": 0,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six 3-D images in files, and the same volumes as one 4-D file."""
    folder = tmp_path_factory.mktemp("data")
    volumes, _ = make_ellipsoids(6, shape=SHAPE, random_state=0)
    img = nib.Nifti1Image(np.moveaxis(volumes, 0, -1), AFFINE)
    files = []
    for i in range(len(volumes)):
        path = folder / "images" / f"sub-{i:02d}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(img.slicer[..., i], path)
        files.append(str(path))
    nib.save(img, folder / "all.nii.gz")
    return {
        "folder": folder,
        "files": files,
        "glob": str(folder / "images" / "sub-*.nii.gz"),
        "4d": str(folder / "all.nii.gz"),
    }


def write_config(path, estimator="VAE", params=None, **extra):
    config = {"estimator": estimator, "params": dict(TINY, **(params or {}))}
    config.update(extra)
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    """``neurovae fit`` run once: a conv VAE, its output folder and stdout."""
    folder = tmp_path_factory.mktemp("fit")
    config = write_config(
        folder / "config.json",
        params={"backbone": "conv", "channels": [2, 4], "hidden_layer_sizes": []},
        n_reconstructions=2,
        n_samples=3,
    )
    out = folder / "out"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):  # capsys is per test
        code = main(
            ["fit", config, data["glob"], "-o", str(out), "--set", "max_iter=3"]
        )
    assert code == 0
    return {"out": out, "model": str(out / "model.nvae"), "stdout": capture.getvalue()}


def check_grid(path, shape=SHAPE):
    img = nib.load(path)
    assert img.shape == shape
    np.testing.assert_allclose(img.affine, AFFINE)
    return img


def run_error(argv, capsys):
    """Run a command that must fail: one stderr line, exit status 2."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("neurovae: error: ")
    return lines[0]


# ----------------------------------------------------------------------
# demo and the parser
# ----------------------------------------------------------------------
def test_demo_prints_comparison(capsys):
    assert main(["demo", "--max-iter", "3", "--n-components", "4"]) == 0
    out = capsys.readouterr().out
    assert "held-out MSE" in out
    assert "linear-probe accuracy" in out
    assert "3 epochs" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("demo", "fit", "sample", "transform"):
        assert command in out


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--max-iter", "0"],
        ["nope"],
        ["fit", "config.json", "data.nii.gz"],  # no -o
        ["sample", "model.nvae", "-n", "0", "-o", "out"],
        ["sample", "model.nvae", "-o", "out", "--group", "neither"],
    ],
)
def test_bad_arguments_exit_nonzero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


# ----------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------
def test_fit_writes_model_history_and_images(fitted, data):
    out = fitted["out"]
    assert sorted(os.listdir(out)) == [
        "config.json",
        "history.json",
        "loss.png",
        "model.nvae",
        "reconstructions",
        "samples",
    ]
    model = load(fitted["model"])  # the safe format
    assert type(model).__name__ == "VAE"
    assert model.channels == (2, 4)  # a JSON list became the tuple
    assert model.n_iter_ == 3  # --set max_iter=3 overrode the file's 2
    history = json.loads((out / "history.json").read_text())
    assert history == pytest.approx(model.history_)
    assert len(history["loss"]) == 3
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["params"]["max_iter"] == 3
    assert config["estimator"] == "VAE"

    recon = sorted(os.listdir(out / "reconstructions"))
    assert recon == ["sub-00.nii.gz", "sub-01.nii.gz"]  # the first inputs
    expected = model.reconstruct(data["files"][:2]).get_fdata()
    for i, name in enumerate(recon):
        img = check_grid(out / "reconstructions" / name)
        np.testing.assert_allclose(img.get_fdata(), expected[..., i], atol=1e-5)
    samples = sorted(os.listdir(out / "samples"))
    assert samples == [f"sample_{i:04d}.nii.gz" for i in range(3)]
    for name in samples:
        check_grid(out / "samples" / name)
    summary = fitted["stdout"]
    assert "VAE on 6 images of 12x12x12, 3 epochs" in summary
    assert f"final loss {model.history_['loss'][-1]:.4g}" in summary
    assert str(out) in summary


def test_fit_one_4d_file(data, tmp_path, capsys):
    config = write_config(tmp_path / "c.json", n_reconstructions=10, n_samples=0)
    assert main(["fit", config, data["4d"], "-o", str(tmp_path / "out")]) == 0
    names = sorted(os.listdir(tmp_path / "out" / "reconstructions"))
    assert names == [f"all_{i:04d}.nii.gz" for i in range(6)]  # at most n inputs
    check_grid(tmp_path / "out" / "reconstructions" / names[0])
    assert not (tmp_path / "out" / "samples").exists()
    assert "VAE on 6 images" in capsys.readouterr().out


def test_fit_under_torchrun_only_rank_0_writes(data, tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "c.json")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # no real launch here (no rendezvous): each rank trains on its own; the
    # distributed fit under torchrun is tested in test_distributed.py
    argv = ["fit", config, data["glob"], "-o", str(tmp_path / "out")]
    assert main([*argv, "--set", "distributed=false"]) == 0
    assert not (tmp_path / "out").exists()
    assert capsys.readouterr().out == ""


def test_fit_contrastive_with_labels(data, tmp_path, capsys):
    config = write_config(
        tmp_path / "c.json",
        "ContrastiveVAE",
        {"n_salient_components": 1, "batch_size": 2},
        n_reconstructions=0,
        n_samples=1,
    )
    labels = tmp_path / "participants.tsv"
    groups = ["control"] * 3 + ["patient"] * 3
    labels.write_text("group\n" + "\n".join(groups) + "\n")
    out = tmp_path / "out"
    argv = ["fit", config, data["glob"], "-o", str(out), "--labels", str(labels)]
    assert main([*argv, "--set", "background_label=control"]) == 0
    model = load(out / "model.nvae")
    assert model.background_label == "control"  # --set: a plain string
    assert model.get_feature_names_out().tolist() == ["contrastivevae_s0"]
    check_grid(out / "samples" / "sample_0000.nii.gz")
    # without labels: a clear refusal
    assert main(argv[:-2]) == 2
    assert "ContrastiveVAE needs a label per image" in capsys.readouterr().err
    # string labels, but the default background_label=0: the estimator refuses
    assert "background_label" in run_error(argv, capsys)


def test_labels_table_matched_by_file_name(data, tmp_path):
    files = data["files"]
    table = tmp_path / "participants.tsv"
    rows = [f"/elsewhere/{os.path.basename(f)}\tp{i}" for i, f in enumerate(files)]
    table.write_text("path\tgroup\n" + "\n".join(rows[::-1]) + "\n")
    labels = cli._read_labels(str(table), "group", files, len(files))
    assert labels == [f"p{i}" for i in range(6)]
    table = tmp_path / "labels.csv"  # no path column: by order; ints parsed
    table.write_text("diagnosis\n" + "\n".join("0 1 0 1 0 1".split()) + "\n")
    assert cli._read_labels(str(table), None, files, 6) == [0, 1, 0, 1, 0, 1]
    text = tmp_path / "labels.txt"  # one per line; floats parsed, blanks skipped
    text.write_text("0.5\n\n1\n0\n1\n0\n1\n")
    assert cli._read_labels(str(text), None, files, 6) == [0.5, 1, 0, 1, 0, 1]


def test_fit_paths_in_config_are_relative_to_it(data, tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:10, 2:10, 2:10] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), folder / "mask.nii.gz")
    config = write_config(
        folder / "c.json",
        params={"mask_img": "mask.nii.gz"},
        n_reconstructions=1,
        n_samples=0,
    )
    monkeypatch.chdir(tmp_path)  # not the configuration's folder
    assert main(["fit", config, data["glob"], "-o", "out"]) == 0
    model = load(tmp_path / "out" / "model.nvae")
    assert model.mask_img == str(folder / "mask.nii.gz")
    recon = nib.load(tmp_path / "out" / "reconstructions" / "sub-00.nii.gz")
    assert np.all(recon.get_fdata()[mask == 0] == 0)  # zero outside the mask


# ----------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------
def test_sample_to_folder_and_4d_file(fitted, tmp_path, capsys):
    folder = tmp_path / "samples"
    argv = ["sample", fitted["model"], "-n", "3", "--random-state", "1"]
    assert main([*argv, "-o", str(folder)]) == 0
    names = sorted(os.listdir(folder))
    assert names == [f"sample_{i:04d}.nii.gz" for i in range(3)]
    assert main([*argv, "-o", str(tmp_path / "sub" / "all.nii.gz")]) == 0
    img = check_grid(tmp_path / "sub" / "all.nii.gz", (*SHAPE, 3))
    first = nib.load(folder / names[0]).get_fdata()
    np.testing.assert_allclose(img.get_fdata()[..., 0], first)  # same seed
    assert "3 samples of VAE" in capsys.readouterr().out


def test_sample_temperature_of_very_deep_vae(data, tmp_path, capsys):
    params = {
        "channels": [2, 4],
        "channels_hidden": [2, 2],
        "channels_per_latent": [1, 1],
        "latents_per_resolution": [1, 1],
        "kernel_sizes": [3, 3],
        "batch_size": 3,
        "max_iter": 2,
        "global_only_iter": 1,
        "device": "cpu",
        "random_state": 0,
    }
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps({"estimator": "VeryDeepVAE", "params": params, "n_samples": 0})
    )
    out = tmp_path / "out"
    assert main(["fit", str(config), data["4d"], "-o", str(out)]) == 0
    model = str(out / "model.nvae")
    for seed in ("0", "1"):  # temperature 0: the prior means, whatever the seed
        argv = ["sample", model, "--temperature", "0", "--random-state", seed]
        assert main([*argv, "-o", str(tmp_path / f"t{seed}.nii")]) == 0
    t0, t1 = (nib.load(tmp_path / f"t{s}.nii").get_fdata() for s in "01")
    np.testing.assert_allclose(t0, t1)


# ----------------------------------------------------------------------
# transform
# ----------------------------------------------------------------------
def read_csv(text):
    rows = list(csv.reader(io.StringIO(text)))
    return rows[0], rows[1:]


def test_transform_to_csv_file_and_stdout(fitted, data, tmp_path, capsys):
    path = tmp_path / "latents.csv"
    assert main(["transform", fitted["model"], data["glob"], "-o", str(path)]) == 0
    capsys.readouterr()
    header, rows = read_csv(path.read_text())
    assert header == ["path", "vae0", "vae1"]
    assert [row[0] for row in rows] == data["files"]
    expected = load(fitted["model"]).transform(data["files"])
    np.testing.assert_allclose(
        np.array([row[1:] for row in rows], dtype=float), expected, rtol=1e-6
    )
    # "-o -" (the default): CSV alone on stdout; the shell's expansion works too
    assert main(["transform", fitted["model"], *data["files"], "-o", "-"]) == 0
    assert capsys.readouterr().out == path.read_text()


def test_transform_4d_file_has_volume_column(fitted, data, capsys):
    assert main(["transform", fitted["model"], data["4d"]]) == 0
    header, rows = read_csv(capsys.readouterr().out)
    assert header == ["path", "volume", "vae0", "vae1"]
    assert [row[1] for row in rows] == [str(i) for i in range(6)]


# ----------------------------------------------------------------------
# user errors: one line, "neurovae: error:", exit status 2
# ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ('{"estimator": "VAE",\n "params": {"max_iter": 2,}}', "line 2, column"),
        ("[1, 2]", "must be a JSON object"),
        ('{"estimator": "VAE", "mask": "m.nii"}', "unknown key 'mask'"),
        ('{"params": {}}', "no 'estimator' key"),
        (
            '{"estimator": "PCA"}',
            "BetaVAE, ContrastiveVAE, VAE, VeryDeepVAE",
        ),
        ('{"estimator": ["VAE"]}', "unknown estimator ['VAE']"),
        ('{"estimator": "VAE", "params": [1]}', "'params' must be a JSON object"),
        ('{"estimator": "VAE", "params": {"n_component": 2}}', "'n_components'?"),
        ('{"estimator": "VAE", "params": {"max_iter": "3"}}', "'max_iter'"),
        ('{"estimator": "VAE", "n_samples": -1}', "'n_samples' must be an int"),
    ],
)
def test_bad_config(text, message, data, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(text)
    out = tmp_path / "out"
    line = run_error(["fit", str(config), data["glob"], "-o", str(out)], capsys)
    assert message in line
    assert not out.exists()  # refused before anything was trained or written


def test_fit_user_errors(data, tmp_path, capsys):
    config = write_config(tmp_path / "c.json")
    out = str(tmp_path / "out")
    missing = str(tmp_path / "nope.json")
    assert f"configuration file {missing!r} does not exist" in run_error(
        ["fit", missing, data["glob"], "-o", out], capsys
    )
    pattern = str(tmp_path / "nothing" / "*.nii.gz")
    assert "no file matches" in run_error(["fit", config, pattern, "-o", out], capsys)
    assert "does not exist" in run_error(
        ["fit", config, str(tmp_path / "x.nii"), "-o", out], capsys
    )
    assert "KEY=VALUE" in run_error(
        ["fit", config, data["glob"], "-o", out, "--set", "max_iter"], capsys
    )
    assert "no parameter 'gama'" in run_error(
        ["fit", config, data["glob"], "-o", out, "--set", "gama=1"], capsys
    )
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n1\n")
    assert "--labels is for ContrastiveVAE" in run_error(
        ["fit", config, data["glob"], "-o", out, "--labels", str(labels)], capsys
    )
    cvae = write_config(tmp_path / "cvae.json", "ContrastiveVAE")
    assert "holds 2 labels, but the data hold 6" in run_error(
        ["fit", cvae, data["glob"], "-o", out, "--labels", str(labels)], capsys
    )
    # data the estimator refuses: images on two grids
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), AFFINE), other)
    assert "must share one grid" in run_error(
        ["fit", config, data["glob"], str(other), "-o", out], capsys
    )


def test_model_file_errors(fitted, data, tmp_path, capsys):
    missing = str(tmp_path / "model.nvae")
    for argv in (
        ["sample", missing, "-o", str(tmp_path)],
        ["transform", missing, data["glob"]],
    ):
        line = run_error(argv, capsys)
        assert f"model file {missing!r} does not exist" in line
    not_a_model = data["files"][0]  # a NIfTI image
    assert "is not a neurovae model file" in run_error(
        ["transform", not_a_model, data["glob"]], capsys
    )
    assert "takes no temperature" in run_error(
        ["sample", fitted["model"], "--temperature", "0.5", "-o", str(tmp_path)],
        capsys,
    )
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), AFFINE), other)
    assert "training grid" in run_error(
        ["transform", fitted["model"], str(other), str(other)], capsys
    )


# ----------------------------------------------------------------------
# a real process
# ----------------------------------------------------------------------
def test_python_dash_m_fit(data, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(neurovae.__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1")
    config = write_config(tmp_path / "c.json", n_reconstructions=1, n_samples=1)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "neurovae", "fit", config, data["glob"], "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "neurovae fit: VAE on 6 images" in proc.stdout
    assert load(out / "model.nvae").n_iter_ == 2
    proc = subprocess.run(
        [sys.executable, "-m", "neurovae", "transform", str(out / "nope.nvae"), "x"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("neurovae: error: model file")
    assert "Traceback" not in proc.stderr
