"""Telemetry: the SDK's metrics, aggregated and served in the Prometheus text format."""

from __future__ import annotations

import urllib.request

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocols.telemetry import GetMetrics, MetricsText
from services import Forbidden
from services.examples.greeter import Add, Greet, Greeting

from conftest import System, free_port

pytestmark = pytest.mark.anyio


async def test_metrics_are_aggregated_and_served(make_system) -> None:
    port = free_port()
    system: System = make_system(f"""
[services.greeter]
command = ["{{python}}", "-m", "services.examples.greeter"]
environment = {{ EDGEBUS_METRICS_INTERVAL = "0.2" }}
[services.telemetry]
command = ["{{python}}", "-m", "services.telemetry"]
capabilities = ["subscribe:metrics.*", "call:kernel.ListServices"]
environment = {{ EDGEBUS_METRICS_INTERVAL = "0.2" }}
settings = {{ http = "127.0.0.1:{port}" }}
[services.client]
capabilities = ["call:greeter.Greet", "call:telemetry.GetMetrics"]
""")
    await system.wait_ready("greeter", "telemetry")
    async with system.client("client") as bus:
        for _ in range(7):
            await bus.call("greeter", Greet(who="m"), Greeting)
        with pytest.raises(Forbidden):
            await bus.call("greeter", Add(a=1, b=1))
        with anyio.fail_after(10):
            while True:
                text = (await bus.call("telemetry", GetMetrics(), MetricsText)).text
                if 'edgebus_requests_total{service="greeter",type="Greet",outcome="ok"} 7' in text:
                    break
                await anyio.sleep(0.1)
        # (while the client is connected: the kernel's counters are per connection)
        body = await anyio.to_thread.run_sync(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    families = {f.name: f for f in text_string_to_metric_families(body)}
    greet = [s for s in families["edgebus_requests"].samples if s.labels.get("type") == "Greet"]
    assert greet and greet[0].value == 7.0
    hist = families["edgebus_request_seconds"]
    count = [s for s in hist.samples if s.name == "edgebus_request_seconds_count" and s.labels["service"] == "greeter"]
    assert count and count[0].value == 7.0
    assert any(s.labels["service"] == "greeter" and s.value > 0
               for s in families["process_resident_memory_bytes"].samples)
    denied = {s.labels["name"]: s.value for s in families["edgebus_bus_denied"].samples}
    assert denied["client"] == 1.0
    with pytest.raises(urllib.error.HTTPError):
        await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5))
    out = system.busctl("metrics", check=True).stdout
    assert "# TYPE edgebus_requests_total counter" in out
    top = system.busctl("top", "--iterations", "2", "--interval", "0.2", check=True).stdout
    assert "greeter" in top and "MSG/S" in top
