"""One command at a time per run folder (``centernet_ray/lease.py``): refused while held, taken over
once its holder has been silent for ``STALE_AFTER_S``, freed on the way out."""

import json
import time

import pytest

from centernet_ray import lease
from centernet_ray.errors import UserInputError


def held(folder):
    return lease.held(str(folder), what="training run r (folder)", instead="Give this run its own train.run_name.")


def test_a_held_folder_refuses_a_second_command_and_is_free_once_released(tmp_path):
    with held(tmp_path / "run") as first:
        record = json.loads((tmp_path / "run" / lease.LEASE_FILE).read_text())
        assert record["token"] == first.token and record["pid"] > 0 and record["host"]
        with pytest.raises(UserInputError) as refused:
            with held(tmp_path / "run"):
                pass
        message = str(refused.value)
        assert message.startswith(f"training run r (folder) is in use by another command: `{record['command']}` "
                                  f"(pid {record['pid']} on {record['host']}, started ")
        assert "Wait for it to end, or give this run its own train.run_name. If that command is gone" in message
        assert f"or delete {tmp_path / 'run' / lease.LEASE_FILE}" in message
        assert (tmp_path / "run" / lease.LEASE_FILE).exists()  # the refused command left the holder's lease
        first.confirm()
    assert not (tmp_path / "run" / lease.LEASE_FILE).exists()
    with held(tmp_path / "run"):  # free again
        pass


def test_a_lease_is_freed_when_the_block_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with held(tmp_path):
            raise KeyboardInterrupt
    assert not (tmp_path / lease.LEASE_FILE).exists()


@pytest.mark.parametrize("content", ["stale", "unreadable"])
def test_a_lease_whose_holder_went_silent_is_taken_over_with_a_warning(tmp_path, caplog, monkeypatch, content):
    """A holder killed before it could clean up: its heartbeat stops, and after STALE_AFTER_S the
    next command takes the folder; a file that is not a lease names no holder to wait for."""
    silent_since = time.time() - lease.STALE_AFTER_S - 1
    text = (json.dumps({"token": "old", "pid": 1, "host": "gone", "command": "centernet-ray train",
                        "started": silent_since, "heartbeat": silent_since}) if content == "stale" else '{"tok')
    (tmp_path / lease.LEASE_FILE).write_text(text)
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.1)  # watched for two heartbeats before it is taken
    with held(tmp_path) as taken:
        assert json.loads((tmp_path / lease.LEASE_FILE).read_text())["token"] == taken.token
    assert not (tmp_path / lease.LEASE_FILE).exists()
    if content == "stale":
        assert "taking over training run r (folder) from a command whose lease was not renewed" in caplog.text
        assert "pid 1 on gone" in caplog.text


def test_a_lease_seen_within_the_stale_time_says_when_it_frees(tmp_path):
    seen = time.time() - 20
    (tmp_path / lease.LEASE_FILE).write_text(json.dumps({"token": "other", "pid": 7, "host": "h", "command": "c",
                                                        "started": seen, "heartbeat": seen}))
    with pytest.raises(UserInputError, match=r"last seen 20 s ago\)\. .* the folder is free (39|40) s from now"):
        with held(tmp_path):
            pass


def test_two_commands_in_the_same_instant_the_one_whose_write_was_lost_is_refused(tmp_path):
    """Both found no lease and wrote theirs: the later write lasts, and the other command, reading
    the lease back before its work, is refused and leaves the winner's lease in place."""
    with held(tmp_path) as lost:
        winner = {**lost.record, "token": "winner", "pid": 99}
        (tmp_path / lease.LEASE_FILE).write_text(json.dumps(winner))
        with pytest.raises(UserInputError, match=r"was taken by another command that started at the same time: .*pid 99"):
            lost.confirm()
    assert json.loads((tmp_path / lease.LEASE_FILE).read_text())["token"] == "winner"


