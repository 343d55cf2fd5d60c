"""Time an ONNX model on Neural Magic DeepSparse 1.8.0 (run by prunekit's benchmarks with `--deepsparse-python`).

DeepSparse is end-of-life, under an evaluation licence, and never a prunekit dependency: it runs in
its own virtual environment, and this script imports only numpy and deepsparse. Make the venv once:

    python -m venv ~/.venvs/deepsparse && ~/.venvs/deepsparse/bin/pip install deepsparse==1.8.0

Each `--inputs` file is an .npz of the model's inputs for one case (arrays in the graph's input
order, named arr_0, arr_1, ...); the engine is compiled for those shapes. Prints one JSON object:
{"version": ..., "ms": {npz path: [ms per call of each timed block]}}. Blocks of `--block` calls,
50 ms of idling before each, as the calling benchmarks time their own engines.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("--inputs", nargs="+", required=True, help=".npz files, one per case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block", type=int, default=3)
    args = parser.parse_args()
    import deepsparse

    result: dict = {"version": deepsparse.__version__, "ms": {}}
    for path in args.inputs:
        with np.load(path) as npz:
            feed = [npz[f"arr_{i}"] for i in range(len(npz.files))]
        engine = deepsparse.compile_model(args.onnx, batch_size=feed[0].shape[0], num_cores=args.threads,
                                          input_shapes=[list(a.shape) for a in feed])
        engine.run(feed)
        times = []
        for _ in range(args.repeats):
            time.sleep(0.05)
            start = time.perf_counter()
            for _ in range(args.block):
                engine.run(feed)
            times.append((time.perf_counter() - start) * 1e3 / args.block)
        result["ms"][path] = times
    print(json.dumps(result))


if __name__ == "__main__":
    main()
