"""One command at a time per run folder (or ingest output): a lease file the command holding the
folder keeps fresh.

Two commands on the same training run or sweep (a command started twice, a job submitted again
while the first still runs) would both resume from the same checkpoints, overwrite each other's
and report two MLflow runs for one name, and each would end "successfully". The first command
writes ``_running.lease`` into the folder and rewrites it every ``HEARTBEAT_S`` seconds; a second
one finds it fresh and is refused, naming the holder. A holder that ended without removing it
(killed, its node lost) stops rewriting it: a command that finds it ``STALE_AFTER_S`` old watches
it for two heartbeats, and takes the folder over, with a warning, only if it did not change (so a
clock that differs between hosts cannot make a live holder look dead). A holder that finds its
lease taken stops its work as Ctrl+C would. Works on any storage the project writes (a local path,
a bucket): a file written and read back, no locking primitive needed. Two commands starting within
the same instant can both write it; the one whose write did not last is refused when it reads the
lease back (``Lease.confirm``) before its work. An ingest waits for the holder instead of being
refused (``held(wait=True)``): the holder is writing what it needs. A holder may also mark other
folders as read (``Lease.read``: a training run or a sweep, the ingest it reads), with a file of
its own there renewed with its lease; ``refuse_if_read`` refuses what would replace them
meanwhile. (Not ``.json``: Tune copies a sweep folder's ``.json`` files down on a resume and up
again later, which would put an old lease back.)
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import posixpath
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

LEASE_FILE = "_running.lease"
READER_MARK = LEASE_FILE + ".reader-"  # + the reading command's token: one mark per command reading an ingest
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
POLL_S = 5.0  # how often a command that waits for a folder (``held(wait=True)``) looks at its lease again
SETTLE_FACTOR, MIN_SETTLE_S = 3.0, 0.05  # a waiting command reads its lease back this many times its
# write's duration later: another command's read and write racing it (each about as long) have landed by then
MIN_SETTLE_IN_A_BUCKET_S = 1.0  # a bucket's requests vary more than a local disk's


def _read(path: str) -> dict | None:
    """The lease at ``path``, or None when there is none (or it is not one: foreign, or cut short)."""
    try:
        record = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except ValueError:  # not a lease this module wrote: no holder to name
        return None
    return record if isinstance(record, dict) and "token" in record else None


def _write(path: str, record: dict) -> None:
    """Write the lease whole or not at all: a reader never finds it half-written, which would read
    as no lease."""
    storage.write_whole(path, json.dumps(record).encode())


def describe(record: dict, now: float | None = None) -> str:
    """Who holds a lease or a reader's mark (its ``record``), for messages."""
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", now)))
    return (f"`{record.get('command', '?')}` (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"started {started}, last seen {max(0.0, now - record.get('heartbeat', now)):.0f} s ago)")


