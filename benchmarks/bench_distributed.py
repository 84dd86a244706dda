"""Scaling of distributed training: 1 and 2 Gloo processes on the CPU.

``VAE(backbone="conv")`` on smooth random volumes, trained by one process
(``distributed=False``) and by two processes under DDP with Gloo (the
global batch split between them), each process with one torch thread. Both
are started the same way (``torch.multiprocessing.spawn``) and interleaved,
and the script prints, side by side, seconds per epoch, throughput
(training samples per second) and the parallel efficiency
``throughput_2 / (2 x throughput_1)``; it also checks that both runs did the
same computation (final weights within float tolerance).

Usage::

    python benchmarks/bench_distributed.py --quick   # smoke test
    python benchmarks/bench_distributed.py           # full run
    python benchmarks/bench_distributed.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import (  # noqa: E402
    CPUWatch,
    _busy_note,
    machine_info,
    smooth_volumes,
    usable_cpus,
)

SEED = 0
FULL = dict(n_volumes=64, size=32, batch_size=16, epochs=4, repeats=2)
QUICK = dict(n_volumes=16, size=16, batch_size=8, epochs=2, repeats=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, settings, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from neurovae import VAE

    rng = np.random.default_rng(SEED)
    X = smooth_volumes(rng, settings["n_volumes"], settings["size"])
    vae = VAE(
        n_components=8,
        backbone="conv",
        batch_size=settings["batch_size"],
        max_iter=settings["epochs"],
        random_state=SEED,
        device="cpu",
        distributed=world_size > 1,
    )
    tic = time.perf_counter()
    vae.fit(X)
    wall = time.perf_counter() - tic
    if rank == 0:
        torch.save(
            {
                "times": vae.history_["time"],
                "loss": vae.history_["loss"],
                "wall": wall,
                "state": vae.module_.state_dict(),
            },
            os.path.join(out_dir, f"world{world_size}.pt"),
        )


def run(world_size: int, settings: dict, out_dir: str) -> dict:
    torch.multiprocessing.spawn(
        _worker,
        args=(world_size, _free_port(), settings, out_dir),
        nprocs=world_size,
        join=True,
    )
    return torch.load(os.path.join(out_dir, f"world{world_size}.pt"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test")
    for key in FULL:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in FULL:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)

    info = machine_info(torch.device("cpu"))
    print("=" * 78)
    print("neurovae distributed scaling (benchmarks/bench_distributed.py)")
    print("=" * 78)
    print(
        f"neurovae {info['neurovae']} (git {info['git']}) | torch {info['torch']} | "
        f"Python {info['python']}"
    )
    print(
        f"cpu: {info['cpu']} | usable cpus={info['cpus_usable']} | "
        "1 torch thread per process | backend: gloo"
    )
    if "loadavg_start" in info:
        print(f"load average at start (1, 5, 15 min): {info['loadavg_start']}")
    s = settings
    print(
        f"VAE(backbone='conv', n_components=8) on {s['n_volumes']} volumes of "
        f"{s['size']}^3, global batch {s['batch_size']}, {s['epochs']} epochs, "
        f"{s['repeats']} repeat(s){' (QUICK)' if args.quick else ''}"
    )
    print()

    watch = CPUWatch(usable_cpus())
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as out_dir:
        for repeat in range(settings["repeats"]):
            order = (1, 2) if repeat % 2 == 0 else (2, 1)
            for world_size in order:
                runs[world_size].append(run(world_size, settings, out_dir))
    share = watch.foreign_share()

    rows = {}
    for world_size, results in runs.items():
        # epochs 2..N of every repeat (epoch 1 includes warm-up)
        epochs = [t for r in results for t in r["times"][1:]] or [
            t for r in results for t in r["times"]
        ]
        epoch = statistics.median(epochs)
        rows[world_size] = {
            "epoch_s": epoch,
            "samples_per_s": settings["n_volumes"] / epoch,
            "fit_wall_s": statistics.median(r["wall"] for r in results),
        }
    efficiency = rows[2]["samples_per_s"] / (2 * rows[1]["samples_per_s"])
    a, b = runs[1][-1]["state"], runs[2][-1]["state"]
    max_dw = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    print(f"{'processes':>10}{'s/epoch':>12}{'samples/s':>12}{'fit wall s':>12}")
    for world_size, row in rows.items():
        print(
            f"{world_size:>10}{row['epoch_s']:>12.3f}{row['samples_per_s']:>12.1f}"
            f"{row['fit_wall_s']:>12.2f}"
        )
    print(f"speed-up: x{rows[2]['samples_per_s'] / rows[1]['samples_per_s']:.2f}")
    print(f"parallel efficiency (throughput_2 / (2 x throughput_1)): {efficiency:.2f}")
    print(f"same computation: max|dw| between 1 and 2 processes = {max_dw:.1e}")
    note = _busy_note(share)
    if note:
        print(note)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "info": info,
                    "settings": settings,
                    "rows": rows,
                    "efficiency": efficiency,
                    "max_dw": max_dw,
                    "foreign_cpu_share": share,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