def test_the_holder_renews_its_heartbeat_and_its_reader_marks(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    (tmp_path / "pq").mkdir()
    with held(tmp_path / "run") as holding:
        holding.read(str(tmp_path / "pq"))
        mark = tmp_path / "pq" / (lease.READER_MARK + holding.token)
        first = json.loads((tmp_path / "run" / lease.LEASE_FILE).read_text())["heartbeat"]
        assert json.loads(mark.read_text())["heartbeat"] == first
        deadline = time.monotonic() + 10
        while json.loads(mark.read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "no heartbeat in 10 s"
            time.sleep(0.05)
        assert json.loads((tmp_path / "run" / lease.LEASE_FILE).read_text())["heartbeat"] > first
        holding.confirm()
    assert list((tmp_path / "pq").iterdir()) == []  # the mark goes with the lease


def test_a_command_that_wrote_nothing_leaves_no_folder_behind(tmp_path):
    """Refused by a check after taking the lease (its Ray lacks a GPU, say): the run folder and the
    parents the lease created go with it; a folder that holds anything else stays."""
    with pytest.raises(UserInputError):
        with held(tmp_path / "outputs" / "runs" / "r"):
            raise UserInputError("refused before its work")
    assert list(tmp_path.iterdir()) == []
    with held(tmp_path / "outputs" / "runs" / "r"):
        (tmp_path / "outputs" / "runs" / "r" / "epoch_0001").mkdir()
    assert [p.name for p in (tmp_path / "outputs" / "runs" / "r").iterdir()] == ["epoch_0001"]


def test_a_stale_looking_lease_renewed_while_watched_is_alive(tmp_path, monkeypatch):
    """The holder's clock is behind this machine's: its heartbeat looks old, but it changes while
    this command watches it, and the folder is not taken from a live holder."""
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)
    skewed = time.time() - 3600
    record = {"token": "live", "pid": 5, "host": "slow-clock", "command": "c", "started": skewed, "heartbeat": skewed}
    (tmp_path / lease.LEASE_FILE).write_text(json.dumps(record))
    sleep = time.sleep

    def renewed_meanwhile(seconds):
        sleep(seconds)
        (tmp_path / lease.LEASE_FILE).write_text(json.dumps({**record, "heartbeat": skewed + seconds}))

    monkeypatch.setattr(lease.time, "sleep", renewed_meanwhile)
    with pytest.raises(UserInputError, match=r"in use by another command: `c` \(pid 5 on slow-clock.*the folder is "
                                             r"free once its lease has not been renewed for 60 s"):
        with held(tmp_path):
            pass
    assert json.loads((tmp_path / lease.LEASE_FILE).read_text())["token"] == "live"


def test_a_holder_whose_lease_was_taken_stops_as_on_ctrl_c(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    interrupted = []
    monkeypatch.setattr(lease._thread, "interrupt_main", lambda: interrupted.append(True))
    with held(tmp_path) as holding:
        (tmp_path / lease.LEASE_FILE).write_text(json.dumps({**holding.record, "token": "other", "pid": 8}))
        deadline = time.monotonic() + 10
        while not interrupted:
            assert time.monotonic() < deadline, "the holder went on"
            time.sleep(0.05)
    assert json.loads((tmp_path / lease.LEASE_FILE).read_text())["token"] == "other"  # not removed: not ours


def test_a_reader_whose_mark_was_removed_stops_as_on_ctrl_c(tmp_path, monkeypatch):
    """An ingest took this command for dead (its heartbeats had failed) and removed its mark: the
    shards it reads may be another dataset's now, so it stops rather than write the mark back."""
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    interrupted = []
    monkeypatch.setattr(lease._thread, "interrupt_main", lambda: interrupted.append(True))
    (tmp_path / "pq").mkdir()
    with held(tmp_path / "run") as holding:
        holding.read(str(tmp_path / "pq"))
        (tmp_path / "pq" / (lease.READER_MARK + holding.token)).unlink()
        deadline = time.monotonic() + 10
        while not interrupted:
            assert time.monotonic() < deadline, "the reader went on"
            time.sleep(0.05)
    assert list((tmp_path / "pq").iterdir()) == []  # not written back


def test_a_waiting_command_holds_the_folder_once_its_holder_ends(tmp_path, monkeypatch, caplog):
    """``wait=True`` (an ingest into a Parquet folder another command is writing): no refusal; it
    says once whom it waits for, and holds the folder after it, knowing it waited."""
    import threading

    monkeypatch.setattr(lease, "POLL_S", 0.05)
    caplog.set_level("INFO", logger="centernet_ray.lease")
    first = held(tmp_path)
    first.__enter__()
    threading.Timer(0.5, first.__exit__, (None, None, None)).start()
    began = time.monotonic()
    with lease.held(str(tmp_path), what="the ingest into pq", instead="-", wait=True) as second:
        assert time.monotonic() - began >= 0.45 and second.waited
        assert json.loads((tmp_path / lease.LEASE_FILE).read_text())["token"] == second.token
    assert caplog.text.count("the ingest into pq is in use by another command: waiting for it to end") == 1
    with lease.held(str(tmp_path), what="the ingest into pq", instead="-", wait=True) as third:
        assert not third.waited


def test_a_waiting_command_whose_write_was_lost_waits_for_the_winner(tmp_path, monkeypatch):
    """Two waiting commands found the folder free in the same instant: the one that reads back the
    other's lease waits for it instead of working beside it."""
    import threading

    monkeypatch.setattr(lease, "POLL_S", 0.05)
    write = lease._write
    path = tmp_path / lease.LEASE_FILE

    def then_the_winner_writes(where, record):
        write(where, record)
        if record["token"] != "winner" and not path.with_suffix(".won").exists():
            path.with_suffix(".won").touch()
            write(where, {**record, "token": "winner", "pid": 99})
            threading.Timer(0.3, path.unlink).start()  # the winner ends

    monkeypatch.setattr(lease, "_write", then_the_winner_writes)
    with lease.held(str(tmp_path), what="the ingest into pq", instead="-", wait=True) as late:
        assert late.waited and json.loads(path.read_text())["token"] == late.token


def test_the_folders_a_lease_would_create_are_found_on_any_filesystem(tmp_path):
    assert lease._missing_folders(f"file://{tmp_path}/a/b") == [f"{tmp_path}/a/b", f"{tmp_path}/a"]
    assert lease._missing_folders("file:///no-such-top-folder/runs") == ["/no-such-top-folder/runs",
                                                                          "/no-such-top-folder"]
    assert lease._missing_folders(str(tmp_path)) == []
