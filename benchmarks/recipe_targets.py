"""The worked recipes of examples/recipes, each run through the real command line: wall time and results.

For each recipe: `python -m prunekit prune --recipe examples/recipes/<name>.yaml --out out/recipes/<name>`
in a subprocess, timed; then the report's stage times, verdicts and key figures are printed
and everything is written to out/recipes/targets.json. `mnist_workflow` needs the demo's
trained LeNet (`prunekit demo --out out/demo`); it is run first if out/demo/dense.safetensors
is missing.

    python benchmarks/recipe_targets.py                                  # all five
    python benchmarks/recipe_targets.py --recipes digits_wanda smollm2_sparsegpt24
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["digits_channels", "digits_wanda", "mnist_workflow", "efficientnet_latency", "smollm2_sparsegpt24"]


def run(name: str, out: Path) -> dict:
    """Run one recipe through the CLI; its wall time, peak RSS of the child, exit code and report."""
    command = [sys.executable, "-m", "prunekit", "prune", "--recipe", f"examples/recipes/{name}.yaml",
               "--out", str(out / name), "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    row = {"recipe": name, "command": " ".join(command[1:]), "exit_code": done.returncode, "wall_s": wall,
           "peak_rss_gib_any_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20}
    if done.returncode != 0:
        row["error"] = (done.stdout + done.stderr)[-2000:]
        return row
    report = json.loads((out / name / "report.json").read_text())
    row.update(stages_s=report.get("stages_s"), verdicts=report.get("verdicts"), files=report.get("files"))
    for side in ("baseline", "pruned"):
        row[side] = {k: report[side].get(k) for k in ("params", "nonzero_params", "flops", "size_bytes", "accuracy")
                     if k in report[side]}
    if "perplexity" in report:
        ppl = report["perplexity"]
        row["perplexity"] = {"baseline": ppl["baseline"], "pruned": ppl["pruned"], "segments": ppl["segments"],
                             "hardest": ppl["hardest"]}
        row["speed"] = report["speed"]
    if "pruned_int8" in report:
        row["pruned_int8"] = report["pruned_int8"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "recipes")
    args = parser.parse_args()
    if "mnist_workflow" in args.recipes and not (ROOT / "out" / "demo" / "dense.safetensors").exists():
        print("mnist_workflow needs the demo's trained LeNet: running `prunekit demo --out out/demo` first", flush=True)
        subprocess.run([sys.executable, "-m", "prunekit", "demo", "--out", "out/demo"], cwd=ROOT, check=True)
    rows = []
    for name in args.recipes:
        row = run(name, args.out)
        rows.append(row)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "targets.json").write_text(json.dumps(rows, indent=1))
        print(f"\n== {name}: exit {row['exit_code']}, wall {row['wall_s']:.0f} s", flush=True)
        if row["exit_code"]:
            print(row["error"])
            continue
        print("stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in row["stages_s"].items()))
        for line in row["verdicts"]:
            print(f"  {line}")
    print(f"\nwrote {args.out / 'targets.json'}")


if __name__ == "__main__":
    main()
