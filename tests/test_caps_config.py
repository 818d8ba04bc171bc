"""Capability patterns and config validation (pure functions, no processes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernel import CapabilityError, CapabilitySet, ConfigError, parse_config


def test_default_deny() -> None:
    caps = CapabilitySet([])
    assert not caps.allows("call", "modelstore.Activate")
    assert not caps.allows("publish", "x")
    assert not caps.covers_prefix("subscribe", "")


@pytest.mark.parametrize(
    ("pattern", "action", "target", "allowed"),
    [
        ("call:modelstore.Activate", "call", "modelstore.Activate", True),
        ("call:modelstore.Activate", "call", "modelstore.ActivateAll", False),
        ("call:modelstore.*", "call", "modelstore.Activate", True),
        ("call:modelstore.*", "call", "modelstorex.Activate", False),
        ("call:*", "call", "anything.At", True),
        ("call:*.List", "call", "modelstore.List", True),
        ("call:*.List", "call", "modelstore.Lister", False),
        ("publish:sensor.*", "publish", "sensor.vib1", True),
        ("publish:sensor.*", "call", "sensor.vib1", False),
        ("subscribe:telemetry.alerts", "subscribe", "telemetry.alerts", True),
        ("subscribe:telemetry.alerts", "subscribe", "telemetry.alerts2", False),
    ],
)
def test_patterns(pattern: str, action: str, target: str, allowed: bool) -> None:
    assert CapabilitySet([pattern]).allows(action, target) is allowed


def test_regex_metacharacters_are_literal() -> None:
    caps = CapabilitySet(["publish:a.b"])
    assert caps.allows("publish", "a.b") and not caps.allows("publish", "aXb")


def test_subscription_coverage() -> None:
    caps = CapabilitySet(["subscribe:sensor.*", "subscribe:telemetry.alerts"])
    assert caps.covers_prefix("subscribe", "sensor.")
    assert caps.covers_prefix("subscribe", "sensor.vib1")
    assert caps.covers_prefix("subscribe", "telemetry.alerts")
    assert not caps.covers_prefix("subscribe", "sensor")       # would include sensorX
    assert not caps.covers_prefix("subscribe", "telemetry.")
    assert not caps.covers_prefix("subscribe", "")


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [("callmodelstore", "has no ':'"), ("exec:foo", "unknown action 'exec'"), ("call:", "needs a target"),
     ("call:a b", "needs a target")],
)
def test_bad_patterns_are_named(pattern: str, problem: str) -> None:
    with pytest.raises(CapabilityError) as info:
        CapabilitySet([pattern])
    assert problem in str(info.value) and repr(pattern) in str(info.value)


@given(st.lists(st.from_regex(r"[a-z]{1,6}(\.[a-z*]{1,6}){0,2}", fullmatch=True), max_size=8),
       st.from_regex(r"[a-z]{1,6}(\.[a-z]{1,6}){0,2}", fullmatch=True))
def test_matching_agrees_with_fnmatch(targets: list[str], topic: str) -> None:
    import fnmatch

    caps = CapabilitySet([f"publish:{t}" for t in targets])
    expected = any(fnmatch.fnmatchcase(topic, t) for t in targets)
    assert caps.allows("publish", topic) is expected


def test_a_thousand_rules_compile_and_match() -> None:
    caps = CapabilitySet([f"call:svc{i}.Type{i}" for i in range(500)] + [f"publish:topic{i}.*" for i in range(500)])
    assert caps.allows("call", "svc499.Type499") and not caps.allows("call", "svc499.Type498")
    assert caps.allows("publish", "topic250.x") and not caps.allows("publish", "topic2500")


# -- config -------------------------------------------------------------------------------


def _err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "sys.toml")
    return info.value


def test_unknown_key_names_file_and_key() -> None:
    err = _err('[services.a]\ncommand = ["x"]\ncomand = ["y"]\n')
    assert err.source == "sys.toml" and err.key == "services.a.comand"
    assert "comand" in str(err) and "sys.toml" in str(err)


def test_wrong_type_names_the_key() -> None:
    err = _err("[bus]\nheartbeat_interval = \"fast\"\n")
    assert err.key == "bus.heartbeat_interval" and "Expected `float`" in str(err)


def test_unknown_top_level_section() -> None:
    assert "servics" in str(_err("[servics.a]\n"))


def test_not_toml() -> None:
    assert "not valid TOML" in str(_err("[bus\n"))


def test_bad_capability_in_config_names_the_index() -> None:
    err = _err('[services.a]\ncapabilities = ["call:x.Y", "frob:z"]\n')
    assert err.key == "services.a.capabilities[1]" and "unknown action 'frob'" in str(err)


def test_requires_unknown_service_and_cycles() -> None:
    assert "unknown service 'b'" in str(_err('[services.a]\ncommand = ["x"]\nrequires = ["b"]\n'))
    err = _err('[services.a]\ncommand = ["x"]\nrequires = ["b"]\n[services.b]\ncommand = ["x"]\nrequires = ["a"]\n')
    assert "dependency cycle" in str(err)


def test_reserved_and_invalid_names() -> None:
    assert "kernel" in str(_err('[services.kernel]\ncommand = ["x"]\n'))
    assert _err('[services."Bad.Name"]\ncommand = ["x"]\n').key == "services.Bad.Name"


def test_bad_values() -> None:
    assert "bus.heartbeat_liveness" in str(_err("[bus]\nheartbeat_liveness = 0\n"))
    assert "unknown signal" in str(_err('[services.a]\ncommand = ["x"]\nstop_signal = "SIGFOO"\n'))


def test_default_config_is_valid() -> None:
    from kernel import default_config_text

    config = parse_config(default_config_text(), "default")
    assert "greeter" in config.services


def test_a_revocation_beats_a_wildcard_grant() -> None:
    caps = CapabilitySet(["call:calc.*", "subscribe:sensor.*"], denied=["call:calc.Add", "subscribe:sensor.secret"])
    assert not caps.allows("call", "calc.Add") and caps.allows("call", "calc.Sub")
    assert not caps.allows("subscribe", "sensor.secret") and caps.allows("subscribe", "sensor.vib")
    assert caps.describe() == ["call:calc.*", "subscribe:sensor.*", "!call:calc.Add", "!subscribe:sensor.secret"]
