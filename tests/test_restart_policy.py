"""The supervisor's restart policy, rule by rule, as pure functions (no processes)."""

from __future__ import annotations

import pytest

from kernel import ServiceConfig
from kernel._restart import Decision, Ended, History, Intent, also_restart, count, decide, dependents
from protocols.runtime import EXIT_CONFIG

CRASH = Ended(code=1, ran_for=1.0, description="exited with status 1")
CLEAN = Ended(code=0, ran_for=1.0, description="exited with status 0")
KILLED = Ended(code=None, ran_for=1.0, description="killed by SIGKILL")
# The supervisor killed it for not saying READY in time (it may still exit 0 on SIGTERM).
TIMED_OUT = Ended(code=0, ran_for=30.0, timed_out=True, description="exited with status 0")
TIMED_OUT_KILLED = Ended(code=None, ran_for=30.0, timed_out=True, description="killed by SIGTERM")


def spec(**kw) -> ServiceConfig:
    return ServiceConfig(command=["true"], **kw)


def run(config: ServiceConfig, *ends: Ended, start: float = 100.0, every: float = 1.0) -> list[Decision]:
    """Decisions for ``ends`` in turn, ``every`` seconds apart, the history carried over."""
    history, decisions = History(), []
    for i, ended in enumerate(ends):
        decision = decide(config, ended, history, start + i * every)
        decisions.append(decision)
        history = decision.history
    return decisions


# -- restart types --------------------------------------------------------------------------

@pytest.mark.parametrize("ended", [CRASH, CLEAN, KILLED, TIMED_OUT, TIMED_OUT_KILLED])
def test_permanent_restarts_whatever_the_exit(ended: Ended) -> None:
    assert decide(spec(restart="permanent"), ended, History(), 0.0).intent == Intent.RESTART


@pytest.mark.parametrize("ended", [CRASH, KILLED, TIMED_OUT, TIMED_OUT_KILLED])
def test_transient_restarts_after_a_crash_a_kill_or_a_start_timeout(ended: Ended) -> None:
    assert decide(spec(restart="transient"), ended, History(), 0.0).intent == Intent.RESTART


def test_transient_stays_stopped_after_exiting_0_on_its_own() -> None:
    d = decide(spec(restart="transient"), CLEAN, History(), 0.0)
    assert d.intent == Intent.STOP
    assert d.reason == "exited with status 0; restart = transient"


@pytest.mark.parametrize("ended", [CRASH, CLEAN, KILLED, TIMED_OUT, TIMED_OUT_KILLED])
def test_temporary_is_never_restarted(ended: Ended) -> None:
    d = decide(spec(restart="temporary"), ended, History(), 0.0)
    assert d.intent == Intent.STOP
    assert d.reason.endswith("restart = temporary")


def test_stopping_is_not_counted_as_a_restart() -> None:
    history = History((1.0,), 2.0)
    assert decide(spec(restart="temporary"), CRASH, history, 5.0).history == history


# -- exit 78 --------------------------------------------------------------------------------

@pytest.mark.parametrize("restart", ["permanent", "transient", "temporary"])
def test_exit_78_is_a_permanent_failure_for_every_restart_type(restart: str) -> None:
    ended = Ended(code=EXIT_CONFIG, ran_for=0.2, description="exited with status 78")
    d = decide(spec(restart=restart), ended, History(), 0.0)
    assert d.intent == Intent.FAIL
    assert d.reason == "exited with status 78: permanent failure, not restarted"


def test_exit_78_of_a_critical_service_fails_it_without_giving_up() -> None:
    ended = Ended(code=EXIT_CONFIG, ran_for=0.2)
    assert decide(spec(critical=True), ended, History(), 0.0).intent == Intent.FAIL


def test_a_signal_is_not_exit_78() -> None:
    assert decide(spec(), Ended(code=None, ran_for=1.0), History(), 0.0).intent == Intent.RESTART


# -- restart intensity ----------------------------------------------------------------------

def test_counting_keeps_the_restarts_within_the_window_and_adds_this_one() -> None:
    assert count((), 10.0, 60.0) == (10.0,)
    assert count((1.0, 50.0, 69.0), 110.0, 60.0) == (50.0, 69.0, 110.0)
    assert count((50.0,), 110.0, 60.0) == (50.0, 110.0)  # exactly at the window's edge: in


def test_more_than_max_restarts_within_the_window_fails_the_service() -> None:
    decisions = run(spec(max_restarts=3, restart_window=60.0), *[CRASH] * 4)
    assert [d.intent for d in decisions] == [Intent.RESTART, Intent.BACKOFF, Intent.BACKOFF, Intent.FAIL]
    assert decisions[-1].reason == ("4 restarts within 60s (max_restarts = 3); "
                                    "last: exited with status 1")


