"""Checkpoints: atomic files, refusal of foreign or corrupt ones, and resumed
fits that end bitwise where uninterrupted fits end (engine and estimators)."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from neurovae import VAE, BetaVAE, ContrastiveVAE, RecurrentVAE, VeryDeepVAE, load
from neurovae._fingerprint import data_digest
from neurovae.io import check_niimgs
from neurovae.training import (
    Checkpoint,
    CheckpointError,
    DiscriminatorHook,
    Engine,
    EngineConfig,
    Hook,
    TensorBatches,
    local_rng,
)

CPU = torch.device("cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Stop(Exception):
    """Raised by the tests to kill a fit at a chosen epoch."""


# ---------------------------------------------------------------------------
# engine-level helpers: a noisy regression with its own generator
# ---------------------------------------------------------------------------
class NoisyRegression(nn.Module):
    """Least squares on inputs with noise drawn from ``self.generator``, and
    a discriminator-like critic (for :class:`DiscriminatorHook`)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)
        self.discriminator = nn.Linear(1, 1)
        self.generator = torch.Generator().manual_seed(7)

    def forward(self, batch):
        x, y = batch
        if self.training:
            x = x + 0.1 * torch.randn(x.shape, generator=self.generator)
        err = self.linear(x).squeeze(1) - y
        self.stash = err.detach()[:, None]
        return {"loss": err.pow(2).mean()}

    def discriminator_loss(self):
        return self.discriminator(self.stash).pow(2).mean()


