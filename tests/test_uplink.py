"""Store-and-forward to a real MQTT broker (mosquitto), and the outbox's bounds."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import anyio
import msgspec
import pytest

from protocols import ListServices, ServiceList
from protocols.telemetry import GetMetrics, GetUplink, MetricsText, UplinkState
from services.telemetry import Outbox

from conftest import System, free_port, wait_for

pytestmark = pytest.mark.anyio
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Broker:
    def __init__(self, tmp: Path, port: int) -> None:
        self.port = port
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _listening(self.port), 10, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def broker(tmp_path: Path):
    if not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto is not installed (make test installs it)")
    b = Broker(tmp_path, free_port())
    yield b
    b.stop()


class Subscriber:
    """Collects what the broker delivers under edgebus/#."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, msgspec.json.decode(m.payload)))
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe("edgebus/#", qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


async def uplink(system: System) -> UplinkState:
    async with system.client() as bus:
        return await bus.call("telemetry", GetUplink(), UplinkState, timeout=5)


async def test_broker_down_then_back_delivers_every_summary_in_order_exactly_once(make_system, broker) -> None:
    system: System = make_system(f"""
[services.telemetry]
command = ["{{python}}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "subscribe:alerts.*", "call:kernel.ListServices"]
settings = {{ http = "", device_id = "dev1", summary_interval = 0.1, uplink = {{ host = "127.0.0.1", port = {broker.port} }} }}
backoff_initial = 0.05
""")
    await system.wait_ready("telemetry")
    with anyio.fail_after(20):  # broker down: summaries pile up in the outbox
        while (await uplink(system)).queued < 10:
            await anyio.sleep(0.1)
    # kill -9 while offline: nothing the outbox accepted is lost
    async with system.client() as bus:
        st = await bus.call("kernel", ListServices(), ServiceList)
    pid = next(s.pid for s in st.services if s.name == "telemetry")
    before = (await uplink(system)).queued
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], 10, "the kill")
    await system.wait_ready("telemetry")
    with anyio.fail_after(10):
        while True:
            try:
                state = await uplink(system)
                break
            except Exception:
                await anyio.sleep(0.1)
    assert state.queued >= before
    broker.start()
    subscriber = Subscriber(broker.port)
    try:
        with anyio.fail_after(30):
            while True:
                state = await uplink(system)
                if state.connected and state.queued <= 1 and len(subscriber.messages) >= before:
                    break
                await anyio.sleep(0.1)
    finally:
        subscriber.close()
    ids = [int(m["id"].split(":")[1]) for topic, m in subscriber.messages if topic == "edgebus/dev1/summary"]
    unique = list(dict.fromkeys(ids))  # de-duplicated, in arrival order
    assert unique == sorted(unique), "out of order"
    assert unique[: before] == list(range(unique[0], unique[0] + before)), "a queued summary is missing"
    assert all(m["device"] == "dev1" and m["kind"] == "summary" for _, m in subscriber.messages)


def test_a_full_outbox_drops_the_lowest_priority_oldest_first_and_counts(tmp_path: Path) -> None:
    bound = 20_000  # bytes on disk: the database and its WAL
    outbox = Outbox(tmp_path / "o.db", max_bytes=bound)
    for i in range(300):
        outbox.put("summary", b"s" * 50, 0)
        if i % 100 == 0:
            outbox.put("alerts/x", b"a" * 50, 3)
        assert outbox.disk_bytes() <= bound
    kept = outbox.head(1000)
    assert sum(1 for q in kept if q.priority == 3) == 3  # every alert kept
    summaries = [q.seq for q in kept if q.priority == 0]
    assert summaries == list(range(summaries[0], summaries[-1] + 1)) and summaries[-1] == kept[-1].seq  # the newest
    assert len(summaries) >= 20
    assert outbox.dropped() == {0: 300 - len(summaries)}
    outbox.put("summary", b"s" * 50, 0)  # and it keeps accepting
    assert outbox.count() >= len(kept) - 1
    outbox.close()
    reopened = Outbox(tmp_path / "o.db", max_bytes=bound)  # durable: the same content after reopening
    assert [q.seq for q in reopened.head(1000)][-1] > summaries[-1]


