"""Checkpoints of a training run: atomic, checked, and tied to their run.

A checkpoint file holds everything the engine needs to continue a run
exactly where it stopped (weights, optimiser and hook states, random
generator states, early-stopping and moving-average state, the history), the
*fingerprint* of the run that wrote it, and a SHA-256 checksum of all that.

Layout of a file, version 1::

    NEUROVAE-CHECKPOINT 1\\n
    <sha256 of the payload, 64 hex digits> <payload length in bytes>\\n
    <payload: one torch.save of a dict of tensors and plain values>

The checksum is verified before the payload is unpickled, so a truncated or
corrupt file is reported, never loaded, and the payload is read with
``torch.load(weights_only=True)``: a checkpoint runs no code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
from typing import Any

import torch

from neurovae._fingerprint import state_digest

MAGIC = b"NEUROVAE-CHECKPOINT"
FORMAT_VERSION = 1
_HEADER_MAX = 256  # the two header lines are far shorter
_PAYLOAD_KEYS = {"fingerprint", "start", "metadata", "complete", "state"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or from another run.

    Raised (a subclass of :class:`ValueError`) when a checkpoint file is
    truncated, corrupt or not a neurovae checkpoint, when it was written by
    a run with other parameters, data or starting point, and when another
    process replaced it during training. The message names the file and says
    what to do (usually: delete the file, or use another directory).

    Examples
    --------
    >>> import os, tempfile
    >>> from neurovae.training import Checkpoint, CheckpointError
    >>> path = os.path.join(tempfile.mkdtemp(), "model.ckpt")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(b"not a checkpoint")
    >>> try:
    ...     Checkpoint(path, {"n": 1}).read()
    ... except CheckpointError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    /.../model.ckpt is not a neurovae checkpoint. Delete it to start afresh.
    """


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (where the platform allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stat_key(path: str):
    """What identifies one version of a file: inode, size, modification."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _has_digest(value: Any) -> bool:
    """Whether ``value`` holds a digest (64 hex digits) anywhere."""
    if isinstance(value, str):
        return bool(re.fullmatch(r"[0-9a-f]{64}", value))
    if isinstance(value, dict):
        return any(_has_digest(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_digest(v) for v in value)
    return False


def _differences(saved: Any, current: Any) -> list[str]:
    """Top-level entries of two fingerprints that differ, described; inside
    dict entries, the keys that differ (with both values when readable)."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else ["the fingerprints differ"]
    lines = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key), current.get(key)
        if a == b:
            continue
        if not (isinstance(a, dict) and isinstance(b, dict)):
            lines.append(
                f"{key} differ ({_short(a)} in the checkpoint, {_short(b)} now)"
            )
            continue
        names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        shown = [
            f"{k}: {_short(a.get(k))} in the checkpoint, {_short(b.get(k))} now"
            for k in names
            if not (_has_digest(a.get(k)) or _has_digest(b.get(k)))
        ]
        if len(shown) > 5:
            shown = [*shown[:5], f"{len(shown) - 5} more"]
        hashed = [k for k in names if _has_digest(a.get(k)) or _has_digest(b.get(k))]
        if hashed:
            shown.append(f"other {', '.join(hashed)}")
        lines.append(f"{key} differ ({'; '.join(shown)})")
    return lines


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."


