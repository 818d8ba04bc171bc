"""Apply a service's isolation settings to this process, then exec the service.

The kernel runs this file as ``python -I kernel/_exec.py`` between fork and the service's
own command whenever limits, a user or a cgroup are configured: it is the safe place for
what ``subprocess``'s ``preexec_fn`` would do (which is unsafe in a threaded kernel).
Standard library only, so it starts in milliseconds.  The spec arrives as JSON in
EDGEBUS_EXEC_SPEC and is removed from the environment before exec.

Failures exit with the spec's ``fail_status`` (the kernel passes EXIT_CONFIG, 78: it does
not restart the service) after one JSON line on stderr naming what could not be applied.
"""

import json
import os
import resource
import sys

#: Set from the spec (``fail_status``) before anything can fail.
fail_status = 1


def fail(what: str, exc: BaseException) -> None:
    line = {"event": "isolation_failed", "level": "error", "step": what, "error": f"{type(exc).__name__}: {exc}"}
    sys.stderr.write(json.dumps(line) + "\n")
    sys.stderr.flush()
    os._exit(fail_status)


def main() -> None:
    global fail_status
    spec = json.loads(os.environ.pop("EDGEBUS_EXEC_SPEC"))
    fail_status = spec["fail_status"]
    for name in spec.get("unset", ()):  # what this interpreter added, not the service's
        os.environ.pop(name, None)
    cgroup = spec.get("cgroup")
    if cgroup:
        try:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:
            fail(f"join cgroup {cgroup}", exc)
    for name, value in spec.get("rlimits", {}).items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (OSError, ValueError) as exc:
            fail(f"set {name} to {value}", exc)
    if spec.get("nice") is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, spec["nice"])
        except OSError as exc:
            fail(f"set nice {spec['nice']}", exc)
    if spec.get("cpus"):
        try:
            os.sched_setaffinity(0, spec["cpus"])
        except OSError as exc:
            fail(f"set CPU affinity {spec['cpus']}", exc)
    gid, uid = spec.get("gid"), spec.get("uid")
    try:
        if gid is not None:
            os.setgroups([])
            os.setgid(gid)
        if uid is not None:
            os.setuid(uid)
    except OSError as exc:
        fail(f"switch to uid {uid} gid {gid}", exc)
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, os.environ)
    except OSError as exc:
        fail(f"exec {argv[0]}", exc)


if __name__ == "__main__":
    main()