async def test_the_broker_password_comes_from_the_environment_variable_the_settings_name(make_system, broker,
                                                                                       tmp_path: Path) -> None:
    import pwd

    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "dev1", "s3cret"], check=True)
    passwords.chmod(0o600)
    broker.conf.write_text(f"user {pwd.getpwuid(os.getuid()).pw_name}\nlistener {broker.port} 127.0.0.1\n"
                           f"allow_anonymous false\npassword_file {passwords}\npersistence false\n")
    broker.start()
    config = f"""
[services.telemetry]
command = ["{{python}}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "call:kernel.ListServices"]
pass_environment = ["EDGEBUS_TEST_UPLINK_PASSWORD"]
[services.telemetry.settings]
http = ""
device_id = "dev1"
summary_interval = 0.1
uplink = {{ host = "127.0.0.1", port = {broker.port}, username = "dev1", password_env = "EDGEBUS_TEST_UPLINK_PASSWORD" }}
"""
    assert "s3cret" not in config
    system: System = make_system(config, env={"EDGEBUS_TEST_UPLINK_PASSWORD": "s3cret"})
    await system.wait_ready("telemetry")
    with anyio.fail_after(20):
        while not ((state := await uplink(system)).connected and state.sent > 0):
            await anyio.sleep(0.1)
    # Without the variable in its environment, the service stops naming the setting.
    other: System = make_system(config)
    services = await other.wait_until(lambda s: s["telemetry"].state == "failed")
    assert services["telemetry"].last_exit == "exited with status 78"
    lines = [msgspec.json.decode(line) for line in other.log().splitlines() if '"settings_invalid"' in line]
    assert [line["key"] for line in lines] == ["settings.uplink.password_env"]
    assert "EDGEBUS_TEST_UPLINK_PASSWORD is not set" in lines[0]["problem"]


def _log_events(system: System, event: str) -> list[dict]:
    out = []
    for line in system.log().splitlines():
        if f'"{event}"' in line:
            try:
                record = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                out.append(record)
    return out


async def test_a_short_blip_after_a_long_outage_costs_the_initial_back_off_not_the_maximum(make_system,
                                                                                           broker) -> None:
    system: System = make_system(f"""
[services.telemetry]
command = ["{{python}}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "call:kernel.ListServices"]
[services.telemetry.settings]
http = ""
device_id = "dev1"
summary_interval = 0.1
uplink = {{ host = "127.0.0.1", port = {broker.port}, backoff_initial = 0.05, backoff_max = 4.0 }}
""")
    await system.wait_ready("telemetry")
    # a long outage (no broker yet): the back-off climbs to its maximum
    wait_for(lambda: any(r["backoff"] == 4.0 for r in _log_events(system, "uplink_retry")), 30,
             "the back-off to reach its maximum (4 s)")
    broker.start()
    wait_for(lambda: len(_log_events(system, "uplink_connected")) == 1, 10, "the first connection")
    with anyio.fail_after(10):  # delivering
        first = (await uplink(system)).sent
        while (await uplink(system)).sent < first + 3:
            await anyio.sleep(0.05)
    # a short blip: the broker goes away and comes straight back
    broker.stop()
    broker.start()
    back = time.monotonic()
    wait_for(lambda: len(_log_events(system, "uplink_connected")) == 2, 10, "the reconnection")
    cost = time.monotonic() - back
    # the CONNACK reset the back-off: about the initial 0.05 s (jittered) plus noticing the
    # loss (0.25 s at most), not the 2-4 s of a back-off left at its maximum
    assert cost < 1.0, f"reconnecting after the blip took {cost:.2f} s"
    retries = [r for r in _log_events(system, "uplink_retry") if r["reason"] == "connection_lost"]
    assert retries and retries[-1]["backoff"] == 0.05 and 0.025 <= retries[-1]["retry_in"] <= 0.05
    with anyio.fail_after(10):  # and it delivers again
        sent = (await uplink(system)).sent
        while (await uplink(system)).sent <= sent:
            await anyio.sleep(0.05)