def test_restarts_spread_beyond_the_window_never_fail() -> None:
    decisions = run(spec(max_restarts=2, restart_window=10.0), *[CRASH] * 20, every=6.0)
    assert Intent.FAIL not in [d.intent for d in decisions]
    assert all(len(d.history.times) <= 2 for d in decisions)


def test_max_restarts_0_fails_at_the_first_crash() -> None:
    assert decide(spec(max_restarts=0), CRASH, History(), 0.0).intent == Intent.FAIL


@pytest.mark.parametrize("restart", ["permanent", "transient"])
def test_a_critical_service_over_its_intensity_makes_the_system_give_up(restart: str) -> None:
    decisions = run(spec(restart=restart, critical=True, max_restarts=2), *[CRASH] * 3)
    assert [d.intent for d in decisions] == [Intent.RESTART, Intent.BACKOFF, Intent.GIVE_UP]
    assert "3 restarts within 60s" in decisions[-1].reason


def test_a_critical_service_within_its_intensity_is_just_restarted() -> None:
    assert decide(spec(critical=True), CRASH, History(), 0.0).intent == Intent.RESTART


def test_start_timeouts_count_toward_the_intensity() -> None:
    decisions = run(spec(max_restarts=1), TIMED_OUT_KILLED, TIMED_OUT_KILLED)
    assert decisions[-1].intent == Intent.FAIL


# -- back-off -------------------------------------------------------------------------------

def test_the_first_crash_in_a_window_restarts_at_once() -> None:
    d = decide(spec(backoff_initial=0.5), CRASH, History(), 0.0)
    assert (d.intent, d.delay) == (Intent.RESTART, 0.0)
    assert d.reason == "exited with status 1; restarting in 0s"


def test_repeated_crashes_back_off_doubling_up_to_the_cap() -> None:
    config = spec(backoff_initial=0.5, backoff_max=3.0, max_restarts=100, restart_window=1000.0)
    decisions = run(config, *[CRASH] * 7)
    assert [d.delay for d in decisions] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(d.intent == Intent.BACKOFF for d in decisions[1:])
    assert decisions[2].reason == "exited with status 1; restarting in 1s"


def test_back_off_resets_after_a_run_longer_than_the_window() -> None:
    config = spec(backoff_initial=0.5, backoff_max=30.0, max_restarts=100, restart_window=60.0)
    history = run(config, *[CRASH] * 4)[-1].history
    assert history.backoff == 4.0
    long_run = Ended(code=1, ran_for=61.0)
    d = decide(config, long_run, history, 103.5)
    assert (d.intent, d.delay, d.history.backoff) == (Intent.RESTART, 0.0, 0.0)
    # ...and the next quick crash backs off from the start again.
    assert decide(config, CRASH, d.history, 104.0).delay == 0.5


def test_back_off_resets_when_the_window_has_emptied() -> None:
    config = spec(backoff_initial=0.5, restart_window=10.0)
    history = run(config, CRASH, CRASH, CRASH)[-1].history
    assert history.backoff == 2.0
    d = decide(config, CRASH, history, 200.0)
    assert (d.intent, d.delay) == (Intent.RESTART, 0.0)


def test_a_decision_leaves_the_history_it_was_given_unchanged() -> None:
    history = History((99.0,), 1.0)
    decide(spec(), CRASH, history, 100.0)
    assert history == History((99.0,), 1.0)


# -- strategies -----------------------------------------------------------------------------

# db <- api <- web;  db <- worker;  cache alone
REQUIRES = {"db": [], "api": ["db"], "web": ["api"], "worker": ["db"], "cache": []}
ORDER = ["db", "cache", "api", "worker", "web"]


def test_one_for_one_restarts_the_service_alone() -> None:
    assert also_restart("one_for_one", "db", REQUIRES, ORDER) == []


def test_rest_for_one_restarts_every_service_requiring_it_in_start_order() -> None:
    assert also_restart("rest_for_one", "db", REQUIRES, ORDER) == ["api", "worker", "web"]
    assert also_restart("rest_for_one", "api", REQUIRES, ORDER) == ["web"]
    assert also_restart("rest_for_one", "web", REQUIRES, ORDER) == []
    assert also_restart("rest_for_one", "cache", REQUIRES, ORDER) == []


def test_dependents_are_found_whatever_the_order_of_the_table() -> None:
    requires = {"web": ["api"], "api": ["db"], "db": []}
    assert dependents("db", requires, ["db", "api", "web"]) == ["api", "web"]
