"""Real models packed as a user packs them, and a test system booted with them installed
(tests/test_real_models.py, test_streams.py, test_graphs.py, test_busctl_stream.py):

    from helpers.models import pack_real, system_with

    bundles = {"vad": pack_real(path, tmp / "vad.ebm", "vad", spec)}
    with system_with(tmp, config_text, bundles) as system:
        ...
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import anyio

from protocols.modelstore import Activate, Install, ModelState
from services.modelstore import Bundle
from tools.edgebus import build_parser

from conftest import System
from test_modelstore import KEY


def pack_real(model: Path, out: Path, name: str, spec: dict[str, Any]) -> bytes:
    """`edgebus model pack` as a user runs it (in this process: ``name`` 1.0.0 into ``out``,
    ``spec`` written beside it as .json), then signed with test_modelstore.KEY."""
    spec_path = out.with_suffix(".json")
    spec_path.write_text(json.dumps(spec))
    args = build_parser().parse_args(["model", "pack", str(model), "--name", name, "--version", "1.0.0",
                                      "--out", str(out), "--spec", str(spec_path)])
    assert args.func(args) == 0
    bundle = Bundle.load(out)
    bundle.sign(KEY)
    return bundle.to_bytes()


@contextmanager
def system_with(tmp: Path, config: str, bundles: Mapping[str, bytes]) -> Iterator[System]:
    """A System booted in ``tmp`` on ``config`` (one that trusts test_modelstore.KEY, with a
    driver ``accel-0``) with each bundle (model name -> signed bundle of its 1.0.0) installed
    and activated; killed, every process of it gone, on leaving."""

    async def install(s: System) -> None:
        await s.wait_ready("security", "modelstore", "scheduler", "accel-0")
        async with s.client() as bus:
            for name, data in bundles.items():
                await bus.request("modelstore", Install(), frames=[data], timeout=120)
                await bus.call("modelstore", Activate(name=name, version="1.0.0"), ModelState)

    s = System(tmp, config)
    try:
        s.wait_bus()
        anyio.run(install, s)
        yield s
    finally:
        s.kill()
