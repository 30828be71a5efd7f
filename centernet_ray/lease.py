"""One command at a time per run folder: a lease file the command holding the folder keeps fresh.

Two commands on the same training run or sweep (a command started twice, a job submitted again
while the first still runs) would both resume from the same checkpoints, overwrite each other's
and report two MLflow runs for one name, and each would end "successfully". The first command
writes ``_running.json`` into the folder and rewrites it every ``HEARTBEAT_S`` seconds; a second
one finds it fresh and is refused, naming the holder. A holder that ended without removing it
(killed, its node lost) stops rewriting it: ``STALE_AFTER_S`` after its last heartbeat the next
command takes the folder over, with a warning. Works on any storage the project writes (a local
path, a bucket): a file written and read back, no locking primitive needed. Two commands starting
within the same instant can both write it; the one whose write did not last is refused when it
reads the lease back (``Lease.confirm``) before its work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from centernet_ray import storage
from centernet_ray.errors import UserInputError

log = logging.getLogger(__name__)

LEASE_FILE = "_running.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


def _read(path: str) -> dict | None:
    """The lease at ``path``, or None when there is none (or it is not one: half-written, foreign)."""
    try:
        record = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except ValueError:  # not a lease this module wrote: no holder to name
        return None
    return record if isinstance(record, dict) and "token" in record else None


def _write(path: str, record: dict) -> None:
    """Write the lease whole or not at all (a second file moved over it): a reader never finds it
    half-written, which would read as no lease."""
    partial = f"{path}.{record['token']}.partial"
    storage.write_bytes(partial, json.dumps(record).encode())
    fs, target = storage.resolve(path)
    fs.move(storage.resolve(partial)[1], target)


def _describe(record: dict, now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", now)))
    return (f"`{record.get('command', '?')}` (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"started {started}, last seen {max(0.0, now - record.get('heartbeat', now)):.0f} s ago)")


@dataclass
class Lease:
    """A held folder: ``path`` is the lease file, ``token`` this holder's mark in it."""

    path: str
    what: str
    instead: str
    record: dict
    _stop: threading.Event = field(default_factory=threading.Event)
    _heartbeat: threading.Thread | None = None
    _lost: bool = False

    @property
    def token(self) -> str:
        return self.record["token"]

    def confirm(self) -> None:
        """Raise ``UserInputError`` unless the lease file still holds this holder's token: another
        command that started in the same instant wrote it last, and works on the folder."""
        current = _read(self.path)
        if current is not None and current["token"] != self.token:
            self._lost = True
            raise UserInputError(f"{self.what} was taken by another command that started at the same time: "
                                 f"{_describe(current, time.time())}. {self.instead}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = _read(self.path)
                if current is not None and current["token"] != self.token:
                    log.error("another command took %s over (this one's lease was not renewed for %.0f s): %s",
                              self.what, STALE_AFTER_S, _describe(current, time.time()))
                    self._lost = True
                    return
                self.record["heartbeat"] = time.time()
                _write(self.path, self.record)
            except OSError as exc:  # storage briefly unreachable: the next beat tries again
                log.warning("could not renew the lease %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file, unless another command holds it now."""
        self._stop.set()
        if self._heartbeat is not None:  # a renewal under way would write the file again after its removal
            self._heartbeat.join(timeout=60)
        if self._lost:
            return
        try:
            current = _read(self.path)
            if current is not None and current["token"] == self.token:
                fs, path = storage.resolve(self.path)
                fs.delete_file(path)
        except OSError as exc:
            log.warning("could not remove the lease %s (the next command takes it over %.0f s after its last "
                        "heartbeat): %s", self.path, STALE_AFTER_S, exc)


@contextlib.contextmanager
def held(folder: str, *, what: str, instead: str) -> Iterator[Lease]:
    """Hold ``folder`` (a path or URI) while the block runs: refused with a ``UserInputError`` when
    another command holds it and was seen in the last ``STALE_AFTER_S`` seconds. ``what`` names the
    folder's contents in messages ("training run centernet-resnet18 in outputs/..."); ``instead``
    says what to do rather than wait (give the run its own name)."""
    path = storage.join(folder, LEASE_FILE)
    now = time.time()
    holder = _read(path)
    if holder is not None:
        silent = now - holder.get("heartbeat", 0.0)
        if silent < STALE_AFTER_S:
            raise UserInputError(
                f"{what} is in use by another command: {_describe(holder, now)}. Wait for it to end, or "
                f"{instead[0].lower()}{instead[1:]} If that command is gone (killed before it could clean up), "
                f"the folder is free {STALE_AFTER_S - silent:.0f} s from now, or delete {path}")
        log.warning("taking over %s from a command last seen %.0f s ago (it did not remove %s): %s", what, silent,
                    path, _describe(holder, now))
    created = _missing_folders(folder)
    record = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
              "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300],
              "started": now, "heartbeat": now}
    _write(path, record)
    lease = Lease(path, what, instead, record)
    lease._heartbeat = threading.Thread(target=lease._beat, name="lease-heartbeat", daemon=True)
    lease._heartbeat.start()
    try:
        yield lease
    finally:
        lease.release()
        _remove_if_empty(created)


def _missing_folders(folder: str) -> list[str]:
    """``folder`` and those of its parents that do not exist yet, deepest first: what writing the
    lease creates."""
    missing, current = [], folder.rstrip("/")
    while current and not storage.exists(current):
        missing.append(current)
        parent = current.rsplit("/", 1)[0] if "/" in current.split("://")[-1] else ""
        current = "" if parent == current else parent
    return missing


def _remove_if_empty(folders: list[str]) -> None:
    """Remove the folders the lease created that hold nothing now (deepest first), so that a command
    refused before its work leaves no empty run folder behind."""
    for folder in folders:
        fs, path = storage.resolve(folder)
        try:
            if fs.get_file_info(path).type != pafs.FileType.Directory:
                continue
            if fs.get_file_info(pafs.FileSelector(path)):
                return
            fs.delete_dir(path)
        except OSError as exc:
            log.debug("left the folder %s: %s", folder, exc)
            return
