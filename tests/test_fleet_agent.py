"""The fleet's device side against a real mosquitto (mutual TLS, the ACL of
protocols.fleet.acl_lines): the agent's core, and real `edgebus boot` systems receiving
signed deployments of bundles published as retained chunks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from protocols import fleet
from protocols.fleet import Topics

from helpers.mosquitto import Mosquitto, mqtt_client, tls_broker  # noqa: F401  (a fixture)


def _collect(client, topics: list[str]) -> tuple[dict[str, bytes], threading.Event]:
    got: dict[str, bytes] = {}
    subscribed = threading.Event()
    client.on_message = lambda c, u, m: got.__setitem__(m.topic, m.payload)
    client.on_subscribe = lambda c, u, mid, codes, p=None: subscribed.set()
    client.subscribe([(t, 1) for t in topics])
    return got, subscribed


def test_the_acl_lets_a_device_read_only_its_own_and_its_groups_topics(tls_broker: Mosquitto) -> None:
    t = Topics()
    tls_broker.set_acl(fleet.acl_lines({"dev1": ["north"], "dev2": ["south"]}, operator="operator"))
    op = mqtt_client(tls_broker, "operator")
    try:
        for topic in (t.device_desired("dev1"), t.device_desired("dev2"), t.group_desired("north"),
                      t.group_desired("south"), t.info("a" * 64)):
            op.publish(topic, topic.encode(), qos=1, retain=True).wait_for_publish(10)
        dev1 = mqtt_client(tls_broker, "dev1")
        try:
            got, subscribed = _collect(dev1, [f"{t.prefix}/#"])
            assert subscribed.wait(10)
            end = time.monotonic() + 30
            while len(got) < 3 and time.monotonic() < end:
                time.sleep(0.05)
            # writes: its own reported topic reaches the operator, another device's does not
            seen, sub2 = _collect(op, [f"{t.prefix}/devices/+/reported"])
            assert sub2.wait(10)
            dev1.publish(t.reported("dev2"), b"forged", qos=1).wait_for_publish(10)
            dev1.publish(t.device_desired("dev1"), b"forged", qos=1).wait_for_publish(10)
            dev1.publish(t.reported("dev1"), b"mine", qos=1).wait_for_publish(10)
            end = time.monotonic() + 30
            while t.reported("dev1") not in seen and time.monotonic() < end:
                time.sleep(0.05)
            assert seen == {t.reported("dev1"): b"mine"}
            time.sleep(0.5)  # anything the broker delivered late is in by now
            assert set(got) == {t.device_desired("dev1"), t.group_desired("north"), t.info("a" * 64),
                                t.reported("dev1")}
            assert got[t.device_desired("dev1")] == t.device_desired("dev1").encode()  # not overwritten
        finally:
            dev1.loop_stop(); dev1.disconnect()
    finally:
        op.loop_stop(); op.disconnect()