def _in_use(what: str, holder: dict, now: float, instead: str, path: str, frees_in: float | None) -> UserInputError:
    when = (f"the folder is free {frees_in:.0f} s from now" if frees_in is not None else
            f"the folder is free once its lease has not been renewed for {STALE_AFTER_S:.0f} s")
    return UserInputError(
        f"{what} is in use by another command: {describe(holder, now)}. Wait for it to end, or "
        f"{instead[0].lower()}{instead[1:]} If that command is gone (killed before it could clean up), {when}, "
        f"or delete {path}")


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
    waited: bool = False  # another command held the folder first: what it wrote may be what this one needs
    marks: list[str] = field(default_factory=list)  # reader marks this holder keeps fresh (``read``)
    _writing: threading.Lock = field(default_factory=threading.Lock)  # a renewal, or a mark made or removed

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
                                 f"{describe(current, time.time())}. {self.instead}")

    def read(self, folder: str) -> None:
        """Mark ``folder`` (an ingest's output) as read by this command until the lease is released:
        an ingest that would replace its shards meanwhile is refused (``refuse_if_read``)."""
        mark = self._mark(folder)
        with self._writing:
            _write(mark, self.record)
            self.marks.append(mark)

    def read_unless_written(self, folder: str) -> dict | None:
        """Mark ``folder`` as read (``read``), then look for a command writing it: its lease record
        (the mark removed again), or None. In that order: a writer that did not see the mark had
        taken its lease before, and is seen here."""
        self.read(folder)
        writer = at_work(folder)
        if writer is not None:
            self.stop_reading(folder)
        return writer

    def stop_reading(self, folder: str) -> None:
        mark = self._mark(folder)
        with self._writing:  # not renewed after its removal by a heartbeat under way
            self.marks.remove(mark)
            _delete(mark)

    def _mark(self, folder: str) -> str:
        return storage.join(folder, READER_MARK + self.token)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = _read(self.path)
                if current is not None and current["token"] != self.token:
                    self._lost = True
                    log.error("another command took %s over (this one's lease was not renewed for %.0f s): %s. "
                              "Stopping this one as Ctrl+C would: two commands would overwrite each other's "
                              "checkpoints", self.what, STALE_AFTER_S, describe(current, time.time()))
                    _thread.interrupt_main()  # the run's Ctrl+C handler stops it (Ray Train's, Tune's)
                    return
                with self._writing:
                    gone = [mark for mark in self.marks if _read(mark) is None]
                    if gone:  # removed by an ingest that took this command for dead: the shards may be replaced
                        log.error("another command removed this one's reader mark %s (its heartbeat had failed "
                                  "for %.0f s) and may have replaced the shards it reads: stopping as Ctrl+C "
                                  "would", gone[0], STALE_AFTER_S)
                        _thread.interrupt_main()
                        return
                    self.record["heartbeat"] = time.time()
                    for path in [self.path, *self.marks]:
                        _write(path, self.record)
            except Exception as exc:  # storage briefly unreachable, say: the next beat tries again
                log.warning("could not renew the lease %s: %s", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file, unless another command holds it now."""
        self._stop.set()
        if self._heartbeat is not None:  # a renewal under way would write the file again after its removal
            self._heartbeat.join(timeout=60)
        for mark in self.marks:
            _delete(mark)
        if self._lost:
            return
        try:
            current = _read(self.path)
        except OSError as exc:
            log.warning("could not read the lease %s to remove it: %s", self.path, exc)
            return
        if current is not None and current["token"] == self.token:
            _delete(self.path)


def _delete(path: str) -> None:
    try:
        fs, inside = storage.resolve(path)
        fs.delete_file(inside)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove %s (the next command sees it %.0f s after its last heartbeat): %s", path,
                    STALE_AFTER_S, exc)


def at_work(folder: str) -> dict | None:
    """The lease of the command that holds ``folder`` now (renewed in the last ``STALE_AFTER_S``), or None."""
    holder = _read(storage.join(folder, LEASE_FILE))
    return holder if holder is not None and time.time() - holder.get("heartbeat", 0.0) < STALE_AFTER_S else None


def refuse_if_read(folder: str, *, what: str, instead: str) -> None:
    """Raise ``UserInputError`` when another command marked ``folder`` as read (``Lease.read``) and
    keeps its mark fresh: ``what`` (replacing the folder's shards, say) would happen under it.
    Marks left by commands killed outright are removed, after the same watch as a lease's."""
    fs, path = storage.resolve(folder)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    for info in found:
        if not info.base_name.startswith(READER_MARK) or info.base_name.endswith(".partial"):
            continue
        mark = storage.join(folder, info.base_name)
        reader = _read(mark)
        if reader is None:
            continue
        if time.time() - reader.get("heartbeat", 0.0) < STALE_AFTER_S or _renewed_while_watched(
                mark, reader, f"{folder}: a reader's mark", "removing it"):
            raise UserInputError(f"{what}, but another command reads {folder}: {describe(reader, time.time())}. "
                                 f"Wait for it to end, or {instead[0].lower()}{instead[1:]}")
        log.warning("removing %s, left by a command that no longer renews it: %s", mark,
                    describe(reader, time.time()))
        _delete(mark)


def _renewed_while_watched(path: str, record: dict, what: str, then: str) -> dict | None:
    """``record`` (a lease or a reader's mark at ``path``) looked stale by this machine's clock:
    watch it for two heartbeats. The record there now when it was renewed meanwhile (its writer's
    clock differs from ours: it is alive), else None (its writer is gone: ``then`` is safe)."""
    log.info("%s looks stale (%s); watching it for %.0f s before %s", what, describe(record, time.time()),
             2 * HEARTBEAT_S, then)
    time.sleep(2 * HEARTBEAT_S)
    now = _read(path)
    renewed = now is not None and (now["token"] != record["token"] or now.get("heartbeat") != record.get("heartbeat"))
    return now if renewed else None


@contextlib.contextmanager
def held(folder: str, *, what: str, instead: str, wait: bool = False) -> Iterator[Lease]:
    """Hold ``folder`` (a path or URI) while the block runs: refused with a ``UserInputError`` when
    another command holds it and renewed its lease in the last ``STALE_AFTER_S`` seconds, or does so
    while this one watches a stale-looking lease. ``what`` names the folder's contents in messages
    ("training run centernet-resnet18 (outputs/...)"); ``instead`` says what to do rather than wait
    (give the run its own name). Should another command take the folder over while the block runs,
    the main thread is interrupted as by Ctrl+C.

    ``wait``: instead of being refused, wait for the holder to end (logged once), and read the lease
    back shortly after writing it, waiting again if another command's write won; the lease's
    ``waited`` says whether another command held the folder first."""
    path = storage.join(folder, LEASE_FILE)
    created = _missing_folders(folder)
    waited = False
    while True:
        if _free(path, what, instead, wait, announce=not waited):
            record = _new_record()
            began = time.monotonic()
            _write(path, record)
            if not wait:
                break
            least = MIN_SETTLE_IN_A_BUCKET_S if storage.in_a_bucket(path) else MIN_SETTLE_S
            time.sleep(max(least, SETTLE_FACTOR * (time.monotonic() - began)))
            current = _read(path)
            if current is None or current["token"] == record["token"]:
                break
        waited = True
        time.sleep(POLL_S)
    lease = Lease(path, what, instead, record, waited=waited)
    lease._heartbeat = threading.Thread(target=lease._beat, name="lease-heartbeat", daemon=True)
    lease._heartbeat.start()
    try:
        yield lease
    finally:
        lease.release()
        _remove_if_empty(folder, created)


def _free(path: str, what: str, instead: str, wait: bool, announce: bool) -> bool:
    """Whether the lease at ``path`` may be written now: there is none, or its holder went silent
    (taken over, with a warning). A live holder: ``UserInputError``, or False when ``wait`` (said
    once, when ``announce``)."""
    holder = _read(path)
    if holder is None:
        return True
    silent = time.time() - holder.get("heartbeat", 0.0)
    alive = holder if silent < STALE_AFTER_S else _renewed_while_watched(path, holder, f"{what}: its lease",
                                                                          "taking the folder over")
    if alive is not None:
        if not wait:
            raise _in_use(what, alive, time.time(), instead, path, STALE_AFTER_S - silent if alive is holder else None)
        if announce:
            log.info("%s is in use by another command: waiting for it to end: %s", what, describe(alive, time.time()))
        return False
    log.warning("taking over %s from a command whose lease was not renewed (it did not remove %s): %s", what,
                path, describe(holder, time.time()))
    return True


def _new_record() -> dict:
    now = time.time()
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300],
            "started": now, "heartbeat": now}


def _missing_folders(folder: str) -> list[str]:
    """The paths (inside ``folder``'s filesystem) of ``folder`` and those of its parents that do not
    exist yet, deepest first: what writing the lease creates."""
    fs, path = storage.resolve(folder)
    missing = []
    while path not in ("", "/") and fs.get_file_info(path).type == pafs.FileType.NotFound:
        missing.append(path)
        parent = posixpath.dirname(path.rstrip("/"))
        if parent == path:
            break
        path = parent
    return missing


def _remove_if_empty(folder: str, created: list[str]) -> None:
    """Remove the folders the lease created (``_missing_folders``) that hold nothing now, deepest
    first, so that a command refused before its work leaves no empty run folder behind."""
    fs, _ = storage.resolve(folder)
    for path in created:
        try:
            if fs.get_file_info(path).type != pafs.FileType.Directory:
                continue
            if fs.get_file_info(pafs.FileSelector(path)):
                return
            fs.delete_dir(path)
        except OSError as exc:
            log.debug("left the folder %s: %s", path, exc)
            return