class Checkpoint:
    """The checkpoint file of one training run.

    Pass it to :meth:`Engine.fit <neurovae.training.Engine.fit>`: the engine
    then writes the full training state to ``path`` after every epoch and,
    when :meth:`read` found a checkpoint of this same run, first restores
    that state and continues from it, ending with the weights that an
    uninterrupted run would have (bitwise on the CPU).

    Writes are atomic: the state goes to a temporary file in the same
    directory, which is flushed, synced to disk and renamed over ``path``,
    so a process killed at any moment leaves either the previous checkpoint
    or the new one, never a partial file.

    Parameters
    ----------
    path : str or path-like
        The checkpoint file. Its directory is created when needed.
    fingerprint : dict
        JSON-serialisable description of the run (parameters, data, ...): a
        checkpoint is resumed only by a run with an equal fingerprint, and a
        different one is refused with a :class:`CheckpointError` naming the
        entries that differ. With dict values, the keys that differ inside
        are named too.
    start : dict, optional
        Where the run starts (e.g. the epoch and weights a warm start
        continues from). A checkpoint of a *finished* run with an equal
        fingerprint but another start is replaced rather than refused: the
        new run continues from elsewhere and nothing of the old one is mixed
        in. An unfinished one is refused. With a ``"weights"`` entry (the
        :func:`~neurovae._fingerprint.state_digest` of the weights the run
        starts from), a finished run that *ended* with those weights is
        replaced even when its fingerprint differs: the new run continues
        that very model, for example a warm start with more epochs or another
        learning rate. A ``"weights_skip"`` entry lists the state-dict names
        left out of that digest (buffers fitted after training, which the
        checkpoint's final weights do not hold yet).
    metadata : dict, optional
        JSON-serialisable values stored with the state for the caller (e.g.
        a random seed); after :meth:`read` resumes, those of the file.
    writer : bool, default=True
        Whether this process writes the file. In distributed training every
        process reads the checkpoint but only rank 0 writes it; the others
        pass False, and then neither :meth:`save` nor :meth:`read` changes
        anything on disk (:meth:`read` of a writer deletes the temporary
        files of killed writers, which on a shared file system a process of
        another node cannot tell from those of a live one).

    Attributes
    ----------
    state : dict or None
        The saved training state, set by :meth:`read` when the run is to be
        resumed; the engine consumes it (and sets it back to None).
    complete : bool
        Whether the checkpoint read holds a finished run.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from neurovae.training import (
    ...     Checkpoint, Engine, EngineConfig, TensorBatches, local_rng
    ... )
    >>> class Mean(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.zeros(1))
    ...     def forward(self, batch):
    ...         return {"loss": ((batch[0] - self.w) ** 2).mean()}
    >>> path = os.path.join(tempfile.mkdtemp(), "run.ckpt")
    >>> def run():
    ...     checkpoint = Checkpoint(path, {"learning_rate": 0.1})
    ...     checkpoint.read()  # restores a checkpoint of this run, if any
    ...     data = TensorBatches((torch.arange(8.0),), 4, shuffle=True,
    ...                          generator=torch.Generator().manual_seed(0))
    ...     config = EngineConfig(max_iter=5, learning_rate_init=0.1)
    ...     engine = Engine(Mean(), config, torch.device("cpu"))
    ...     return engine.fit(data, checkpoint=checkpoint), engine.module
    >>> result, module = run()
    >>> result.n_epochs, result.n_resumed
    (5, 0)
    >>> again, same = run()  # finds the finished run: trains nothing
    >>> again.n_resumed, bool(torch.equal(module.w, same.w))
    (5, True)
    """

    def __init__(
        self,
        path,
        fingerprint: dict,
        *,
        start: dict | None = None,
        metadata: dict | None = None,
        writer: bool = True,
    ) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.writer = bool(writer)
        self.fingerprint = self._json(fingerprint, "fingerprint")
        self.start = self._json(start or {}, "start")
        self.metadata = dict(metadata or {})
        self.state: dict | None = None
        self.complete = False
        self._expected = None  # the version of the file this run may replace

    @staticmethod
    def _json(value, what: str):
        """``value`` as it reads back from JSON (tuples become lists)."""
        try:
            return json.loads(json.dumps(value, sort_keys=True))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"the checkpoint {what} must be JSON: {exc}") from None

    # -- reading -----------------------------------------------------------
    def _refuse(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} {why}. Delete it to start afresh.")

    def _read_payload(self) -> dict:
        """The verified payload of the file, or a :class:`CheckpointError`."""
        with open(self.path, "rb") as f:
            data = f.read()
        lines = data[:_HEADER_MAX].split(b"\n", 2)
        if len(lines) < 3 or not lines[0].startswith(MAGIC + b" "):
            raise self._refuse("is not a neurovae checkpoint")
        try:
            version = int(lines[0][len(MAGIC) + 1 :])
            digest, length = lines[1].decode("ascii").split(" ")
            length = int(length)
        except (ValueError, UnicodeDecodeError):
            raise self._refuse(
                "has a corrupt checkpoint header and was not loaded"
            ) from None
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{self.path}: checkpoint format version {version}; this neurovae "
                f"reads versions up to {FORMAT_VERSION}. Upgrade neurovae, or "
                "delete the file to start afresh."
            )
        payload = data[len(lines[0]) + len(lines[1]) + 2 :]
        if len(payload) != length:
            raise CheckpointError(
                f"{self.path}: the checkpoint is truncated or corrupt ({len(payload)} "
                f"bytes of payload, {length} expected) and was not loaded. Delete it "
                "to start afresh."
            )
        if hashlib.sha256(payload).hexdigest() != digest:
            raise CheckpointError(
                f"{self.path}: the checkpoint is corrupt (its SHA-256 checksum does "
                "not match) and was not loaded. Delete it to start afresh."
            )
        try:
            content = torch.load(
                io.BytesIO(payload), map_location="cpu", weights_only=True
            )
        except Exception as exc:  # a valid checksum over a bad payload
            raise CheckpointError(
                f"{self.path}: the checkpoint's payload cannot be read ({exc}). "
                "Delete it to start afresh."
            ) from exc
        if not (isinstance(content, dict) and set(content) == _PAYLOAD_KEYS):
            raise self._refuse("holds unexpected entries and was not loaded")
        return content

    def read(self) -> bool:
        """Look for a checkpoint of this run at :attr:`path`.

        Returns
        -------
        resumed : bool
            True when the file holds a checkpoint of this run (equal
            fingerprint and start): :attr:`state`, :attr:`complete` and
            :attr:`metadata` are then those of the file. False when there is
            no file, or when it holds a finished run that started elsewhere
            (it will be replaced).

        Raises
        ------
        CheckpointError
            If the file is truncated, corrupt or not a checkpoint; if it was
            written by a run with another fingerprint, or by an unfinished
            run that started elsewhere.
        """
        os.makedirs(os.path.dirname(self.path), exist_ok=True)  # fail early
        if self.writer:
            self._remove_stale_temporaries()
        self.state, self.complete = None, False
        self._expected = _stat_key(self.path)
        if self._expected is None:
            return False
        content = self._read_payload()
        try:
            saved = json.loads(content["fingerprint"])
            start = json.loads(content["start"])
            metadata = json.loads(content["metadata"])
        except (TypeError, ValueError):
            raise self._refuse(
                "has an unreadable fingerprint and was not loaded"
            ) from None
        complete = content["complete"]
        if not isinstance(complete, bool) or not isinstance(content["state"], dict):
            raise self._refuse("holds invalid entries and was not loaded")
        differences = _differences(saved, self.fingerprint)
        if differences and complete and self._continues(content["state"]):
            return False  # the finished fit this run continues: replaced
        if differences:
            raise CheckpointError(
                f"{self.path} was written by another fit and is not used: "
                + "; ".join(differences)
                + ". Delete the file (or choose another checkpoint directory) to "
                "train from scratch, or fit with the checkpoint's settings and "
                "data to resume it."
            )
        if start != self.start:
            if complete:  # a finished run: replaced, nothing of it is used
                return False
            raise CheckpointError(
                f"{self.path} holds an unfinished fit that started from "
                f"{_short(start, 80)}, and this fit starts from "
                f"{_short(self.start, 80)}. Fit as that run did to resume it, "
                "or delete the file."
            )
        self.state, self.complete, self.metadata = content["state"], complete, metadata
        return True

    def _continues(self, state: dict) -> bool:
        """Whether this run starts from the final weights of ``state``."""
        weights = self.start.get("weights")
        if weights is None:
            return False
        final = state.get("snapshot")  # the kept weights, when they differ
        if final is None:
            final = state.get("module")
        skip = self.start.get("weights_skip", ())
        return isinstance(final, dict) and state_digest(final, skip) == weights

    # -- writing -----------------------------------------------------------
    def _temporary_prefix(self) -> str:
        return f".{os.path.basename(self.path)}."

    def _remove_stale_temporaries(self) -> None:
        """Delete temporary files left by writers that were killed."""
        directory = os.path.dirname(self.path)
        prefix = self._temporary_prefix()
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.[^.]*\.tmp\Z")
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            match = pattern.match(name)
            if match is None or int(match.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:  # its writer is gone
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(directory, name))
            except OSError:  # alive (or not ours to probe): leave it
                pass

    def save(self, state: dict, *, complete: bool) -> None:
        """Write ``state`` atomically (temporary file, fsync, rename).

        Does nothing when :attr:`writer` is False.

        Parameters
        ----------
        state : dict
            Tensors and plain values (what ``torch.load(weights_only=True)``
            reads back).
        complete : bool
            Whether the run has finished.

        Raises
        ------
        CheckpointError
            If the file changed since this run last read or wrote it: another
            process is writing checkpoints to the same path.
        """
        if not self.writer:
            return
        if _stat_key(self.path) != self._expected:
            raise CheckpointError(
                f"{self.path} was replaced by another process during this fit: "
                "two fits are writing checkpoints to one file. Give each fit "
                "its own checkpoint directory."
            )
        buffer = io.BytesIO()
        torch.save(
            {
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
                "start": json.dumps(self.start, sort_keys=True),
                "metadata": json.dumps(self.metadata, sort_keys=True),
                "complete": bool(complete),
                "state": state,
            },
            buffer,
        )
        payload = buffer.getvalue()
        header = (
            MAGIC
            + f" {FORMAT_VERSION}\n".encode()
            + f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode()
        )
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=directory,
            prefix=f"{self._temporary_prefix()}{os.getpid()}.",
            suffix=".tmp",
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        _fsync_directory(directory)
        self._expected = _stat_key(self.path)