async def test_the_counters_persist_together_across_restarts_of_telemetry_and_of_the_sensor(make_system,
                                                                                           broker) -> None:
    system: System = make_system(f"""
[services.telemetry]
command = ["{{python}}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "call:kernel.ListServices"]
environment = {{ EDGEBUS_METRICS_INTERVAL = "0.2" }}
backoff_initial = 0.05
[services.telemetry.settings]
http = ""
device_id = "dev1"
summary_interval = 0.02
outbox_max_bytes = 65536
uplink = {{ host = "127.0.0.1", port = {broker.port}, backoff_initial = 0.05, backoff_max = 0.5 }}
[services.vibration]
command = ["{{python}}", "-m", "drivers.sensors"]
capabilities = ["publish:sensor.*"]
environment = {{ EDGEBUS_METRICS_INTERVAL = "0.2" }}
backoff_initial = 0.05
settings = {{ kind = "vibration", rate = 20 }}
""")
    await system.wait_ready("telemetry", "vibration")
    with anyio.fail_after(30):  # broker down: the bound drops summaries
        while not (state := await uplink(system)).dropped.get(0) or not state.raw_sensor_bytes:
            await anyio.sleep(0.05)
    broker.start()
    with anyio.fail_after(30):  # broker up: they are sent
        while (state := await uplink(system)).sent < 50:
            await anyio.sleep(0.05)
    since = state.counting_since
    assert 0 < since <= time.time() and state.bytes_sent > 50 * 50

    async def restarted(how: str, name: str, before: UplinkState) -> UplinkState:
        pid = (await system.services())[name].pid
        if how == "kill":
            os.kill(pid, signal.SIGKILL)
        else:
            system.busctl("restart", name, check=True)
        await system.wait_restarted(name, pid)
        with anyio.fail_after(20):
            while True:
                try:
                    after = await uplink(system)
                except Exception:  # telemetry not answering yet
                    await anyio.sleep(0.05)
                    continue
                # every counter goes on from where it was, from the same moment
                assert after.counting_since == since
                assert after.sent >= before.sent and after.bytes_sent >= before.bytes_sent
                assert after.dropped.get(0, 0) >= before.dropped[0]
                assert after.raw_sensor_bytes >= before.raw_sensor_bytes
                if after.sent > before.sent and after.raw_sensor_bytes > before.raw_sensor_bytes:
                    return after
                await anyio.sleep(0.05)

    state = await restarted("kill", "telemetry", state)     # kill -9: nothing counted is lost
    state = await restarted("busctl", "telemetry", state)   # busctl restart
    # the sensor restarts: its own counter starts again at 0
    first_life = state.raw_sensor_bytes
    pid = (await system.services())["vibration"].pid
    system.busctl("restart", "vibration", check=True)
    await system.wait_restarted("vibration", pid)

    async def produced() -> float:  # the sensor's counter, as its latest snapshot says
        async with system.client() as bus:
            text = (await bus.call("telemetry", GetMetrics(), MetricsText)).text
        return next(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("edgebus_sensor_bytes_total") and 'service="vibration"' in line)

    with anyio.fail_after(20):  # until its second life has reported
        while not 0 < (current := await produced()) < first_life:
            await anyio.sleep(0.05)
    state = await uplink(system)  # (telemetry counts a snapshot as it takes it)
    # the raw total is what the sensor produced in both its lives, not its latest life's
    assert state.raw_sensor_bytes >= first_life + current, (state.raw_sensor_bytes, first_life, current)
    assert state.counting_since == since
