"""Streamed NIfTI training against in-memory training: speed and peak memory.

``VAE.fit`` takes a list of NIfTI file paths and reads the images lazily, one
batch at a time, through a torch ``DataLoader`` with ``num_workers`` worker
processes (``neurovae.io.VolumeDataset`` over a lazy ``ImageCollection``).
DESIGN.md section 6 asks that data loading never starves the model (streamed
training runs close to in-memory speed) and that memory stays bounded. This
script measures both, side by side in one run, on synthetic smooth volumes
(Gaussian-blurred noise) written with nibabel into a temporary directory:

0. **Same computation** -- on a small set, ``fit`` on the in-memory array and
   ``fit`` on the files (``.nii`` and ``.nii.gz``, 0 and 2 workers) must end
   with bit-identical weights and per-epoch losses (same seed, same batches in
   the same order).

1. **Throughput** -- ``--n-files`` volumes (default 300 of 20^3), trained
   with the default conv backbone at small ``--channels`` (default
   ``(4, 8, 16)``, a CPU epoch of a few seconds): in memory (the same data as
   one float32 array ``(n, x, y, z)``) and streamed from the files for each
   format (``.nii``, ``.nii.gz``) and each ``--workers`` count (default 0, 1,
   2). Each fit runs ``--epochs`` epochs; its figure is the median of
   ``history_["time"]`` over epochs 2..N (epoch 1 includes the worker
   start-up and is discarded). Runs are repeated ``--repeats`` times in the
   order in-memory, streamed .nii (workers ...), in-memory, streamed .nii.gz
   (workers ...), ..., ending with an in-memory run, the streamed order
   reversed every other repeat. Throughput ratio = in-memory epoch time /
   streamed epoch time (streamed samples/s over in-memory samples/s):
   ``ratio`` divides the medians over repeats; ``paired`` is the median over
   repeats of a streamed run against the mean of the two in-memory runs that
   bracket it in time (robust to the machine changing speed during the run,
   as in ``bench_engine.py``); ``spread`` is the min-max of the per-run
   figures. **Target: paired >= 0.9 with workers >= 1.** Workers = 0 is shown
   for reference (reading then happens in the training process, in series).

   Threads: torch's compute threads are set with ``torch.set_num_threads``
   for *both* sides of a comparison (in memory and streamed alike; DataLoader
   workers run single-threaded, as torch sets them). Each entry of
   ``--threads`` (default ``1,2``) gets its own table. With 1 compute thread
   on a 2-core machine a core is left for the reader processes, which is the
   situation the target is about (the data path, not CPU oversubscription);
   with 2 threads the machine is fully subscribed by training alone and any
   worker competes with it for the cores -- reported, not hidden.

   The ``read ms`` column is the cost of the data path per sample,
   measured separately in this process (``VolumeDataset`` items through a
   ``DataLoader`` with no worker, i.e. open, parse header, read or
   decompress, scale, collate), next to the compute cost per sample (in-memory
   epoch time / n). Without workers, the expected ratio is
   ``compute / (compute + read)``.

   The files were just written, so they come from the OS page cache: this
   measures the CPU side of the data path, not the disk.

2. **Peak memory** -- each configuration runs in a fresh subprocess
   (``python bench_streaming.py --child ...``) so that peaks do not mix: a
   streamed fit over N files and over k*N files (default 100 and 400 volumes
   of 64^3 float32, i.e. 1 MiB each, 100 and 400 MiB of ``.nii``), for each
   ``--memory-workers`` count, and for contrast an in-memory fit over the same
   files loaded as one array (preallocated, filled file by file). The child
   reports: its RSS after the imports and its peak RSS
   (``getrusage(RUSAGE_SELF).ru_maxrss``, exact, but including the ~100 MiB
   of library code); the largest peak RSS of its DataLoader workers
   (``getrusage(RUSAGE_CHILDREN)`` once they have exited); and the peak
   *total* of the process tree, sampled every 20 ms as the sum over the
   process and its workers of ``Pss_Anon + Pss_Shmem`` from
   ``/proc/<pid>/smaps_rollup`` -- heap, tensors and the batches passed
   through shared memory, with pages shared by the forked workers split
   between them rather than counted once per process, and without
   file-backed pages (library code, shared with every Python process on the
   machine, and page cache). **Target: streamed peak(k*N) / peak(N) <= 1.10**
   for both the tree total and the training process's ``ru_maxrss``, while
   the in-memory peak grows with the data.

   So that an epoch over 400 volumes of 64^3 takes seconds on a CPU, the
   memory runs use a minimal convolutional backbone by default
   (``--memory-model tiny``: one 8^3 stride-8 convolution in the encoder, one
   transposed in the decoder); the module is the same for N and k*N files,
   so any growth is the data path's. ``--memory-model conv`` uses the default
   conv backbone with ``--channels`` instead (minutes per epoch at 64^3).

Run ``python benchmarks/bench_streaming.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from neurovae import VAE
from neurovae.io import VolumeDataset, check_niimgs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import (  # noqa: E402
    BUSY_THRESHOLD,
    CPUWatch,
    finish_run,
    machine_info,
    max_state_diff,
    smooth_volumes,
    usable_cpus,
)

SEED = 0  # random_state of every fit and seed of the data
THROUGHPUT_TARGET = 0.90  # streamed / in-memory samples per second
MEMORY_TARGET = 1.10  # streamed peak(k*N) / peak(N)
N_COMPONENTS = 8
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # a 2 mm grid
FORMATS = ("nii", "nii.gz")
MIB = 2**20
# --quick: (n_files, size, epochs, repeats, mem_n, mem_k, mem_size, mem_epochs)
QUICK = (40, 12, 3, 1, 150, 4, 32, 1)


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------
def volume_path(directory: Path | str, index: int, fmt: str) -> str:
    """Path of volume ``index`` in ``directory`` (``fmt``: "nii" or "nii.gz")."""
    return os.path.join(directory, f"vol-{index:05d}.{fmt}")


def write_volumes(
    directory: Path, n: int, size: int, formats, seed: int = SEED, chunk: int = 50
) -> dict[str, list[str]]:
    """Write ``n`` volumes as 3-D float32 NIfTI files, once per format.

    The volumes are generated ``chunk`` at a time, so that writing 400 MiB
    does not hold 400 MiB. Returns the sorted paths of each format.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths: dict[str, list[str]] = {fmt: [] for fmt in formats}
    for start in range(0, n, chunk):
        vols = smooth_volumes(rng, min(chunk, n - start), size, np.float32)
        for offset, vol in enumerate(vols):
            img = nib.Nifti1Image(vol, AFFINE)
            for fmt in formats:
                path = volume_path(directory, start + offset, fmt)
                nib.save(img, path)
                paths[fmt].append(str(path))
    return paths


