"""A step's journal: its finished units of work, kept on disk so that a killed step resumes.

A unit is one candidate over one batch of windows in one phase of the scoring (`exact`):
its record is the candidate's state after the unit (NLL sum, tokens, status, the head
bound's per-window lower bounds), never a delta, so that replaying it gives exactly the
floats an uninterrupted run holds. A rerun of the same step reads the journal, skips every
recorded unit and recomputes only what was in flight; every decision downstream (the seed,
the bound, who is stopped or cut) is then taken from the same numbers, and the step artifact
is the uninterrupted run's, except `cost` and `timing`: the work and time actually spent,
over all the runs of the step (each sync records this run's work so far; `spent`).

File: `<out>.journal` beside the step artifact, one record a line, `<sha256[:16]> <json>`.
The first record is the step's key (inputs' hashes, settings, k, removed blocks, shard,
early stop, seed preference); a journal with another key is refused, never reused. Then come
units (`unit`, `state`), the work spent so far (`spent`, at each sync) and stops (`stopped`,
the signal's name). A line
whose checksum fails is a torn write: dropped when it is the last line (the file is cut back
to the records before it), refused anywhere else. Records are written with one `os.write`
each and the file is fsync'd at the end of every batch of windows (`sync`), so a kill -9
loses at most the unit in flight and a power cut at most one batch. The journal is removed
once the step artifact is written.

SIGTERM / SIGINT (`interruptible`): the step finishes the unit it is in, syncs the journal
and exits with `errors.EXIT_RESUMABLE` and one line saying how to resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from contextlib import contextmanager
from pathlib import Path

from ..engine.cost import Cost
from ..errors import DiskFull, UserError, no_space

FORMAT = "blockpruner.step-journal/1"
log = logging.getLogger("blockpruner.search")


class StepInterrupted(Exception):
    """SIGTERM / SIGINT reached a step: its journal is synced and it can be resumed."""


def _line(record: dict) -> bytes:
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return f"{hashlib.sha256(text.encode()).hexdigest()[:16]} {text}\n".encode()


def _parse(line: bytes) -> dict | None:
    """The record of a journal line, or None when its checksum fails (a torn write)."""
    try:
        digest, text = line.decode().rstrip("\n").split(" ", 1)
        if hashlib.sha256(text.encode()).hexdigest()[:16] != digest or not line.endswith(b"\n"):
            return None
        return json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None


def journal_path(out: str | Path) -> Path:
    return Path(f"{out}.journal")


class Journal:
    """Recorded units by key (`get`), new ones appended (`put`); `Journal(None)` records nothing."""

    def __init__(self, path: Path | None = None, units: dict | None = None, fd: int | None = None,
                 earlier: Cost | None = None):
        self.path, self.units, self.fd = path, units or {}, fd
        self.reused = 0  # units answered from the file this run
        self.written = 0
        self.earlier = earlier or Cost()  # the work earlier runs of the step had done (at their last sync)
        self.cost: Cost | None = None  # this run's work (`track`), synced with the records
        self.interrupted: str | bool = False  # the signal's name once one came

    @classmethod
    def open(cls, path: str | Path, key: dict) -> "Journal":
        """The journal at `path` for a step with `key`: its records if it exists (and was made
        for the same key), else a new one holding the key."""
        path = Path(path)
        units: dict = {}
        if path.exists():
            data = path.read_bytes()
            lines = data.splitlines(keepends=True)
            records = [_parse(line) for line in lines]
            good = len(records)
            if records and records[-1] is None:
                good -= 1
                log.warning("%s: its last record is torn (the step was killed while writing it); dropped", path)
            if any(r is None for r in records[:good]):
                raise UserError(f"{path}: a record before the last fails its checksum (the file was damaged); "
                                "delete it (or rerun with --fresh) to start the step afresh")
            if not good or records[0].get("format") != FORMAT:
                raise UserError(f"{path}: not a step journal; delete it (or rerun with --fresh) to start the step afresh")
            if records[0]["key"] != key:
                diff = sorted(k for k in key.keys() | records[0]["key"].keys()
                              if key.get(k) != records[0]["key"].get(k))
                raise UserError(f"{path}: journal of another run of this step ({', '.join(diff)} differ); delete it (or "
                                "rerun with --fresh) to start the step afresh, or rerun with the settings it was made with")
            stops, earlier = [], Cost()
            for r in records[1:good]:
                if "unit" in r:
                    units[r["unit"]] = r["state"]
                elif "spent" in r:
                    earlier = Cost.from_dict(r["spent"])
                else:
                    stops.append(r["stopped"])
            keep = sum(len(line) for line in lines[:good])
            fd = os.open(path, os.O_WRONLY)
            os.ftruncate(fd, keep)
            os.lseek(fd, keep, os.SEEK_SET)
            journal = cls(path, units, fd, earlier)
            log.info("resuming from %s: %d units of work recorded%s", path, len(units),
                     f" (earlier runs were stopped by {', '.join(stops)})" if stops else "")
            return journal
        journal = cls(path, {}, None)
        journal._write_new(key)
        return journal

    def _write_new(self, key: dict) -> None:
        tmp = self.path.with_name(self.path.name + ".new")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, _line({"format": FORMAT, "key": key}))
            os.fsync(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if no_space(e):
                raise DiskFull(f"{self.path}: no space left to start the step's journal ({e.strerror}); free space "
                               "and rerun") from None
            raise
        self.fd = fd

    def get(self, unit: str) -> dict | None:
        state = self.units.get(unit)
        if state is not None:
            self.reused += 1
        return state

    def _append(self, record: dict) -> None:
        """One record, one `os.write` (a kill leaves it whole or torn, never interleaved)."""
        try:
            os.write(self.fd, _line(record))
        except OSError as e:
            if no_space(e):
                raise DiskFull(f"{self.path}: no space left on the device ({e.strerror}); the journal keeps the "
                               f"{self.written} units recorded before, and the step resumes from them once space "
                               "is freed") from None
            raise

    def put(self, unit: str, state: dict) -> None:
        """Record a finished unit; then, if a SIGTERM / SIGINT came, stop the step here."""
        if self.fd is not None:
            self._append({"unit": unit, "state": state})
            self.written += 1
        if self.interrupted:
            if self.fd is not None:
                self._append({"stopped": self.interrupted})
            self.sync()
            raise StepInterrupted

    def track(self, cost: Cost) -> None:
        """Record `cost` (this run's work) with every sync, so that a resumed step's cost is the
        work of all its runs (`spent`)."""
        if self.path is not None:
            self.cost = cost

    def spent(self) -> Cost:
        total = Cost()
        total += self.earlier
        if self.cost is not None:
            total += self.cost
        return total

    def sync(self) -> None:
        if self.fd is not None:
            if self.cost is not None:
                self._append({"spent": self.spent().as_dict()})
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def remove(self) -> None:
        self.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def scope(self, name: str) -> "Scope":
        return Scope(self, name)


class Scope:
    """The units of one phase of the scoring: keys `<phase>/<part>/...`."""

    def __init__(self, journal: Journal, prefix: str):
        self.journal, self.prefix = journal, prefix

    def scope(self, name: str) -> "Scope":
        return Scope(self.journal, f"{self.prefix}/{name}")

    def get(self, *part) -> dict | None:
        return self.journal.get("/".join([self.prefix, *map(str, part)]))

    def put(self, *part_and_state) -> None:
        *part, state = part_and_state
        self.journal.put("/".join([self.prefix, *map(str, part)]), state)

    def sync(self) -> None:
        self.journal.sync()


NO_JOURNAL = Journal(None)


@contextmanager
def interruptible(journal: Journal):
    """SIGTERM and SIGINT mark the journal interrupted (the step stops after the unit it is in)
    instead of killing the process; the previous handlers come back afterwards."""
    def handler(signum, frame):
        journal.interrupted = signal.Signals(signum).name
        log.warning("%s received: finishing the unit of work in flight, then stopping", signal.Signals(signum).name)

    saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield journal
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