class StopAt(Hook):
    """Raise :class:`Stop` when epoch ``epoch`` begins."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_begin(self, engine):
        if engine.epoch == self.epoch:
            raise Stop


class CountEpochs(Hook):
    def __init__(self):
        self.n = 0

    def on_epoch_begin(self, engine):
        self.n += 1


def regression_data(n=48):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3


CONFIGS = {
    "plain": dict(),
    "early_stopping": dict(early_stopping=True, n_iter_no_change=3, tol=0.5),
    "ema": dict(ema_decay=0.9, max_grad_norm=1.0),
    "skip": dict(skip_threshold=5.0, skip_warmup=3, max_consecutive_skips=1000),
}


def engine_run(config, path=None, hooks=(), fingerprint=None, scaler=None):
    """One engine run on fresh objects; a checkpoint at ``path`` if given;
    ``scaler``: a function returning the gradient scaler to train with."""
    x, y = regression_data()
    with local_rng(0):
        module = NoisyRegression()
    train = TensorBatches(
        (x[:40], y[:40]), 8, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    val = TensorBatches((x[40:], y[40:]), 8)
    checkpoint = None
    if path is not None:
        checkpoint = Checkpoint(path, fingerprint or {"run": 1})
        checkpoint.read()
    engine = Engine(
        module,
        EngineConfig(**{"max_iter": 12, "learning_rate_init": 0.05, **config}),
        CPU,
        hooks=[DiscriminatorHook(learning_rate=0.01), *hooks],
        scaler=None if scaler is None else scaler(),
    )
    result = engine.fit(train, val, checkpoint=checkpoint)
    return result, module


def states_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_time(history):
    return {k: v for k, v in history.items() if k != "time"}


# ---------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_engine_resumes_bitwise(name, tmp_path):
    config = CONFIGS[name]
    reference, ref_module = engine_run(config)
    path = tmp_path / "run.ckpt"
    stop = min(4, reference.n_epochs - 1)
    with pytest.raises(Stop):
        engine_run(config, path, hooks=[StopAt(stop)])
    counter = CountEpochs()
    result, module = engine_run(config, path, hooks=[counter])
    assert result.n_resumed == stop
    assert counter.n == reference.n_epochs - stop  # only the missing epochs
    assert states_equal(module, ref_module)
    assert without_time(result.history) == without_time(reference.history)
    assert (result.n_epochs, result.best_epoch, result.stopped_early) == (
        reference.n_epochs,
        reference.best_epoch,
        reference.stopped_early,
    )
    if name == "early_stopping":  # the patience count crossed the interruption
        assert reference.stopped_early and reference.n_epochs - 3 < stop
    if name == "skip":  # updates were skipped before and after it
        skipped = reference.history["n_skipped"]
        assert sum(skipped[:stop]) > 0 and sum(skipped[stop:]) > 0


def overflowing_scaler():
    """A CPU gradient scaler whose scale overflows float32 gradients at
    first, then grows back every 3 steps: it skips steps all run long."""
    return torch.amp.GradScaler("cpu", init_scale=2.0**126, growth_interval=3)


def test_engine_resumes_the_gradient_scaler_bitwise(tmp_path):
    config = dict(max_grad_norm=1.0)
    reference, ref_module = engine_run(config, scaler=overflowing_scaler)
    skipped = reference.history["n_skipped_scaler"]
    stop = 4
    assert sum(skipped[:stop]) > 0 and sum(skipped[stop:]) > 0
    path = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        engine_run(config, path, hooks=[StopAt(stop)], scaler=overflowing_scaler)
    result, module = engine_run(
        config, path, hooks=[CountEpochs()], scaler=overflowing_scaler
    )
    assert result.n_resumed == stop
    assert states_equal(module, ref_module)
    assert without_time(result.history) == without_time(reference.history)
    # a run without the scaler does not take the checkpoint
    with pytest.raises(CheckpointError, match="gradient scaler"):
        engine_run(config, path, hooks=[CountEpochs()])


def test_engine_checkpoint_of_a_finished_run_trains_nothing(tmp_path):
    path = tmp_path / "run.ckpt"
    first, module = engine_run(CONFIGS["early_stopping"], path, hooks=[Hook()])
    counter = CountEpochs()
    again, same = engine_run(CONFIGS["early_stopping"], path, hooks=[counter])
    assert counter.n == 0 and again.n_resumed == first.n_epochs
    assert again.stopped_early and again.best_epoch == first.best_epoch
    assert states_equal(module, same)


def test_engine_refuses_another_run(tmp_path):
    path = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        engine_run({}, path, hooks=[StopAt(2)], fingerprint={"lr": 1, "n": 2})
    with pytest.raises(CheckpointError, match=r"lr differ \(1 in the checkpoint, 3"):
        engine_run({}, path, fingerprint={"lr": 3, "n": 2})


def test_keyboard_interrupt_after_a_resume_keeps_the_restored_epochs(tmp_path):
    path = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        engine_run({}, path, hooks=[StopAt(3)])

    class Interrupt(Hook):
        def after_step(self, engine, batch, outputs):
            raise KeyboardInterrupt

    with pytest.warns(UserWarning, match="resume from the checkpoint"):
        result, module = engine_run({}, path, hooks=[Interrupt()])
    assert result.interrupted and result.n_epochs == 3 and result.best_epoch == 2
    # the module holds the checkpoint's weights, not the half-trained step
    saved = Checkpoint(path, {"run": 1})
    saved.read()
    assert all(
        torch.equal(v, saved.state["module"][k]) for k, v in module.state_dict().items()
    )


# ---------------------------------------------------------------------------
# the file: atomic, checked, refused when foreign
# ---------------------------------------------------------------------------
def write(path, fingerprint=None, start=None, complete=False, state=None):
    checkpoint = Checkpoint(path, fingerprint or {"a": 1}, start=start)
    checkpoint.read()
    checkpoint.save(state or {"w": torch.arange(1000.0)}, complete=complete)
    return checkpoint


def corrupt(path, how):
    data = path.read_bytes()
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped":
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]
    elif how == "empty":
        data = b""
    elif how == "garbage":
        data = b"PK\x03\x04" + os.urandom(200)
    elif how == "header":
        data = data.replace(b" 1\n", b" x\n", 1)
    path.write_bytes(data)


@pytest.mark.parametrize(
    "how, message",
    [
        ("truncated", "truncated or corrupt"),
        ("flipped", "checksum does not match"),
        ("empty", "not a neurovae checkpoint"),
        ("garbage", "not a neurovae checkpoint"),
        ("header", "corrupt checkpoint header"),
    ],
)
def test_corrupt_files_are_reported_never_loaded(tmp_path, how, message, monkeypatch):
    path = tmp_path / "run.ckpt"
    write(path)
    corrupt(path, how)
    before = path.read_bytes()
    loaded = []
    original = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: loaded.append(1) or original(*a, **k)
    )
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(path, {"a": 1}).read()
    assert "Delete it" in str(info.value) and str(path) in str(info.value)
    assert not loaded  # the checksum is checked before anything is unpickled
    assert path.read_bytes() == before  # reported, not removed or rewritten


def test_files_load_with_weights_only_and_hold_the_fingerprint(tmp_path):
    path = tmp_path / "run.ckpt"
    write(path, fingerprint={"a": [1, 2]}, complete=True)
    checkpoint = Checkpoint(path, {"a": (1, 2)})  # tuples are lists in JSON
    assert checkpoint.read() and checkpoint.complete
    assert torch.equal(checkpoint.state["w"], torch.arange(1000.0))
    header = path.read_bytes()[:100]
    assert header.startswith(b"NEUROVAE-CHECKPOINT 1\n")


def test_writes_are_atomic_and_leave_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "run.ckpt"
    checkpoint = write(path, state={"w": torch.zeros(3)})
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"w": torch.ones(3)}, complete=False)
    assert path.read_bytes() == before  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".run.ckpt.{dead.pid}.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    alive = tmp_path / f".run.ckpt.{os.getppid()}.abc123.tmp"
    alive.write_bytes(b"another process is writing")
    write(tmp_path / "run.ckpt")
    assert not stale.exists() and alive.exists()


def test_unfinished_run_with_another_start_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    write(path, start={"epoch": 0}, complete=False)
    with pytest.raises(CheckpointError, match="unfinished fit"):
        Checkpoint(path, {"a": 1}, start={"epoch": 5}).read()
    write(path, start={"epoch": 0}, complete=True)
    replaced = Checkpoint(path, {"a": 1}, start={"epoch": 5})
    assert not replaced.read() and replaced.state is None
    replaced.save({"w": torch.ones(1)}, complete=False)
    assert Checkpoint(path, {"a": 1}, start={"epoch": 5}).read()


def test_a_second_writer_is_detected(tmp_path):
    path = tmp_path / "run.ckpt"
    mine = write(path)
    write(path, fingerprint={"a": 1})  # another process, same file
    with pytest.raises(CheckpointError, match="another process"):
        mine.save({"w": torch.zeros(1)}, complete=False)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "run.ckpt"
    write(path)
    path.write_bytes(path.read_bytes().replace(b" 1\n", b" 99\n", 1))
    with pytest.raises(CheckpointError, match="version 99"):
        Checkpoint(path, {"a": 1}).read()


# ---------------------------------------------------------------------------
# the estimators
# ---------------------------------------------------------------------------
@pytest.fixture
def flat():
    return np.random.default_rng(0).normal(size=(64, 20))


@pytest.fixture
def vols():
    return np.random.default_rng(0).normal(size=(12, 8, 8, 8)).astype(np.float32)


MLP = dict(
    n_components=3, hidden_layer_sizes=(16,), batch_size=16, device="cpu", max_iter=8
)
VERY_DEEP = dict(
    channels=(4, 4),
    channels_hidden=(2, 2),
    channels_per_latent=(1, 1),
    latents_per_resolution=(1, 1),
    kernel_sizes=(1, 3),
    batch_size=4,
    max_iter=6,
    global_only_iter=2,  # the spatial groups open after a resumable epoch
    device="cpu",
)

CASES = {
    "VAE": (VAE, dict(MLP, random_state=0)),
    "VAE-early-stopping": (
        VAE,
        dict(MLP, random_state=0, early_stopping=True, n_iter_no_change=2, tol=0.5),
    ),
    "BetaVAE-cyclical": (
        BetaVAE,
        dict(MLP, random_state=0, beta_schedule="cyclical", n_cycles=2),
    ),
    "ContrastiveVAE": (
        ContrastiveVAE,
        dict(MLP, random_state=0, n_salient_components=2, batch_size=8),
    ),
    # the closed-form transition is solved by a hook after every epoch
    "RecurrentVAE-table": (
        RecurrentVAE,
        dict(MLP, random_state=0, batch_size=3, subject_effects="table"),
    ),
    "VeryDeepVAE-ema": (
        VeryDeepVAE,
        dict(VERY_DEEP, random_state=0, ema_decay=0.9, skip_threshold=1e6),
    ),
}


def fit_args(cls, flat, vols):
    if cls is VeryDeepVAE:
        return (vols,)
    if cls is ContrastiveVAE:
        return flat, np.arange(len(flat)) % 3 == 0
    if cls is RecurrentVAE:
        return (flat.reshape(8, 8, 20),)  # 8 runs of 8 time points
    return (flat,)


def interrupted_fit(est, args, epoch, monkeypatch):
    """Fit ``est``, killed by an exception when epoch ``epoch`` begins."""
    original = Engine._train_epoch

    def train_epoch(self, train):
        if self.epoch == epoch:
            raise Stop
        return original(self, train)

    with monkeypatch.context() as m:
        m.setattr(Engine, "_train_epoch", train_epoch)
        with pytest.raises(Stop):
            est.fit(*args)


def assert_same_fit(a, b):
    assert states_equal(a.module_, b.module_)
    assert without_time(a.history_) == without_time(b.history_)
    assert (a.n_iter_, a.best_epoch_) == (b.n_iter_, b.best_epoch_)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_fit_equals_an_uninterrupted_one(
    case, flat, vols, tmp_path, monkeypatch, one_thread
):
    cls, params = CASES[case]
    args = fit_args(cls, flat, vols)
    reference = cls(**params).fit(*args)
    stop = min(3, reference.n_iter_ - 1)
    est = cls(**params, checkpoint_dir=tmp_path)
    interrupted_fit(est, args, stop, monkeypatch)
    assert not hasattr(est, "module_")  # a failed fit leaves no model
    assert sorted(os.listdir(tmp_path)) == [f"{cls.__name__}.ckpt"]
    resumed = clone(est).fit(*args)
    assert_same_fit(resumed, reference)
    np.testing.assert_array_equal(
        resumed.transform(args[0]), reference.transform(args[0])
    )
    # the finished checkpoint is kept: fitting again trains nothing
    monkeypatch.setattr(Engine, "_train_epoch", None)  # would fail if called
    assert_same_fit(clone(est).fit(*args), reference)


def test_parameters_that_do_not_matter_still_resume(flat, tmp_path, monkeypatch):
    params = dict(MLP, random_state=0, checkpoint_dir=tmp_path)
    interrupted_fit(VAE(**params), (flat,), 2, monkeypatch)
    other_dir = tmp_path / "moved"
    os.makedirs(other_dir)
    os.replace(tmp_path / "VAE.ckpt", other_dir / "VAE.ckpt")
    est = VAE(**{**params, "checkpoint_dir": str(other_dir)}, verbose=2)
    est.set_params(num_workers=2, warm_start=True, device="cpu")
    resumed = est.fit(flat)
    assert_same_fit(resumed, VAE(**dict(MLP, random_state=0)).fit(flat))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(max_iter=9), r"parameters differ \(max_iter: 8 in the checkpoint, 9 now"),
        (dict(learning_rate_init=0.01), "learning_rate_init"),
        (dict(random_state=1), "random_state: 0 in the checkpoint, 1 now"),
        (dict(hidden_layer_sizes=[16]), None),  # a list equals the tuple: resumed
    ],
)
def test_changed_parameters_are_refused(flat, tmp_path, monkeypatch, change, match):
    params = dict(MLP, random_state=0, checkpoint_dir=tmp_path)
    interrupted_fit(VAE(**params), (flat,), 2, monkeypatch)
    before = (tmp_path / "VAE.ckpt").read_bytes()
    est = VAE(**{**params, **change})
    if match is None:
        assert est.fit(flat).n_iter_ == 8
        return
    with pytest.raises(CheckpointError, match=match) as info:
        est.fit(flat)
    assert "Delete the file" in str(info.value) and "VAE.ckpt" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not hasattr(est, "module_")
    assert (tmp_path / "VAE.ckpt").read_bytes() == before  # left as it was


def test_changed_data_are_refused(flat, tmp_path, monkeypatch):
    params = dict(MLP, random_state=0, checkpoint_dir=tmp_path)
    interrupted_fit(VAE(**params), (flat,), 2, monkeypatch)
    changed = flat.copy()
    changed[5, 3] += 1e-9
    with pytest.raises(CheckpointError, match=r"data differ \(other values\)"):
        VAE(**params).fit(changed)
    with pytest.raises(CheckpointError, match=r"shape: \[64, 20\] in the checkpoint"):
        VAE(**params).fit(flat[:60])
    with pytest.raises(CheckpointError, match="dtype"):
        VAE(**params).fit(flat.astype(np.float32))


def test_changed_groups_are_refused(flat, tmp_path, monkeypatch):
    params = dict(MLP, random_state=0, checkpoint_dir=tmp_path)
    params["background_label"] = "control"
    odd = np.arange(64) % 2 == 1
    y = np.where(odd, "patient", "control")
    interrupted_fit(ContrastiveVAE(**params), (flat, y), 2, monkeypatch)
    with pytest.raises(CheckpointError, match="other targets"):
        ContrastiveVAE(**params).fit(flat, np.where(odd, "control", "patient"))
    # another name for the same target group: the same training data
    ContrastiveVAE(**params).fit(flat, np.where(odd, "case", "control"))


def test_corrupt_checkpoint_stops_the_fit(flat, tmp_path, monkeypatch):
    params = dict(MLP, random_state=0, checkpoint_dir=tmp_path)
    interrupted_fit(VAE(**params), (flat,), 2, monkeypatch)
    corrupt(tmp_path / "VAE.ckpt", "truncated")
    est = VAE(**params)
    with pytest.raises(CheckpointError, match="truncated or corrupt.*Delete it"):
        est.fit(flat)
    assert not hasattr(est, "module_")
    os.remove(tmp_path / "VAE.ckpt")  # as the message says
    assert_same_fit(est.fit(flat), VAE(**dict(MLP, random_state=0)).fit(flat))


def test_random_state_none_resumes_the_interrupted_seed(flat, tmp_path, monkeypatch):
    params = dict(MLP, random_state=None, checkpoint_dir=tmp_path)
    interrupted_fit(VAE(**params), (flat,), 3, monkeypatch)
    resumed = VAE(**params).fit(flat)
    # the same run as an uninterrupted fit seeded with the stored seed
    seeded = VAE(**dict(MLP, random_state=resumed._seed)).fit(flat)
    assert_same_fit(resumed, seeded)


def test_warm_start_continues_and_resumes(flat, tmp_path, monkeypatch):
    """A warm start replaces the finished checkpoint of the fit it continues;
    a warm fit killed and run again from the same model resumes."""
    params = dict(MLP, random_state=0, checkpoint_dir=tmp_path, warm_start=True)
    reference = VAE(**dict(MLP, random_state=0, warm_start=True)).fit(flat).fit(flat)
    est = VAE(**params).fit(flat)
    interrupted_fit(est, (flat,), 11, monkeypatch)  # during the continuation
    assert est.n_iter_ == 8  # a failed warm fit changes nothing
    # a cold fit does not take the unfinished continuation for its own
    with pytest.raises(CheckpointError, match="unfinished fit"):
        VAE(**params).fit(flat)
    assert_same_fit(est.fit(flat), reference)
    assert est.n_iter_ == 16 and len(est.history_["loss"]) == 16


def test_every_estimator_has_the_parameter(tmp_path):
    for cls in (VAE, BetaVAE, ContrastiveVAE, RecurrentVAE, VeryDeepVAE):
        est = cls(checkpoint_dir=tmp_path)
        assert est.get_params()["checkpoint_dir"] == tmp_path
        assert clone(est).checkpoint_dir == tmp_path
        assert cls().checkpoint_dir is None
        assert "checkpoint_dir : str, path-like or None" in cls.__doc__
    with pytest.raises(ValueError, match="checkpoint_dir"):
        VAE(checkpoint_dir=3).fit(np.zeros((4, 2)))


def test_very_deep_config_file_is_fingerprinted_by_content(
    vols, tmp_path, monkeypatch, one_thread
):
    config = tmp_path / "config.json"
    config.write_text('{"total_epochs": 4}')
    params = dict(VERY_DEEP, random_state=0, config=str(config))
    params["checkpoint_dir"] = tmp_path / "ckpt"
    interrupted_fit(VeryDeepVAE(**params), (vols,), 1, monkeypatch)
    config.write_text('{"total_epochs": 5}')
    with pytest.raises(CheckpointError, match="parameters differ.*config"):
        VeryDeepVAE(**params).fit(vols)
    config.write_text('{"total_epochs": 4}')
    assert VeryDeepVAE(**params).fit(vols).n_iter_ == 4


def test_image_files_are_fingerprinted_by_path_size_and_time(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"sub-{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.full((4, 4, 4), float(i)), np.eye(4)), path)
        paths.append(str(path))
    digest = data_digest(check_niimgs(paths))
    assert data_digest(check_niimgs(paths)) == digest
    assert data_digest(check_niimgs(paths[::-1])) != digest
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert data_digest(check_niimgs(paths)) != digest


# ---------------------------------------------------------------------------
# reliability: a fit killed with SIGKILL at a random moment
# ---------------------------------------------------------------------------
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    from neurovae import VAE
    from neurovae.training import Engine

    torch.set_num_threads(1)
    original = Engine._train_epoch

    def slow_epoch(self, train):  # widens the window for the kill
        time.sleep(0.03)
        return original(self, train)

    Engine._train_epoch = slow_epoch
    X = np.random.default_rng(0).normal(size=(64, 20))
    est = VAE(n_components=3, hidden_layer_sizes=(16,), batch_size=8,
              max_iter=20, device="cpu", random_state=0,
              checkpoint_dir=sys.argv[1]).fit(X)
    torch.save(est.module_.state_dict(), sys.argv[2])
    """
)


