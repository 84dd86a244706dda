"""Distributed training (torchrun / DDP) on the CPU with Gloo.

The multi-process tests start 2 processes with ``torch.multiprocessing`` (and
one with ``torchrun``), run small fits in them and compare, within float
tolerance, with the same fits in one process: the same global batches, the
same random draws per sample, so the same training up to float rounding.
They take seconds each (starting processes that import torch) and are marked
slow; ``.ci/run`` runs them with ``pytest -m slow``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from neurovae import VAE, ContrastiveVAE, RecurrentVAE, VeryDeepVAE
from neurovae.nn import batch_shard, standard_normal
from neurovae.training import (
    DatasetBatches,
    TensorBatches,
    is_main_process,
    launched,
    resolve_distributed,
)

ATOL = 1e-5
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------
# one process: sharding, noise, parameter
# ----------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("grouped", [False, True])
def test_shares_make_up_the_global_batches(world_size, grouped):
    """Across ranks the shares hold each global batch once, in order, and
    every rank holds the same number of batches (stand-ins included)."""
    n = 23
    x = torch.arange(float(n))
    groups = (torch.arange(n) % 3 == 0) if grouped else None

    def batches(shard=None):
        return TensorBatches(
            (x,),
            5,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
            groups=groups,
            shard=shard,
        )

    whole = [b[0] for b in batches()]
    per_rank = [list(batches((r, world_size))) for r in range(world_size)]
    shards = [batches((r, world_size)).shards() for r in range(world_size)]
    assert all(len(p) == len(whole) for p in per_rank)
    for i, batch in enumerate(whole):
        got = torch.empty_like(batch)
        seen = torch.zeros(len(batch), dtype=torch.bool)
        for r in range(world_size):
            shard = shards[r][i]
            assert shard.n_global == len(batch)
            local = per_rank[r][i][0]
            if shard.n_local == 0:  # a stand-in of weight 0
                assert len(local) == 1
                continue
            assert len(local) == shard.n_local
            got[shard.positions] = local
            seen[shard.positions] = True
        assert seen.all() and torch.equal(got, batch)
    if grouped:  # every rank holds the same share of each group
        for i in range(len(whole)):
            for r in range(world_size):
                local = per_rank[r][i][0]
                if shards[r][i].n_local:
                    is_target = (local % 3 == 0).long()
                    assert int(is_target.sum()) * 2 == len(local)


def test_dataset_batches_read_only_their_share():
    read = []

    class Recording(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            read.append(i)
            return (torch.tensor(float(i)),)

    shard = (1, 2)
    generator = torch.Generator().manual_seed(0)
    batches = DatasetBatches(Recording(), 4, shuffle=True, generator=generator)
    whole = [b[0].tolist() for b in batches]
    read.clear()
    generator.manual_seed(0)
    mine = DatasetBatches(
        Recording(), 4, shuffle=True, generator=generator, shard=shard
    )
    local = [b[0].tolist() for b in mine]
    assert local == [w[(len(w) + 1) // 2 :] for w in whole]
    assert sorted(read) == sorted(int(v) for b in local for v in b)


def test_noise_of_a_share_is_that_of_the_global_batch():
    whole = standard_normal((6, 4), torch.Generator().manual_seed(3))
    positions = torch.tensor([1, 4, 5])
    with batch_shard(positions, 6):
        part = standard_normal((3, 4), torch.Generator().manual_seed(3))
        other = standard_normal((2, 4), torch.Generator().manual_seed(3))
    assert torch.equal(part, whole[positions])
    assert other.shape == (2, 4)  # not per-sample noise of this batch


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in _TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)


def test_distributed_true_without_a_launch_is_a_clear_error(no_torchrun):
    X = np.random.default_rng(0).normal(size=(20, 5))
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        VAE(max_iter=1, distributed=True).fit(X)
    assert not launched() and is_main_process(True)
    assert resolve_distributed("auto", "cpu") == (None, torch.device("cpu"))


def test_distributed_parameter_is_validated():
    X = np.random.default_rng(0).normal(size=(20, 5))
    with pytest.raises(ValueError, match="distributed"):
        VAE(max_iter=1, distributed="yes").fit(X)


def test_non_zero_rank_does_not_save(tmp_path, monkeypatch):
    X = np.random.default_rng(0).normal(size=(20, 5))
    vae = VAE(n_components=2, max_iter=1, random_state=0).fit(X)
    monkeypatch.setenv("RANK", "1")
    vae.save(tmp_path / "rank1.nvae")
    assert not (tmp_path / "rank1.nvae").exists()
    vae.set_params(distributed=False).save(tmp_path / "own.nvae")
    assert (tmp_path / "own.nvae").exists()
    assert "distributed" not in VAE()._fingerprint_params()


# ----------------------------------------------------------------------
# two processes
# ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vae_data():
    return np.random.default_rng(0).normal(size=(67, 20)).astype(np.float32)


def _contrastive_data():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(67, 12)).astype(np.float32)
    y = np.r_[np.zeros(40, int), np.ones(27, int)]
    return X, y


def _volumes():
    return np.random.default_rng(2).normal(size=(9, 6, 6, 6)).astype(np.float32)


def _fits(distributed, checkpoint_dir):
    """The fits compared between 1 and 2 processes, by name."""
    common = dict(random_state=0, distributed=distributed, learning_rate_init=3e-3)
    X = _vae_data()
    out = {}
    # 67 samples in batches of 16: 8 + 8 per rank, and a last batch of 3
    # split 2 + 1 (losses weighted by share); clipping measures the norm
    out["vae"] = VAE(
        n_components=3,
        hidden_layer_sizes=(16,),
        batch_size=16,
        max_iter=3,
        max_grad_norm=5.0,
        verbose=2,
        **common,
    ).fit(X)
    # early stopping: validation split, all-reduced validation loss
    out["early"] = VAE(
        n_components=2,
        hidden_layer_sizes=(16,),
        batch_size=10,
        max_iter=40,
        early_stopping=True,
        validation_fraction=0.3,
        n_iter_no_change=2,
        tol=0.05,
        **common,
    ).fit(X)
    # groups drawn 5 + 5 per step, split 3 + 3 / 2 + 2: discriminator codes
    # gathered across ranks
    Xc, y = _contrastive_data()
    out["contrastive"] = ContrastiveVAE(
        n_components=2,
        n_salient_components=2,
        hidden_layer_sizes=(16,),
        batch_size=5,
        max_iter=2,
        **common,
    ).fit(Xc, y)
    # checkpoints: written by rank 0 only, resumed by every rank; 65 samples
    # in batches of 16 end with one sample, a stand-in of weight 0 on rank 1
    ckpt = dict(
        n_components=2,
        hidden_layer_sizes=(8,),
        batch_size=16,
        max_iter=2,
        checkpoint_dir=checkpoint_dir,
        **common,
    )
    out["checkpoint"] = VAE(**ckpt).fit(X[:65])
    out["resumed"] = VAE(**ckpt, verbose=2).fit(X[:65])  # finished: no training
    # a hierarchy of latent groups: per-sample noise at every group drawn for
    # the global batch, the rank keeping its rows (and so the choice of the
    # samples trained through the global latent alone, global_only_fraction);
    # 9 volumes in batches of 4 end with one volume, a stand-in of weight 0
    # on rank 1
    out["very_deep"] = VeryDeepVAE(
        channels=(4, 8),
        channels_hidden=(2, 4),
        channels_per_latent=(1, 2),
        latents_per_resolution=(1, 1),
        kernel_sizes=(3, 3),
        batch_size=4,
        max_iter=2,
        warmup_iter=0,
        global_only_iter=1,
        **common,
    ).fit(_volumes())
    # the closed-form transition: its sufficient statistics summed over the
    # processes; 7 runs of one length in batches of 3 (2 + 1, ..., 1 + 0)
    out["recurrent"] = RecurrentVAE(
        n_components=2,
        hidden_layer_sizes=(8,),
        batch_size=3,
        max_iter=2,
        **common,
    ).fit(_runs())
    return out


def _runs():
    return np.random.default_rng(3).normal(size=(7, 5, 6)).astype(np.float32)


def _inputs(estimator):
    if isinstance(estimator, VeryDeepVAE):
        return _volumes()
    if isinstance(estimator, RecurrentVAE):
        return _runs()
    return _vae_data()[:, : estimator.n_features_in_]


def _summary(estimator) -> dict:
    return {
        "state": {k: v.clone() for k, v in estimator.module_.state_dict().items()},
        "history": {k: v for k, v in estimator.history_.items() if k != "time"},
        "n_iter": estimator.n_iter_,
        "transform": estimator.transform(_inputs(estimator)),
    }


def _worker(rank, world_size, port, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    log = os.path.join(out_dir, f"stdout{rank}.txt")
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        fits = _fits("auto", os.path.join(out_dir, "ckpt"))
        fits["vae"].save(os.path.join(out_dir, "model.nvae"))
    torch.save(
        {name: _summary(est) for name, est in fits.items()},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    torch.multiprocessing.spawn(
        _worker, args=(2, _free_port(), out_dir), nprocs=2, join=True
    )
    ranks = [
        torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
        for r in range(2)
    ]
    return out_dir, ranks


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("single"))
    fits = _fits(False, os.path.join(out_dir, "ckpt"))
    return {name: _summary(est) for name, est in fits.items()}


def _assert_close(a, b, atol=ATOL):
    assert a["n_iter"] == b["n_iter"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        torch.testing.assert_close(
            a["state"][key], b["state"][key], atol=atol, rtol=0, msg=key
        )
    assert a["history"].keys() == b["history"].keys()
    for key in a["history"]:
        np.testing.assert_allclose(
            a["history"][key], b["history"][key], atol=atol, rtol=1e-6, err_msg=key
        )
    np.testing.assert_allclose(a["transform"], b["transform"], atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["vae", "early", "contrastive", "checkpoint", "very_deep", "recurrent"],
)
def test_two_processes_match_one(two_processes, one_process, name):
    _, ranks = two_processes
    # every rank ends with the same weights (bitwise), and those of one process
    for key, value in ranks[0][name]["state"].items():
        assert torch.equal(value, ranks[1][name]["state"][key]), key
    _assert_close(ranks[0][name], one_process[name])


@pytest.mark.slow
def test_two_processes_early_stopping_stops_together(two_processes):
    _, ranks = two_processes
    early = [r["early"] for r in ranks]
    assert early[0]["n_iter"] == early[1]["n_iter"] < 40
    assert early[0]["history"]["val_loss"] == early[1]["history"]["val_loss"]


@pytest.mark.slow
def test_two_processes_rank_zero_prints_and_writes(two_processes, one_process):
    out_dir, ranks = two_processes
    with open(os.path.join(out_dir, "stdout0.txt")) as f:
        printed = f.read()
    with open(os.path.join(out_dir, "stdout1.txt")) as f:
        assert f.read() == ""
    assert printed.count("[VAE.fit] epoch") == 3
    assert "resuming a finished run" in printed
    assert os.path.exists(os.path.join(out_dir, "model.nvae"))
    assert os.listdir(os.path.join(out_dir, "ckpt")) == ["VAE.ckpt"]
    # the resumed fit trained nothing and kept the checkpointed weights
    _assert_close(ranks[0]["resumed"], ranks[0]["checkpoint"], atol=0)
    _assert_close(ranks[0]["resumed"], one_process["resumed"])


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_one(two_processes):
    """The fingerprint leaves ``distributed`` out: a run of 2 processes is
    a finished run for one process too."""
    out_dir, ranks = two_processes
    params = dict(
        n_components=2,
        hidden_layer_sizes=(8,),
        batch_size=16,
        max_iter=2,
        random_state=0,
        learning_rate_init=3e-3,
        checkpoint_dir=os.path.join(out_dir, "ckpt"),
        distributed=False,
    )
    vae = VAE(**params).fit(_vae_data()[:65])
    _assert_close(_summary(vae), ranks[0]["checkpoint"], atol=0)


_SCRIPT = """
import json, sys
import numpy as np
import torch.distributed as dist
from neurovae import VAE

X = np.random.default_rng(0).normal(size=(40, 10))
vae = VAE(n_components=2, hidden_layer_sizes=(8,), batch_size=8, max_iter=2,
          random_state=0, verbose=2).fit(X)
Z = vae.transform(X)
vae.save(sys.argv[1] + "/model.nvae")
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump({"world": dist.get_world_size(), "z": float(Z.sum())}, f)
"""


@pytest.mark.slow
def test_torchrun_smoke(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["z"] == ranks[1]["z"]  # identical weights on both ranks
    assert done.stdout.count("[VAE.fit] epoch") == 2  # rank 0 only
    assert (tmp_path / "model.nvae").exists()
