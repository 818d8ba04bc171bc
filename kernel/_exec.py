"""Apply a service's isolation settings to this process, then exec the service.

The kernel runs this file as ``python -I -S kernel/_exec.py`` between fork and every
process it starts (services and its own helpers): it is the safe place for what
``subprocess``'s ``preexec_fn`` would do (which is unsafe in a threaded kernel).  Standard
library only, without ``site``, so it starts in milliseconds (about 15 on a small board:
the spec arrives ``marshal``-encoded, in hex, in EDGEBUS_EXEC_SPEC, since importing ``json``
or ``signal`` would double that; it is removed from the environment before exec).

Last before exec, and after any change of user (which clears it), the process asks for
SIGKILL when its parent, the kernel, dies (``PR_SET_PDEATHSIG``), then checks the kernel
is still its parent: a kernel killed with ``kill -9`` leaves no service behind.  (Linux
sends that signal when the *thread* that forked exits: the kernel spawns from its event
loop thread, which lives as long as the kernel.)

Failures exit with the spec's ``fail_status`` (the kernel passes EXIT_CONFIG, 78: it does
not restart the service) after one JSON line on stderr naming what could not be applied.
"""

import ctypes
import marshal
import os
import resource
import sys
from _signal import SIGKILL  # (the C module: ``signal`` imports enum, 5 ms)

PR_SET_PDEATHSIG = 1

#: Set from the spec (``fail_status``) before anything can fail.
fail_status = 1


def fail(what: str, exc: BaseException) -> None:
    # Written by hand: after a switch of user the standard library may not be readable
    # any more (nothing is imported after main() starts).
    line = (f'{{"event": "isolation_failed", "level": "error", "step": {_quote(what)}, '
            f'"error": {_quote(f"{type(exc).__name__}: {exc}")}}}')
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    os._exit(fail_status)


def _quote(text: str) -> str:
    """``text`` as a JSON string."""
    return '"' + "".join("\\" + c if c in '"\\' else f"\\u{ord(c):04x}" if c < " " else c for c in text) + '"'


def _resolve(name: str) -> str:
    """The program ``name`` names, searched in PATH as execvp would (done before any switch
    of user: os.execvpe imports a module, which might then be unreadable)."""
    if os.sep in name:
        return name
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return name


def main() -> None:
    global fail_status
    spec = marshal.loads(bytes.fromhex(os.environ.pop("EDGEBUS_EXEC_SPEC")))
    fail_status = spec["fail_status"]
    argv = spec["argv"]
    program = _resolve(argv[0])
    parent = spec.get("parent")
    libc = ctypes.CDLL(None, use_errno=True) if parent else None
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
    if libc is not None:  # last: a switch of user clears it
        if libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            fail("set PR_SET_PDEATHSIG", OSError(err, os.strerror(err)))
        if os.getppid() != parent:  # the kernel died before prctl: nobody would kill us
            os._exit(fail_status)
    try:
        os.execve(program, argv, os.environ)
    except OSError as exc:
        fail(f"exec {argv[0]}", exc)


if __name__ == "__main__":
    main()