def version(path):
    """What tells two versions of a file apart (None: no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("n_kills", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_fit_killed_with_sigkill_resumes_bitwise(n_kills, tmp_path, one_thread):
    """A fit in a subprocess is killed with SIGKILL at random moments after
    its first checkpoint, then run to the end: its weights are bitwise those
    of an uninterrupted fit, and no temporary file is left behind."""
    rng = random.Random()
    directory, weights = tmp_path / "ckpt", tmp_path / "weights.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    command = [sys.executable, "-c", SCRIPT, str(directory), str(weights)]
    kills = 0
    for _ in range(n_kills):  # kills at random moments, then a complete run
        before = version(directory / "VAE.ckpt")
        process = subprocess.Popen(command, env=env)
        deadline = time.monotonic() + 60
        # wait for a checkpoint written by this process
        while version(directory / "VAE.ckpt") == before and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        process.send_signal(signal.SIGKILL)
        returncode = process.wait()
        if weights.exists():
            # the fit had ended and saved its weights: the signal came while
            # the interpreter exited, so this was no kill during the fit
            weights.unlink()
            continue
        kills += returncode == -signal.SIGKILL
    assert kills >= 1, "the fit ended before it could be killed"
    subprocess.run(command, env=env, check=True, timeout=120)
    resumed = torch.load(weights, weights_only=True)
    X = np.random.default_rng(0).normal(size=(64, 20))
    reference = VAE(
        n_components=3,
        hidden_layer_sizes=(16,),
        batch_size=8,
        max_iter=20,
        device="cpu",
        random_state=0,
    ).fit(X)
    expected = reference.module_.state_dict()
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert [p.name for p in directory.iterdir()] == ["VAE.ckpt"]


def test_checkpoint_dir_travels_with_the_model(flat, tmp_path):
    est = VAE(**dict(MLP, max_iter=2), checkpoint_dir=tmp_path / "ckpt").fit(flat)
    est.save(tmp_path / "model.nvae")
    loaded = load(tmp_path / "model.nvae")
    assert loaded.checkpoint_dir == str(tmp_path / "ckpt")
    np.testing.assert_array_equal(loaded.transform(flat), est.transform(flat))


def test_a_file_in_place_of_the_directory_fails_before_training(flat, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        VAE(**MLP, checkpoint_dir=tmp_path / "file").fit(flat)


def test_warm_start_with_other_parameters_replaces_the_finished_checkpoint(
    flat, tmp_path
):
    """Training a fitted model further with more epochs (or another learning
    rate) continues it: its own finished checkpoint is replaced, not refused;
    another model's checkpoint still is."""
    est = VAE(**dict(MLP, random_state=0, checkpoint_dir=tmp_path)).fit(flat)
    reference = VAE(**dict(MLP, random_state=0)).fit(flat)
    reference.set_params(warm_start=True, max_iter=3, learning_rate_init=1e-4)
    est.set_params(warm_start=True, max_iter=3, learning_rate_init=1e-4)
    assert_same_fit(est.fit(flat), reference.fit(flat))
    assert est.n_iter_ == MLP["max_iter"] + 3
    # the file now holds the continuation: fitting the model again continues
    # it again (a new start), while a cold fit of the first settings is refused
    with pytest.raises(CheckpointError, match="another fit"):
        VAE(**dict(MLP, random_state=0, checkpoint_dir=tmp_path)).fit(flat)
    other = VAE(**dict(MLP, random_state=1)).fit(flat)
    other.set_params(warm_start=True, max_iter=3, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="another fit"):
        other.fit(flat)  # a different model's weights: not a continuation