def load_array(paths: list[str]) -> np.ndarray:
    """The images of ``paths`` as one float32 array ``(n, x, y, z)``.

    What a user does to train in memory: one preallocated array, filled file
    by file (no list of arrays, so no transient second copy).
    """
    first = nib.load(paths[0])
    out = np.empty((len(paths), *first.shape), dtype=np.float32)
    for row, path in enumerate(paths):
        out[row] = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    return out


def files_mib(paths: list[str]) -> float:
    """Total size of the files ``paths`` on disk, in MiB."""
    return sum(os.path.getsize(p) for p in paths) / MIB


def read_cost(paths: list[str], batch_size: int, passes: int = 2) -> float:
    """Seconds per sample of the data path without workers (best of ``passes``).

    The estimator's own reader: a ``VolumeDataset`` over the lazy
    ``ImageCollection`` of ``paths``, batched by a ``DataLoader`` in this
    process (open, header, read or decompress, reshape, collate).
    """
    images = check_niimgs(paths)
    dataset = VolumeDataset(images, (1, *images.shape))
    best = math.inf
    for _ in range(passes):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        tic = time.perf_counter()
        for _batch in loader:
            pass
        best = min(best, time.perf_counter() - tic)
    return best / len(paths)


# ----------------------------------------------------------------------------
# 0. same computation
# ----------------------------------------------------------------------------
def check_identical(directory: Path, channels: tuple[int, ...]) -> list[dict]:
    """Fit in memory and streamed on 24 volumes of 16^3; compare the weights.

    Two epochs, batch 8 (so 3 batches per epoch, shuffled), same seed. Each
    streamed fit is compared with the in-memory fit, weights and losses.
    """
    paths = write_volumes(directory, 24, 16, FORMATS, seed=SEED + 1)
    params = dict(
        n_components=N_COMPONENTS,
        channels=channels,
        batch_size=8,
        max_iter=2,
        device="cpu",
        random_state=SEED,
    )
    ref = VAE(**params).fit(load_array(paths["nii"]))
    ref_state, ref_loss = ref.module_.state_dict(), ref.history_["loss"]
    rows = []
    for fmt, workers in (("nii", 0), ("nii", 2), ("nii.gz", 0), ("nii.gz", 2)):
        est = VAE(**params, num_workers=workers).fit(paths[fmt])
        dw = max_state_diff(ref_state, est.module_.state_dict())
        dloss = max(
            abs(a - b) for a, b in zip(ref_loss, est.history_["loss"], strict=True)
        )
        rows.append(
            {"format": fmt, "workers": workers, "max_dw": dw, "max_dloss": dloss}
        )
    return rows


