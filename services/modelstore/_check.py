"""Load-check a model in a throwaway process: ``python -m services.modelstore._check``.

The model bytes come on stdin (never a file: the store keeps models encrypted at rest);
prints the session's inputs and outputs as JSON and exits 0, or prints the error and
exits 1.  The store itself stays light: ONNX Runtime is imported only here.
"""

import json
import sys


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
