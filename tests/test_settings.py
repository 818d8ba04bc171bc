"""Typed service settings: from the config's table to the service's Struct, checked before
anything starts, relative paths from the config file's directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import msgspec
import pytest

from services import Settings, SettingsError, decode_settings

from conftest import BIN, System

pytestmark = pytest.mark.anyio

# A service with typed settings (a nested table, an array of tables, a path), in a module
# of its own beside the test system's directory: `python -m svc` in working_directory "..".
SERVICE = '''
import pathlib
import msgspec
from services import Context, Service, Settings, run

class Route(msgspec.Struct, forbid_unknown_fields=True):
    topic: str
    rate: float = 1.0

class SvcSettings(Settings):
    greeting: str = "hello"
    data: pathlib.Path | None = None
    routes: list[Route] = []

class Ask(msgspec.Struct, tag=True):
    pass

class Told(msgspec.Struct, tag=True):
    greeting: str
    data: str
    routes: list[str]

class Svc(Service):
    name = "svc"
    Settings = SvcSettings
    Request = Ask
    Reply = Told

    async def handle(self, req: Ask, ctx: Context) -> Told:
        s = self.settings
        return Told(greeting=s.greeting, data=s.data.read_text() if s.data else "",
                    routes=[f"{r.topic}@{r.rate:g}" for r in s.routes])

if __name__ == "__main__":
    run(Svc)
'''


class Ask(msgspec.Struct, tag=True):
    pass


class Told(msgspec.Struct, tag=True):
    greeting: str
    data: str
    routes: list[str]


def _config(settings: str) -> str:
    return f"""
[services.svc]
command = ["{{python}}", "-m", "svc"]
working_directory = ".."
[services.svc.settings]
{settings}
"""


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "edgebus"), "config", "check", str(path)], capture_output=True, text=True,
                          timeout=60)


class _Pipe(msgspec.Struct, forbid_unknown_fields=True):
    source: str


class _S(Settings):
    rate: float = 1.0
    file: Path | None = None
    pipelines: list[_Pipe] = []


def test_settings_decode_into_the_declared_type_naming_the_bad_key(tmp_path: Path) -> None:
    s = decode_settings({"rate": 2, "file": "rec/x.wav", "pipelines": [{"source": "a"}]}, _S, base=tmp_path)
    assert s.rate == 2.0 and s.file == tmp_path / "rec/x.wav" and s.pipelines == [_Pipe("a")]
    assert decode_settings({"file": "/abs/x.wav"}, _S, base=tmp_path).file == Path("/abs/x.wav")
    cases = [
        ({"rtae": 2}, "settings.rtae", "unknown field"),
        ({"rate": "fast"}, "settings.rate", "Expected `float`"),
        ({"pipelines": [{"source": "a"}, {"sourse": "b"}]}, "settings.pipelines[1].sourse", "unknown field"),
        ({"file": 3}, "settings.file", "path"),
    ]
    for raw, key, problem in cases:
        with pytest.raises(SettingsError) as info:
            decode_settings(raw, _S, base=tmp_path, service="svc")
        assert info.value.key == key and problem in info.value.problem, (raw, info.value)
    with pytest.raises(SettingsError, match="takes no settings, got x"):
        decode_settings({"x": 1}, None, service="svc")
    assert decode_settings({}, None) is None


def test_config_check_names_file_service_and_key_of_a_misspelt_setting(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (tmp_path / "svc.py").write_text(SERVICE)  # the config's working_directory is ".."
    good = cfg / "good.toml"
    good.write_text(_config('greeting = "hi"\n[[services.svc.settings.routes]]\ntopic = "a"'))
    out = _check(good)
    assert out.returncode == 0, out.stderr
    assert "settings checked: svc" in out.stdout
    bad = cfg / "bad.toml"
    bad.write_text(_config('greeting = "hi"\n[[services.svc.settings.routes]]\ntopik = "a"'))
    out = _check(bad)
    assert out.returncode == 78
    assert out.stderr.strip() == (f"edgebus: invalid config {bad} at services.svc.settings.routes[0].topik: "
                                  "Object contains unknown field `topik`")
    assert "Traceback" not in out.stderr
    # The built-in default's every service declares its settings type and they check.
    default = subprocess.run([str(BIN / "edgebus"), "config", "default"], capture_output=True, text=True,
                             check=True).stdout
    (cfg / "default.toml").write_text(default)
    out = _check(cfg / "default.toml")
    assert out.returncode == 0, out.stderr
    assert "not checked" not in out.stdout, out.stdout


def test_config_check_refuses_a_program_that_does_not_exist(tmp_path: Path) -> None:
    cfg = tmp_path / "system.toml"
    cfg.write_text('[services.x]\ncommand = ["bin/sensor-driver", "--fast"]\n')
    out = _check(cfg)
    assert out.returncode == 78
    assert f"at services.x.command: program '{tmp_path}/bin/sensor-driver' does not exist" in out.stderr
    cfg.write_text('[services.x]\ncommand = ["no-such-program-anywhere"]\n')
    assert "(looked up in PATH)" in _check(cfg).stderr


async def test_settings_reach_the_service_typed_with_paths_from_the_config_directory(make_system, tmp_path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)
    (tmp_path / "data.txt").write_text("from a file beside the config")
    system: System = make_system(_config(
        'greeting = "good morning"\ndata = "../data.txt"\n'
        '[[services.svc.settings.routes]]\ntopic = "sensor.a"\nrate = 2.5\n'
        '[[services.svc.settings.routes]]\ntopic = "sensor.b"'))
    await system.wait_ready("svc")
    async with system.client() as bus:
        told = await bus.call("svc", Ask(), Told, timeout=10)
    assert told == Told(greeting="good morning", data="from a file beside the config",
                        routes=["sensor.a@2.5", "sensor.b@1"])


async def test_a_service_whose_settings_do_not_decode_fails_once_naming_the_key(make_system, tmp_path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)
    system: System = make_system(_config('greting = "typo"'))
    services = await system.wait_until(lambda s: s["svc"].state == "failed")
    assert services["svc"].last_exit == "exited with status 78"
    assert services["svc"].restarts == 0
    lines = [msgspec.json.decode(line) for line in system.log().splitlines() if '"settings_invalid"' in line]
    assert len(lines) == 1
    assert lines[0]["service"] == "svc" and lines[0]["key"] == "settings.greting"


async def test_reload_with_a_misspelt_setting_changes_nothing(make_system, tmp_path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)
    system: System = make_system(_config('greeting = "one"'))
    listing = await system.wait_ready("svc")
    pid = next(s.pid for s in listing.services if s.name == "svc")
    system.config_path.write_text(_config('greeting = "two"\ngreetng = "typo"'))
    out = system.busctl("reload")
    assert out.returncode != 0
    assert "services.svc.settings.greetng" in out.stderr and "unchanged" in out.stderr
    after = await system.services()
    assert after["svc"].pid == pid and after["svc"].state == "ready"
    async with system.client() as bus:
        assert (await bus.call("svc", Ask(), Told, timeout=10)).greeting == "one"
    # A valid change of settings restarts the service with the new ones.
    system.config_path.write_text(_config('greeting = "two"'))
    system.busctl("reload", check=True)
    await system.wait_until(lambda s: s["svc"].state == "ready" and s["svc"].pid != pid)
    async with system.client() as bus:
        assert (await bus.call("svc", Ask(), Told, timeout=10)).greeting == "two"
