"""Files a run writes and reads back: atomic CSV and JSON writes, the ``llc.csv`` row log
with its manifest and the writer lock on its folder.

Every file is written to a temporary name in the same folder and moved into place, so an
interrupted run never leaves a truncated file. Not here: estimating.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import tempfile
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

try:  # POSIX: an advisory lock the kernel drops when its process ends
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms slt_probe is tested on
    fcntl = None

CSV_NAME = "llc.csv"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".writer.lock"
LLC_COLUMNS = ["step", "llc_mean", "llc_std", "llc_sem", "effective_params", "init_loss",
               "mean_sampled_loss", "excess_ratio", "local", "healthy", "reasons", "rhat",
               "ess", "num_diverged", "sampler", "lr", "localization", "nbeta",
               "gradient_correction", "num_chains", "num_draws", "compute_path",
               "chains_at_once", "seconds"]


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, value) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


def write_csv_atomic(path: str | Path, rows: list[dict], columns: Iterable[str] = ()) -> None:
    """Rows as CSV with ``columns`` first, then any other key in order of appearance."""
    columns = list(columns)
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a CSV written here, with numbers parsed (empty cells become None)."""
    def parse(value: str):
        if value == "":
            return None
        if value in ("True", "False"):
            return value == "True"
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value else number

    with open(path, newline="") as fh:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def versions() -> dict:
    try:
        own = version("slt-probe")
    except PackageNotFoundError:
        own = None
    return {"slt_probe": own, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


class WriterLock:
    """One writer per log folder: an exclusive ``flock`` on ``LOCK_NAME`` held until
    ``release`` (or until the process ends: the kernel drops it, so a killed run never
    blocks its own resume). A second writer, in this or another process, is refused."""

    def __init__(self, folder: Path):
        self.path = folder / LOCK_NAME
        self._file = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.seek(0)
                holder = self._file.read().strip() or "another writer"
                self._file.close()
                raise RuntimeError(
                    f"{folder} is already being written ({holder}); a second writer would "
                    "lose rows. Use another log_dir, or let the first run finish") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {platform.node()}, since "
                         f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}")
        self._file.flush()
        self._finalizer = weakref.finalize(self, self._file.close)

    def release(self) -> None:
        self._finalizer()

    @property
    def held(self) -> bool:
        return self._finalizer.alive