def print_identical(rows: list[dict]) -> bool:
    """Print the weight comparison; True when every fit is bit-identical."""
    same = all(r["max_dw"] == 0.0 and r["max_dloss"] == 0.0 for r in rows)
    print(
        "Same computation (24 volumes of 16^3, batch 8, 2 epochs): streamed vs "
        "in-memory fit"
    )
    for r in rows:
        print(
            f"  .{r['format']:<7} workers={r['workers']}: max|dw|={r['max_dw']:.3g}, "
            f"max|dloss|={r['max_dloss']:.3g}"
        )
    print(f"  -> weights and losses bit-identical: {'yes' if same else 'NO'}")
    print()
    return same


# ----------------------------------------------------------------------------
# 1. throughput
# ----------------------------------------------------------------------------
def timed_fit(X, params: dict, workers: int) -> dict:
    """One ``VAE(**params, num_workers=workers).fit(X)``, timed.

    Returns the per-epoch times (``history_["time"]``), their median over
    epochs 2..N, the whole fit's wall time, and the share of the CPUs that
    other processes used meanwhile (the DataLoader workers are shut down and
    reaped before that is read, so their CPU time counts as this script's).
    """
    gc.collect()
    watch = CPUWatch(usable_cpus())
    est = VAE(**params, num_workers=workers)
    tic = time.perf_counter()
    est.fit(X)
    total = time.perf_counter() - tic
    times = [float(t) for t in est.history_["time"]]
    del est
    gc.collect()
    return {
        "epoch_times": times,
        "steady": statistics.median(times[1:]) if len(times) > 1 else math.nan,
        "total": total,
        "foreign": watch.foreign_share(),
    }


