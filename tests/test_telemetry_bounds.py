"""The uplink's outbox is bounded on disk: its files (database and WAL) stay within
``outbox_max_bytes`` and shrink with the queue; the free-disk-share rule drops by priority
until the share is restored, never silently the message just accepted."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import msgspec
import pytest

from protocols.scheduler import Alert
from protocols.telemetry import GetUplink, UplinkState
from services.telemetry import Outbox, OutboxFull

from conftest import System, free_port

pytestmark = pytest.mark.anyio


def files(directory: Path) -> dict[str, int]:
    out = {}
    for p in directory.iterdir():
        try:
            out[p.name] = p.stat().st_size
        except FileNotFoundError:  # a WAL truncated away between the listing and the stat
            pass
    return out


async def uplink(system: System) -> UplinkState:
    async with system.client() as bus:
        return await bus.call("telemetry", GetUplink(), UplinkState, timeout=5)


async def test_the_outbox_files_stay_within_the_bound_while_it_churns(make_system) -> None:
    bound = 1 << 16
    # an uplink to a port nobody listens on: every summary stays queued, the bound drops the oldest
    system: System = make_system(f"""
[services.telemetry]
command = ["{{python}}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "call:kernel.ListServices"]
[services.telemetry.settings]
http = ""
summary_interval = 0.005
outbox_max_bytes = {bound}
outbox_min_free_share = 0
uplink = {{ host = "127.0.0.1", port = {free_port()}, backoff_max = 1.0 }}
""")
    await system.wait_ready("telemetry")
    state_dir = system.run_dir / "state" / "telemetry"
    largest = 0
    with anyio.fail_after(60):
        while True:
            largest = max(largest, sum(files(state_dir).values()))
            state = await uplink(system)
            # between operations (where GetUplink is answered) the files are within the bound
            assert state.outbox_disk_bytes <= bound, state
            if state.dropped.get(0, 0) >= 1500:  # well past where the WAL used to reach MBs
                break
            await anyio.sleep(0.02)
    assert "outbox.db-shm" not in files(state_dir)
    # sampled from outside, in the middle of an operation too: never far past the bound
    # (it used to reach 4 MB of WAL)
    assert largest <= 2 * bound, largest
    assert state.queued > 20  # and it holds what fits


async def test_the_free_disk_rule_drops_summaries_until_the_share_is_restored_keeping_the_alert(
        make_system, tmp_path: Path) -> None:
    config = """
[services.telemetry]
command = ["{python}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "subscribe:alerts.*", "call:kernel.ListServices"]
[services.telemetry.settings]
http = ""
summary_interval = 3600
outbox_max_bytes = 268435456
outbox_min_free_share = SHARE
"""
    system: System = make_system(config.replace("SHARE", "0"))
    await system.wait_ready("telemetry")
    system.busctl("stop", "telemetry", check=True)
    path = system.run_dir / "state" / "telemetry" / "outbox.db"
    # 64 MB queued while the uplink was away: summaries, and a few alerts among them
    box = Outbox(path, max_bytes=1 << 28, min_free_share=0)
    for i in range(800):
        box.put("summary", b'{"s":"' + b"x" * 80_000 + b'"}', 0)
        if i % 100 == 0:
            box.put("alerts/old", b'{"a":1}', 3)
    box.close()
    before = sum(files(path.parent).values())
    # a share that leaves the disk 16 MB short of its free share
    st = os.statvfs(path.parent)
    share = (st.f_bavail * st.f_frsize + (16 << 20)) / (st.f_blocks * st.f_frsize)
    system.config_path.write_text(config.replace("SHARE", repr(share)))
    system.busctl("reload", check=True)
    await system.wait_ready("telemetry")
    state = await uplink(system)
    assert state.queued == 808 and not state.dropped  # opening drops nothing
    async with system.client() as bus:  # an alert: accepted while the disk is short
        await bus.publish("alerts.bearing", Alert(model="m", source="s", state="raised", score=0.9, seq=1))
        with anyio.fail_after(10):
            while (state := await bus.call("telemetry", GetUplink(), UplinkState)).dropped.get(0, 0) == 0:
                await anyio.sleep(0.05)
    # the oldest summaries went (about 16 MB of them), no alert, and the space went back to the disk
    assert state.dropped.get(3, 0) == 0 and set(state.dropped) == {0}, state.dropped
    assert 50 <= state.dropped[0] <= 500, state.dropped
    assert state.queued == 809 - state.dropped[0]
    assert before - state.outbox_disk_bytes >= 8 << 20, (before, state.outbox_disk_bytes)
    assert '"uplink_message_dropped"' not in system.log()


def test_when_the_share_cannot_be_restored_the_outbox_does_not_grow_and_says_what_it_refuses(
        tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path, max_bytes=1 << 20, min_free_share=0)
    for _ in range(20):
        box.put("summary", b"s" * 1000, 0)
    box.put("alerts/x", b"a" * 100, 3)
    box.close()
    # an impossible share: no amount of dropping restores it
    box = Outbox(path, max_bytes=1 << 20, min_free_share=0.9999)
    before = box.disk_bytes()
    alert = b"a" * 1000
    for _ in range(100):  # alerts keep coming: summaries make room, the files do not grow
        seq = box.put("alerts/x", alert, 3)
        assert seq in [q.seq for q in box.head(100)]
        assert box.disk_bytes() <= before
        if all(q.priority == 3 for q in box.head(100)):
            break
    assert box.dropped() == {0: 20} and box.count() >= 10
    with pytest.raises(OutboxFull, match="dropped on arrival.*outbox_min_free_share.*higher priority"):
        box.put("summary", b"s" * 1000, 0)
    assert box.dropped() == {0: 21}
    # among equals the oldest goes, never silently the new one
    oldest = box.head(1)[0].seq
    newest = box.put("alerts/x", alert, 3)
    kept = [q.seq for q in box.head(100)]
    assert newest in kept and oldest not in kept and box.dropped()[0] == 21 and box.dropped()[3] >= 1
    assert box.disk_bytes() <= before
    box.close()


def test_a_message_larger_than_the_bound_is_refused_without_dropping_others(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=1 << 16, min_free_share=0)
    box.put("summary", b"s" * 100, 0)
    with pytest.raises(OutboxFull, match="cannot fit an outbox bounded to 65536 bytes on disk"):
        box.put("alerts/x", b"a" * 100_000, 3)
    assert box.count() == 1 and box.dropped() == {3: 1}
    box.close()


def test_an_outbox_of_an_earlier_layout_is_converted_and_shrinks(tmp_path: Path) -> None:
    """A database made without the on-disk bounds (4 KiB pages, no auto-vacuum, grown
    large) is rebuilt once at opening, and comes within the bound."""
    import sqlite3

    path = tmp_path / "o.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,"
               " priority INTEGER NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)")
    db.execute("CREATE INDEX by_priority ON outbox (priority, seq)")
    db.execute("CREATE TABLE dropped (priority INTEGER PRIMARY KEY, count INTEGER NOT NULL)")
    for i in range(2000):
        db.execute("INSERT INTO outbox (topic, priority, payload, created) VALUES (?, ?, ?, strftime('%s'))",
                   ("summary", 0, msgspec.json.encode({"i": i, "pad": "x" * 500})))
    db.close()
    assert path.stat().st_size > 1 << 20
    box = Outbox(path, max_bytes=1 << 16, min_free_share=0)
    assert box.disk_bytes() <= 1 << 16
    kept = box.head(10_000)
    assert kept and kept[-1].seq == 2000 and box.dropped() == {0: 2000 - len(kept)}
    box.close()