def settings_changes(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``field: old → new`` for every field that differs (nested dicts by dotted name).

    Examples:
        >>> settings_changes({"lr": 1e-4, "sampler": {"gamma": 1}}, {"lr": 1e-3, "sampler": {"gamma": 1}})
        ['lr: 0.0001 → 0.001']
    """
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += settings_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old} → {new}")
    return changes


def _comparable(previous: dict, request: dict) -> tuple[dict, dict]:
    """The recorded request and the new one, as far as they can differ: once a
    calibration is on record it is reused, so the grid it searched no longer matters."""
    if previous.get("calibration") is None:
        return previous["request"], request
    drop = lambda r: {**r, "settings": {k: v for k, v in r.get("settings", {}).items()  # noqa: E731
                                        if k != "calibration_grid"}}
    return drop(previous["request"]), drop(request)


class TrajectoryLog:
    """Rows keyed by step, rewritten atomically to ``llc.csv`` on ``flush`` (after every
    estimate; metrics logged between estimates are written with the next one or on
    detach), with a ``manifest.json`` beside it and a writer lock on the folder.

    ``manifest["request"]`` is what the caller asked for (settings, loss, data and model
    sizes). Resuming a folder with a different request is an error naming the differing
    fields, unless ``allow_changed`` is set: the manifest then records in
    ``request_history`` from which step on each request applies.
    """

    def __init__(self, log_dir: str | Path | None, manifest: dict, *,
                 allow_changed: bool = False):
        self.rows: dict[int, dict] = {}
        self.path = None
        self.manifest_path = None
        self.lock = None
        if log_dir is None:
            return
        log_dir = Path(log_dir)
        if log_dir.exists() and not log_dir.is_dir():
            raise ValueError(f"log_dir {log_dir} exists and is a file, not a directory")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.lock = WriterLock(log_dir)
        self.path = log_dir / CSV_NAME
        if self.path.exists():
            for row in read_rows(self.path):
                self.rows[int(row["step"])] = row
        self.manifest_path = log_dir / MANIFEST_NAME
        if self.manifest_path.exists():
            previous = json.loads(self.manifest_path.read_text())
            # a manifest from before requests were recorded cannot be compared
            changes = (settings_changes(*_comparable(previous, manifest.get("request", {})))
                       if "request" in previous else [])
            if changes and not allow_changed:
                self.lock.release()
                raise ValueError(
                    f"{log_dir} holds a run with other settings ({'; '.join(changes)}); "
                    "resume with the same settings, use another log_dir, or pass "
                    "resume_changed_settings=True to continue (the manifest then records "
                    "which rows came from which settings)")
            if changes:
                done = [s for s, r in self.rows.items() if r.get("llc_mean") is not None]
                history = previous.setdefault("request_history", [
                    {"from_step": 0, "request": previous.get("request")}])
                history.append({"from_step": max(done, default=-1) + 1,
                                "request": manifest["request"]})
                previous["request"] = manifest["request"]
            previous.setdefault("resumed_at", []).append(manifest["started_at"])
            manifest = previous
        write_json_atomic(self.manifest_path, manifest)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def ensure_locked(self) -> None:
        """Take the folder's writer lock again after ``release`` (a re-attached probe)."""
        if self.lock is not None and not self.lock.held:
            self.lock = WriterLock(self.path.parent)

    def manifest(self) -> dict:
        if self.manifest_path is None:
            return {}
        return json.loads(self.manifest_path.read_text())

    def update_manifest(self, **values) -> None:
        if self.manifest_path is None:
            return
        manifest = json.loads(self.manifest_path.read_text())
        manifest.update(values)
        write_json_atomic(self.manifest_path, manifest)

    def has_llc(self, step: int) -> bool:
        value = self.rows.get(step, {}).get("llc_mean")
        return value is not None and value != ""

    def update(self, step: int, values: Mapping, *, flush: bool = True) -> dict:
        row = self.rows.setdefault(step, {"step": step})
        row.update(values)
        if flush:
            self.flush()
        return row

    def history(self) -> list[dict]:
        return [self.rows[s] for s in sorted(self.rows)]

    def flush(self) -> None:
        if self.path is not None:
            write_csv_atomic(self.path, self.history(), LLC_COLUMNS)


# a restriction's columns in an ``llc.csv`` row: ``llc[name]``, ``llc_sem[name]``,
# ``healthy[name]``
RESTRICTION_COLUMN = re.compile(r"(llc|llc_sem|healthy)\[(.+)\]")


def restriction_columns(name: str, result) -> dict:
    """The row columns of one restriction's estimate."""
    return {f"llc[{name}]": result.llc_mean, f"llc_sem[{name}]": result.llc_sem,
            f"healthy[{name}]": result.diagnostics["healthy"]}


def row_from_result(result, seconds: float) -> dict:
    """The ``llc.csv`` columns of one estimate: λ̂, how local and healthy it is and why
    not, and how it was obtained (sampler, ε, γ, nβ, correction, chains, draws, the
    computation path and how many chains it computed at once)."""
    d = result.diagnostics
    record = result.record
    finite = lambda v: v if v is not None and np.isfinite(v) else None  # noqa: E731
    sampler = record.sampler
    evidence = record.correction.evidence
    return {"llc_mean": result.llc_mean, "llc_std": result.llc_std, "llc_sem": result.llc_sem,
            "effective_params": result.effective_params, "init_loss": result.init_loss,
            "mean_sampled_loss": finite(d.get("mean_sampled_loss")),
            "excess_ratio": finite(d.get("excess_ratio")), "local": d.get("local"),
            "healthy": d["healthy"], "reasons": ";".join(d.get("reasons", [])),
            "rhat": finite(d["rhat"]), "ess": finite(d["ess"]),
            "num_diverged": d["num_diverged"], "sampler": type(sampler).__name__,
            "lr": sampler.lr, "localization": sampler.localization,
            "nbeta": result.nbeta, "gradient_correction": record.correction.applied,
            "gradient_noise_ratio": finite(evidence.get("gradient_noise_ratio")),
            "gradient_pull": evidence.get("gradient_pull"),
            "critical_point": "not_a_critical_point" not in d.get("reasons", []),
            "num_chains": record.settings.num_chains, "num_draws": record.settings.num_draws,
            "compute_path": record.compute.path, "chains_at_once": record.compute.chains_at_once,
            "seconds": seconds}