def _mean_or_none(values):
    """Mean of the values that are not None (None if there are none)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def throughput_schedule(formats, workers, repeats: int) -> list[tuple]:
    """The run order: ``("memory", None)`` before each format's group of
    streamed runs and once at the end; streamed order reversed on odd repeats."""
    order = []
    for rep in range(repeats):
        groups = [[(fmt, w) for w in workers] for fmt in formats]
        if rep % 2:
            groups = [g[::-1] for g in groups[::-1]]
        for group in groups:
            order.append(("memory", None))
            order.extend(group)
    order.append(("memory", None))
    return order


def bench_throughput(
    array: np.ndarray,
    paths: dict[str, list[str]],
    params: dict,
    workers: list[int],
    repeats: int,
    threads: int,
) -> dict:
    """Interleaved in-memory and streamed fits at ``threads`` compute threads."""
    torch.set_num_threads(threads)
    n = array.shape[0]
    formats = list(paths)
    schedule = throughput_schedule(formats, workers, repeats)
    print(
        f"[throughput] threads={threads}: {len(schedule)} fits of "
        f"{params['max_iter']} epochs ({n} volumes of {array.shape[1:]}) ...",
        flush=True,
    )
    # untimed warm-up: first calls, allocator, the files into the page cache
    warm = dict(params, max_iter=1)
    timed_fit(array, warm, 0)
    timed_fit(paths[formats[-1]], warm, max(workers))
    runs = []  # (key, result) in time order
    for key in schedule:
        fmt, w = key
        X = array if fmt == "memory" else paths[fmt]
        runs.append((key, timed_fit(X, params, w or 0)))

    memory_idx = [i for i, (key, _) in enumerate(runs) if key[0] == "memory"]
    rows = []
    configs = [("memory", None)] + [(fmt, w) for fmt in formats for w in workers]
    for key in configs:
        mine = [(i, r) for i, (k, r) in enumerate(runs) if k == key]
        steady = [r["steady"] for _, r in mine]
        row = {
            "format": key[0],
            "workers": key[1],
            "runs": len(mine),
            "steady_median": statistics.median(steady),
            "steady_min": min(steady),
            "steady_max": max(steady),
            "total_median": statistics.median(r["total"] for _, r in mine),
            "outside_epochs": statistics.median(
                r["total"] - sum(r["epoch_times"]) for _, r in mine
            ),
            "foreign": _mean_or_none([r["foreign"] for _, r in mine]),
            "raw": [r["epoch_times"] for _, r in mine],
        }
        row["samples_per_s"] = n / row["steady_median"]
        if key[0] != "memory":
            paired = []
            for i, r in mine:
                before = max(j for j in memory_idx if j < i)
                after = min(j for j in memory_idx if j > i)
                ref = (runs[before][1]["steady"] + runs[after][1]["steady"]) / 2
                paired.append(ref / r["steady"])
            row["paired"] = statistics.median(paired)
            row["paired_min"], row["paired_max"] = min(paired), max(paired)
        rows.append(row)
    ref = rows[0]["steady_median"]
    for row in rows[1:]:
        row["ratio"] = ref / row["steady_median"]
    return {"threads": threads, "n": n, "rows": rows}


def print_throughput_table(result: dict, read_ms: dict[str, float]) -> None:
    """One table per thread setting."""
    rows = result["rows"]
    n = result["n"]
    compute_ms = 1e3 * rows[0]["steady_median"] / n
    print()
    print(
        f"Throughput, torch threads={result['threads']} (both sides): seconds per "
        f"epoch, median of epochs 2..N,\nthen median over runs; spread: min-max "
        "over runs. ratio = in-memory / streamed epoch time\n(= streamed "
        "samples/s over in-memory); paired: median over runs of a streamed run "
        "against\nthe in-memory runs bracketing it. Target: paired >= "
        f"{THROUGHPUT_TARGET:.2f} with workers >= 1."
    )
    head = (
        f"{'data':<15}{'runs':>5}{'epoch s':>9}{'spread':>14}{'samples/s':>11}"
        f"{'ratio':>7}{'paired':>7}{'(min-max)':>12}{'read ms':>9}"
        f"{'other':>7}  {'ok':<4}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        if row["format"] == "memory":
            label, ratio, paired, span, read, ok = "in memory", "", "", "", "", ""
        else:
            label = f".{row['format']} w={row['workers']}"
            ratio = f"{row['ratio']:.3f}"
            paired = f"{row['paired']:.3f}"
            span = f"{row['paired_min']:.2f}-{row['paired_max']:.2f}"
            read = f"{read_ms[row['format']]:.3f}"
            ok = (
                "-"
                if row["workers"] == 0
                else ("yes" if row["paired"] >= THROUGHPUT_TARGET else "NO")
            )
        other = "" if row["foreign"] is None else f"{100 * row['foreign']:.0f}%"
        spread = f"{row['steady_min']:.3f}-{row['steady_max']:.3f}"
        print(
            f"{label:<15}{row['runs']:>5}{row['steady_median']:>9.3f}{spread:>14}"
            f"{row['samples_per_s']:>11.1f}{ratio:>7}{paired:>7}{span:>12}"
            f"{read:>9}{other:>7}  {ok:<4}"
        )
    print("-" * len(head))
    expect = ", ".join(
        f".{fmt} {compute_ms / (compute_ms + ms):.3f}" for fmt, ms in read_ms.items()
    )
    outside = ", ".join(
        f"{'memory' if r['format'] == 'memory' else '.' + r['format']}"
        f"{'' if r['workers'] is None else ' w=' + str(r['workers'])} "
        f"{r['outside_epochs']:.2f}"
        for r in rows
    )
    print(
        f"compute per sample (in memory): {compute_ms:.2f} ms; read ms: data path "
        "per sample without workers,\nmeasured apart; expected ratio with "
        f"workers=0 = compute / (compute + read): {expect}"
    )
    print(f"seconds per fit outside the epochs (statistics pass, setup): {outside}")
    print(
        "other: share of the CPUs used by other processes during those runs"
        + (
            " -- WARNING: above 10 %, timings disturbed"
            if any((r["foreign"] or 0) > BUSY_THRESHOLD for r in rows)
            else ""
        )
    )


# ----------------------------------------------------------------------------
# 2. peak memory (one child process per configuration)
# ----------------------------------------------------------------------------
class TinyEncoder(nn.Sequential):
    """One 8^3 stride-8 convolution (1 -> 4 channels), flattened."""

    def __init__(self) -> None:
        super().__init__(nn.Conv3d(1, 4, kernel_size=8, stride=8), nn.Flatten())


class TinyDecoder(nn.Module):
    """Linear to a 4-channel grid at 1/8 resolution, one transposed 8^3 conv."""

    def __init__(self, n_components: int, size: int) -> None:
        super().__init__()
        self.low = size // 8
        self.fc = nn.Linear(n_components, 4 * self.low**3)
        self.up = nn.ConvTranspose3d(4, 1, kernel_size=8, stride=8)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).reshape(-1, 4, self.low, self.low, self.low)
        return self.up(h)


def _own_memory_kib(pid: int) -> int:
    """Anonymous + shared-memory PSS of process ``pid`` in KiB (0 if gone).

    ``Pss_Anon + Pss_Shmem`` of ``/proc/<pid>/smaps_rollup``: the heap, the
    tensors, the batches passed through shared memory, with pages shared by
    forked processes split between them. File-backed pages (library code,
    shared with every Python process on the machine, and the page cache of
    memory-mapped files) are left out; ``ru_maxrss`` includes them.
    """
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return total


def _rss_kib() -> int:
    """Current resident set size of this process in KiB (``VmRSS``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _descendants(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux ``/proc/<pid>/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                pass
    return out


class TreeMemory(threading.Thread):
    """Peak over time of the summed anonymous + shared-memory PSS of this
    process and its descendants (the DataLoader workers), sampled."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_kib = 0
        self.peak_processes = 1
        self._stop_event = threading.Event()

    def sample(self) -> int:
        pids = _descendants(os.getpid())
        total = sum(_own_memory_kib(p) for p in pids)
        if total > self.peak_kib:
            self.peak_kib, self.peak_processes = total, len(pids)
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()


def child_main(config: dict) -> None:
    """One memory configuration, in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(config["threads"])
    gc.collect()
    baseline_rss_kib = _rss_kib()
    baseline_tree_kib = _own_memory_kib(os.getpid())
    watcher = TreeMemory()
    watcher.start()
    paths = [volume_path(config["directory"], i, "nii") for i in range(config["n"])]
    if config["mode"] == "memory":
        X = load_array(paths)
    else:
        X = paths
    if config["model"] == "tiny":
        backbone = (TinyEncoder(), TinyDecoder(N_COMPONENTS, config["size"]))
        extra = {"backbone": backbone}
    else:
        extra = {"backbone": "conv", "channels": tuple(config["channels"])}
    est = VAE(
        n_components=N_COMPONENTS,
        batch_size=config["batch_size"],
        max_iter=config["epochs"],
        device="cpu",
        random_state=SEED,
        num_workers=config["workers"],
        **extra,
    )
    tic = time.perf_counter()
    est.fit(X)
    fit_s = time.perf_counter() - tic
    epoch_times = [float(t) for t in est.history_["time"]]
    del est, X
    gc.collect()  # shuts the persistent workers down: they are reaped
    watcher.stop()
    result = {
        "baseline_rss_mib": baseline_rss_kib / 1024,
        "baseline_tree_mib": baseline_tree_kib / 1024,
        "main_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_maxrss_mib": (
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        ),
        "tree_peak_mib": watcher.peak_kib / 1024,
        "tree_processes_at_peak": watcher.peak_processes,
        "fit_s": fit_s,
        "epoch_times": epoch_times,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_child(config: dict) -> dict:
    """Run :func:`child_main` in a fresh interpreter; return its result."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"memory child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def bench_memory(
    directory: Path,
    paths: list[str],
    n_small: int,
    size: int,
    workers: list[int],
    args: argparse.Namespace,
) -> dict:
    """Streamed (each worker count) and in-memory fits over N and k*N files."""
    n_large = len(paths)
    base = {
        "size": size,
        "threads": args.threads[0],
        "batch_size": args.memory_batch_size,
        "epochs": args.memory_epochs,
        "model": args.memory_model,
        "channels": list(args.channels),
    }
    configs = [("stream", w) for w in workers] + [("memory", 0)]
    print(
        f"[memory] {len(configs) * 2} child processes: {n_small} and {n_large} "
        f"files of {size}^3 ({files_mib(paths[:n_small]):.0f} and "
        f"{files_mib(paths):.0f} MiB), {args.memory_epochs} epoch(s), batch "
        f"{args.memory_batch_size}, model {args.memory_model} ...",
        flush=True,
    )
    rows = []
    for mode, w in configs:
        row = {"mode": mode, "workers": w, "runs": {}}
        for n in (n_small, n_large):
            row["runs"][n] = run_child(
                dict(base, mode=mode, workers=w, directory=str(directory), n=n)
            )
        small, large = row["runs"][n_small], row["runs"][n_large]
        row["ratio_tree"] = large["tree_peak_mib"] / small["tree_peak_mib"]
        row["ratio_main"] = large["main_maxrss_mib"] / small["main_maxrss_mib"]
        rows.append(row)
    return {
        "n_small": n_small,
        "n_large": n_large,
        "size": size,
        "data_mib": {n_small: files_mib(paths[:n_small]), n_large: files_mib(paths)},
        "rows": rows,
    }


def memory_ok(row: dict) -> bool:
    """Streamed peak(k*N) / peak(N) within the target, tree and main alike."""
    return max(row["ratio_tree"], row["ratio_main"]) <= MEMORY_TARGET


def print_memory_table(result: dict) -> None:
    """The memory table: one row per fit, the peak ratios per configuration."""
    n_small, n_large = result["n_small"], result["n_large"]
    print()
    print(
        f"Peak memory (MiB), one fresh process per fit, {result['size']}^3 float32 "
        ".nii files.\nmain: RSS of the training process, after the imports "
        "(base) and its peak (ru_maxrss);\nworkers: largest peak RSS of its "
        "DataLoader workers (ru_maxrss of the reaped children);\ntree: "
        "anonymous + shared-memory PSS summed over the process and its "
        "workers, after\nthe imports (base) and its peak (sampled every 20 ms). "
        f"Target: streamed peak ratio <= {MEMORY_TARGET:.2f}\n(tree and main)."
    )
    head = (
        f"{'fit':<19}{'files':>6}{'data':>6}{'main base':>11}{'peak':>6}"
        f"{'workers':>9}{'tree base':>11}{'peak':>6}{'epoch s':>9}"
    )
    print(head)
    print("-" * len(head))
    for row in result["rows"]:
        label = (
            "in memory (array)"
            if row["mode"] == "memory"
            else f"streamed, w={row['workers']}"
        )
        for n in (n_small, n_large):
            r = row["runs"][n]
            workers = f"{r['workers_maxrss_mib']:.0f}" if row["workers"] else "-"
            epoch = statistics.median(r["epoch_times"])
            print(
                f"{label if n == n_small else '':<19}{n:>6}"
                f"{result['data_mib'][n]:>6.0f}{r['baseline_rss_mib']:>11.0f}"
                f"{r['main_maxrss_mib']:>6.0f}{workers:>9}"
                f"{r['baseline_tree_mib']:>11.0f}{r['tree_peak_mib']:>6.0f}"
                f"{epoch:>9.2f}"
            )
        if row["mode"] == "memory":
            verdict = "(grows with the data, as expected)"
        else:
            verdict = "ok" if memory_ok(row) else "NO"
        print(
            f"{'':<19}peak ratio {n_large}/{n_small}: tree {row['ratio_tree']:.3f}, "
            f"main {row['ratio_main']:.3f}  {verdict}"
        )
    print("-" * len(head))


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (argparse type; non-negative integers)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from exc
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"need non-negative integers: {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with the defaults of the full or the --quick mode filled in."""
    parser = argparse.ArgumentParser(
        description=(
            "Streamed NIfTI training vs in-memory training with neurovae.VAE: "
            "epoch throughput (num_workers 0/1/2, .nii and .nii.gz) and peak "
            "memory over N and k*N files."
        )
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (well under a minute): 40 volumes of 12^3, 3 epochs, "
        "1 repeat, first thread setting only; memory: 150 and 600 volumes of "
        "32^3, largest worker count only",
    )
    parser.add_argument(
        "--n-files", type=int, default=None, help="volumes of the throughput part (300)"
    )
    parser.add_argument(
        "--size", type=int, default=None, help="edge of the throughput volumes (20)"
    )
    parser.add_argument(
        "--formats",
        default="nii,nii.gz",
        help="file formats streamed, comma-separated, from nii and nii.gz "
        "(default both)",
    )
    parser.add_argument(
        "--workers",
        type=_int_list,
        default=[0, 1, 2],
        help="num_workers of the streamed fits (default 0,1,2)",
    )
    parser.add_argument(
        "--threads",
        type=_int_list,
        default=None,
        help="torch.set_num_threads settings, one throughput table each "
        "(default 1,2; the first only with --quick); the memory part uses the "
        "first",
    )
    parser.add_argument(
        "--channels",
        type=_int_list,
        default=[4, 8, 16],
        help="channels of the conv backbone (default 4,8,16)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="default 16")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per throughput fit; epoch 1 is discarded (default 4)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="throughput repeats (default 2)"
    )
    parser.add_argument(
        "--memory-n", type=int, default=None, help="N of the memory part (100)"
    )
    parser.add_argument(
        "--memory-k", type=int, default=None, help="k: the large set has k*N (4)"
    )
    parser.add_argument(
        "--memory-size",
        type=int,
        default=None,
        help="edge of the memory-part volumes (64: 1 MiB each); a multiple of "
        "8 with --memory-model tiny",
    )
    parser.add_argument(
        "--memory-workers",
        type=_int_list,
        default=None,
        help="num_workers of the streamed memory fits (default 0 and the "
        "largest of --workers; the largest only with --quick)",
    )
    parser.add_argument(
        "--memory-epochs", type=int, default=None, help="epochs per memory fit (2)"
    )
    parser.add_argument("--memory-batch-size", type=int, default=16, help="16")
    parser.add_argument(
        "--memory-model",
        choices=("tiny", "conv"),
        default="tiny",
        help="backbone of the memory fits (default tiny; conv is slow at 64^3)",
    )
    parser.add_argument(
        "--skip-throughput", action="store_true", help="no throughput tables"
    )
    parser.add_argument("--skip-memory", action="store_true", help="no memory table")
    parser.add_argument(
        "--tmpdir", default=None, help="where the temporary NIfTI files go"
    )
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument("--child", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    q_files, q_size, q_epochs, q_repeats, q_n, q_k, q_msize, q_mepochs = QUICK
    defaults = {
        "n_files": (q_files, 300),
        "size": (q_size, 20),
        "epochs": (q_epochs, 4),
        "repeats": (q_repeats, 2),
        "memory_n": (q_n, 100),
        "memory_k": (q_k, 4),
        "memory_size": (q_msize, 64),
        "memory_epochs": (q_mepochs, 2),
    }
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.threads is None:
        args.threads = [1] if args.quick else [1, 2]
    if args.memory_workers is None:
        largest = max(args.workers)
        args.memory_workers = [largest] if args.quick else sorted({0, largest})
    args.formats = [f.strip().lstrip(".") for f in args.formats.split(",")]
    if not args.formats or any(f not in FORMATS for f in args.formats):
        parser.error("--formats takes nii and/or nii.gz")
    for name in ("n_files", "size", "batch_size", "repeats", "memory_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.n_files < 2 or args.memory_n < 2:
        parser.error("--n-files and --memory-n must be at least 2")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 is discarded)")
    if args.memory_k < 2 or args.memory_epochs < 1:
        parser.error("--memory-k must be at least 2, --memory-epochs at least 1")
    if args.memory_size < 8 or (args.memory_model == "tiny" and args.memory_size % 8):
        parser.error("--memory-size must be at least 8 (a multiple of 8 when tiny)")
    if min(args.threads) < 1:
        parser.error("--threads must be at least 1")
    return args


def print_header(info: dict, args: argparse.Namespace) -> None:
    """Versions, machine, load and the settings of this run."""
    print("=" * 78)
    print("neurovae streaming benchmark (benchmarks/bench_streaming.py)")
    print("=" * 78)
    print(
        f"neurovae {info['neurovae']} (git {info['git']}) | torch {info['torch']} | "
        f"nibabel {nib.__version__} | numpy {info['numpy']} | "
        f"Python {info['python']}"
    )
    print(f"platform: {info['platform']}")
    print(
        f"cpu: {info['cpu']} | cpu_count={info['cpu_count']} "
        f"usable={info['cpus_usable']} | torch default threads="
        f"{info['torch_threads']} | device=cpu"
    )
    if "loadavg_start" in info:
        print(f"load average at start (1, 5, 15 min): {info['loadavg_start']}")
    mode = "QUICK (smoke test; numbers not for the targets)" if args.quick else "full"
    print(
        f"mode: {mode} | seed={SEED} | threads={args.threads} | "
        f"workers={args.workers} | formats={args.formats}"
    )
    print()


def main(argv=None) -> int:
    """Run the check, the throughput tables and the memory table; print verdicts."""
    args = parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        return 0
    info = machine_info(torch.device("cpu"))
    info["nibabel"] = nib.__version__
    print_header(info, args)
    start = time.perf_counter()
    watch = CPUWatch(info["cpus_usable"])
    results: dict = {"machine": info, "args": vars(args)}
    default_threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory(prefix="nvbench-", dir=args.tmpdir) as tmp:
        tmp = Path(tmp)
        torch.set_num_threads(args.threads[0])
        identical = check_identical(tmp / "identical", tuple(args.channels))
        results["identical"] = identical
        same = print_identical(identical)

        if not args.skip_throughput:
            tic = time.perf_counter()
            paths = write_volumes(
                tmp / "throughput", args.n_files, args.size, args.formats
            )
            array = load_array(paths[args.formats[0]])
            sizes = ", ".join(
                f".{fmt} {files_mib(p):.1f} MiB" for fmt, p in paths.items()
            )
            print(
                f"[data] {args.n_files} volumes of {args.size}^3 written in "
                f"{time.perf_counter() - tic:.1f} s ({sizes}; in memory "
                f"{array.nbytes / MIB:.1f} MiB)",
                flush=True,
            )
            torch.set_num_threads(args.threads[0])
            read_ms = {
                fmt: 1e3 * read_cost(p, args.batch_size) for fmt, p in paths.items()
            }
            params = dict(
                n_components=N_COMPONENTS,
                backbone="conv",
                channels=tuple(args.channels),
                batch_size=args.batch_size,
                max_iter=args.epochs,
                device="cpu",
                random_state=SEED,
            )
            tables = []
            for threads in args.threads:
                tables.append(
                    bench_throughput(
                        array, paths, params, args.workers, args.repeats, threads
                    )
                )
            torch.set_num_threads(default_threads)
            for table in tables:
                print_throughput_table(table, read_ms)
            results["throughput"] = {"read_ms_per_sample": read_ms, "tables": tables}
            del array

        if not args.skip_memory:
            n_large = args.memory_n * args.memory_k
            tic = time.perf_counter()
            mem_paths = write_volumes(
                tmp / "memory", n_large, args.memory_size, ["nii"]
            )
            print(
                f"\n[data] {n_large} volumes of {args.memory_size}^3 written in "
                f"{time.perf_counter() - tic:.1f} s",
                flush=True,
            )
            memory = bench_memory(
                tmp / "memory",
                mem_paths["nii"],
                args.memory_n,
                args.memory_size,
                args.memory_workers,
                args,
            )
            print_memory_table(memory)
            results["memory"] = memory

    print()
    print("Verdicts")
    print(f"  streamed == in-memory weights (bit-identical): {'yes' if same else 'NO'}")
    for table in results.get("throughput", {}).get("tables", []):
        streamed = [
            r for r in table["rows"] if r["format"] != "memory" and r["workers"]
        ]
        met = [r for r in streamed if r["paired"] >= THROUGHPUT_TARGET]
        worst = min(streamed, key=lambda r: r["paired"], default=None)
        line = (
            f"  throughput, threads={table['threads']}: paired ratio >= "
            f"{THROUGHPUT_TARGET:.2f} with workers >= 1 in {len(met)}/"
            f"{len(streamed)} configurations"
        )
        if worst is not None:
            line += (
                f" (lowest {worst['paired']:.3f}: .{worst['format']} "
                f"w={worst['workers']})"
            )
        print(line)
    if "memory" in results:
        for row in results["memory"]["rows"]:
            if row["mode"] == "memory":
                print(
                    f"  in-memory fit, for contrast: peak({args.memory_k}N)/peak(N) = "
                    f"{row['ratio_tree']:.3f} (tree), {row['ratio_main']:.3f} (main)"
                )
            else:
                ok = "met" if memory_ok(row) else "NOT met"
                print(
                    f"  streamed memory w={row['workers']}: peak({args.memory_k}N)"
                    f"/peak(N) = {row['ratio_tree']:.3f} (tree), "
                    f"{row['ratio_main']:.3f} (main) -> target "
                    f"<= {MEMORY_TARGET:.2f} {ok}"
                )

    finish_run(results, start, watch, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
