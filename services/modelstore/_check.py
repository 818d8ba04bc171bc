"""Load-check a model in a throwaway process: ``python -m services.modelstore._check``.

The model bytes come on stdin (never a file: the store keeps models encrypted at rest);
prints the session's inputs and outputs as JSON and exits 0, or prints the error and
exits 1.  The store itself stays light: ONNX Runtime is imported only here.

``check_ops(manifest)`` is the install check of the manifest's pre and post chains, run in the
store itself (``drivers.ops.check_chains`` imports neither numba nor numpy).
"""

import json
import sys
from typing import Any

from ._exceptions import BundleError


def check_ops(manifest: Any, files: Any) -> None:
    """The manifest's pre -> model -> post chains can run (known ops, good parameters, each
    chain's end fitting the model, post chains reading tensors that exist, the metadata and
    assets they read present and fitting, e.g. a vocabulary with an entry for each of the
    model's classes): else BundleError with the ChainError's message.  ``files`` are the
    bundle's files by name (the assets' bytes among them)."""
    if not manifest.pre and not manifest.post:
        return
    from drivers.ops import ChainError, check_chains

    try:
        check_chains(manifest, {name: files[a.file] for name, a in manifest.assets.items() if a.file in files})
    except ChainError as exc:
        raise BundleError(f"its pre and post ops cannot run: {exc}") from None


def main() -> None:
    data = sys.stdin.buffer.read()
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several unrelated types for a bad model
        print(f"{type(exc).__name__}: {exc}".splitlines()[0][:500])
        sys.exit(1)
    print(json.dumps({"inputs": [[i.name, i.type, i.shape] for i in sess.get_inputs()],
                      "outputs": [[o.name, o.type, o.shape] for o in sess.get_outputs()]}))


if __name__ == "__main__":
    main()
