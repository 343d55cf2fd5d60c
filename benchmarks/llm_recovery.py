"""Recovery fine-tuning of SmolLM2-135M after SparseGPT 2:4: perplexity against the token budget.

1. Teacher: dense SmolLM2-135M-Instruct (float32). Student: SparseGPT 2:4 one-shot on random
   512-token windows of the Friends transcripts, as `llm_oneshot.py` does (embeddings and
   lm_head dense). The pruned weights and masks are cached under ~/.cache/prunekit/recovery/,
   so a rerun skips the pruning (and the dense and one-shot perplexities, cached beside them).
2. `prunekit.train.recovery.recover`: distillation from the teacher (logit KL + SquareHead by
   default) on a training corpus that shares no text with the evaluation: by default
   "book-excerpts" (children's/adult fiction, punctuation stripped; cycled when the budget
   exceeds its 160k tokens); `--train-corpus friends` takes the Friends transcripts *after* the
   part the calibration windows are drawn from, "andersen" 3 tales; none shares a word 8-gram
   with the Grimm tales.
3. Perplexity on the Grimm tales (held out, >= 50k tokens by default) after the steps that
   reach each of `--budgets` tokens: the checkpoints of one run. For each: tokens, training wall
   time (evaluation excluded), tokens/s, peak RSS, and the fraction of the log-perplexity gap
   between one-shot 2:4 and dense that recovery closed: (log ppl_oneshot - log ppl) /
   (log ppl_oneshot - log ppl_dense).

    python benchmarks/llm_recovery.py --bf16                  # 32k / 131k / 393k tokens, 51k eval tokens
    python benchmarks/llm_recovery.py --bf16 --budgets 65536 262144 1048576 --checkpoint-dir out/rec --resume
    nice -n 10 python benchmarks/llm_recovery.py --budgets 1024 2048 4096 --eval-tokens 8192 \\
        --batch-size 1 --seq-len 256 --accumulation 1 --calib 32          # a quick check

Memory (peak RSS, measured): micro-batches of 1 x 512 tokens, 4 to a step (2,048 tokens a step):
5.2 GiB with --bf16, 5.4 GiB in fp32. One 4 x 512 micro-batch peaked at 7.8 GiB (fp32), 6.8 GiB (bf16):
the (tokens, 49,152) logits and the 30 blocks' activations grow with the micro-batch; the weights,
gradients and AdamW state (~3.3 GiB) do not. --checkpoint-dir costs ~2x the student's weights and AdamW
state (3.6 GB) while a checkpoint is written (the run state is serialised in memory): 8.2 GiB peak.
Speed: 129 tok/s (--bf16), 101 tok/s (fp32) at the default batch on a 2-core EPYC, nearly idle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch
from llm_oneshot import _peak_rss_gib, calibration_batches  # benchmarks/ is on sys.path when a script runs
from safetensors.torch import load, save, save_file

import prunekit as pk
from prunekit.core.masks import load_mask_state_dict, mask_state_dict, masked_modules
from prunekit.storage.files import atomic_path, atomic_write_bytes, atomic_write_text
from prunekit.train.recovery import Recovery, RecoveryConfig
from prunekit.zoo.llm import corpus_texts, load_smollm2, perplexity

CACHE = Path.home() / ".cache" / "prunekit" / "recovery"
CORPORA = {"friends": ("friends-transcripts", "Quote"), "book-excerpts": ("book-excerpts", "Text"),
           "andersen": ("andersen", "Content")}



def pruned_student(tokenizer: Any, args: argparse.Namespace) -> tuple[torch.nn.Module, Path]:
    """SmolLM2 with SparseGPT 2:4 masks, from the cache or pruned now (and cached)."""
    model, _ = load_smollm2()
    path = CACHE / f"smollm2-135m-sparsegpt24-calib{args.calib}x{args.seq_len_calib}-seed0.safetensors"
    if path.exists():
        state = load(path.read_bytes())
        modules = dict(model.named_modules())
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("weight/"):
                    modules[key.removeprefix("weight/")].weight.copy_(value)
        load_mask_state_dict(model, {k.removeprefix("mask/"): v for k, v in state.items() if k.startswith("mask/")})
        print(f"pruned student from {path}", flush=True)
        return model, path
    t0 = time.perf_counter()
    pk.prune(model, pk.NMConfig(n=2, m=4, criterion="sparsegpt", exclude=["lm_head"]),
             data=calibration_batches(tokenizer, args.calib, args.seq_len_calib), progress=False)
    weights = {f"weight/{fqn}": m.weight.detach().contiguous() for fqn, m in masked_modules(model).items()}
    masks = {f"mask/{k}": v.contiguous() for k, v in mask_state_dict(model).items()}
    atomic_write_bytes(path, save({**weights, **masks}))
    print(f"SparseGPT 2:4 in {time.perf_counter() - t0:.0f} s; cached to {path}", flush=True)
    return model, path


def training_batches(tokenizer: Any, args: argparse.Namespace) -> tuple[list[torch.Tensor], int]:
    """(batch_size, seq_len) windows of the training corpus, enough for the largest budget."""
    name, column = CORPORA[args.train_corpus]
    text = "\n".join(corpus_texts(name, column=column))
    if args.train_corpus == "friends":  # skip the characters the calibration windows come from
        text = text[8 * args.calib * args.seq_len_calib + 8 * args.seq_len_calib :]
    need = max(args.budgets) + args.batch_size * args.seq_len
    ids = torch.tensor(tokenizer(text[: 6 * need])["input_ids"])  # ~4 characters a token, with room
    per_batch = args.batch_size * args.seq_len
    windows = ids[: ids.numel() // per_batch * per_batch].view(-1, args.batch_size, args.seq_len)
    return list(windows), ids.numel()


def eval_steps(step_tokens: list[int], budgets: list[int]) -> dict[int, int]:
    """1-based step -> budget: the last step whose tokens stay within each budget."""
    out, total = {}, 0
    for i, t in enumerate(step_tokens):
        total += t
        for b in budgets:
            if total <= b and (i + 1 == len(step_tokens) or total + step_tokens[i + 1] > b):
                out[i + 1] = b
    return out


def cached_perplexities(model_dense: torch.nn.Module, student: torch.nn.Module, eval_ids: torch.Tensor,
                        key: str, args: argparse.Namespace, autocast: Any) -> tuple[float, float]:
    path = CACHE / "perplexity.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    for name, model in (("dense", model_dense), ("oneshot", student)):
        if f"{name}|{key}" not in cache:
            t0 = time.perf_counter()
            with autocast():
                cache[f"{name}|{key}"] = perplexity(model, eval_ids, args.seq_len_eval)
            print(f"{name} perplexity {cache[f'{name}|{key}']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            fresh = json.loads(path.read_text()) if path.exists() else {}
            atomic_write_text(path, json.dumps({**fresh, **cache}, indent=1))
    return cache[f"dense|{key}"], cache[f"oneshot|{key}"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[32_768, 131_072, 393_216],
                        help="token budgets to evaluate at (checkpoints of one run to the largest)")
    parser.add_argument("--lr", type=float, default=3e-4, help="best of 1e-4 / 3e-4 / 1e-3 on a 4k-token run")
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps (< 1) or steps (>= 1)")
    parser.add_argument("--decay", default="cosine", choices=["cosine", "linear", "constant"])
    parser.add_argument("--loss", default="kl+squarehead", choices=["kl", "squarehead", "kl+squarehead"])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=512, help="training window length")
    parser.add_argument("--accumulation", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--train-corpus", default="book-excerpts", choices=list(CORPORA),
                        help="what the student is distilled on; fiction closed 50 %% more gap than dialogue")
    parser.add_argument("--calib", type=int, default=128, help="SparseGPT calibration windows")
    parser.add_argument("--seq-len-calib", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=51_200, help="held-out Grimm tokens (>= 50k)")
    parser.add_argument("--seq-len-eval", type=int, default=512)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for training and evaluation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-dir", default=None, help="checkpoint the run here (resumes with --resume)")
    parser.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", default="out/llm_recovery.json")
    parser.add_argument("--save-student", type=Path, default=None,
                        help="write the recovered model's state dict here (safetensors; for llm_int8.py --pruned)")
    return parser.parse_args()


class Curve:
    """The `recover` callback: perplexity at the steps in `at`, each point written to `out` at once."""

    def __init__(self, run: Recovery, at: dict[int, int], evaluate: Any, meta: dict[str, Any], out: str,
                 resume: bool) -> None:
        self.run, self.at, self.evaluate, self.meta, self.out = run, at, evaluate, meta, out
        self.points: list[dict[str, Any]] = []
        if resume and Path(out).exists():  # the points before the checkpoint are not evaluated again
            self.points = [dict(p, resumed=True) for p in json.loads(Path(out).read_text())["points"]]
        self.start, self.eval_s, self.base_tokens = time.perf_counter(), 0.0, None

    def __call__(self, step: int, tokens: int, loss: float) -> None:
        if self.base_tokens is None:  # tokens/s counts this process's tokens (a resumed run starts later)
            self.base_tokens = tokens - self.run.step_tokens[step - 1]
        if step not in self.at:
            return
        train_s = time.perf_counter() - self.start - self.eval_s
        t0 = time.perf_counter()
        ppl = self.evaluate()
        self.eval_s += time.perf_counter() - t0
        dense, oneshot = self.meta["dense_ppl"], self.meta["oneshot_ppl"]
        closed = (math.log(oneshot) - math.log(ppl)) / (math.log(oneshot) - math.log(dense))
        speed = (tokens - self.base_tokens) / train_s
        self.points.append({"budget": self.at[step], "step": step, "tokens": tokens, "loss": loss, "ppl": ppl,
                            "gap_closed": closed, "train_s": train_s, "tokens_per_s": speed,
                            "peak_rss_gib": _peak_rss_gib(), "nm_ok": pk.check_nm(self.run.student, 2, 4).ok})
        self.write()
        print(f"tokens {tokens:>9,}  step {step:>6}  loss {loss:.4f}  ppl {ppl:8.3f}  gap closed {closed:6.1%}  "
              f"train {train_s:7.0f} s  {speed:6.1f} tok/s  peak RSS {_peak_rss_gib():.2f} GiB", flush=True)

    def write(self) -> None:
        history = [[r.step, r.tokens, r.loss, r.lr] for r in self.run.history]
        atomic_write_text(self.out, json.dumps({**self.meta, "points": self.points, "history": history}, indent=1))

    def table(self) -> str:
        rows = ["| tokens | ppl | gap closed | train s | tokens/s | peak RSS GiB |", "|---|---|---|---|---|---|",
                f"| 0 (dense) | {self.meta['dense_ppl']:.2f} | | | | |",
                f"| 0 (one-shot 2:4) | {self.meta['oneshot_ppl']:.2f} | 0 % | | | |"]
        rows += [f"| {p['tokens']:,} | {p['ppl']:.2f} | {p['gap_closed']:.1%} | {p['train_s']:.0f} | "
                 f"{p['tokens_per_s']:.1f} | {p['peak_rss_gib']:.2f} |" for p in self.points]
        return "\n".join(rows)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    teacher, tokenizer = load_smollm2()
    student, cache_path = pruned_student(tokenizer, args)
    eval_ids = torch.tensor(tokenizer("\n\n".join(corpus_texts("grimm-tales")))["input_ids"])[: args.eval_tokens]
    n_eval = eval_ids.numel() // args.seq_len_eval * args.seq_len_eval
    key = f"{cache_path.stem}|grimm:{n_eval}|seq{args.seq_len_eval}|bf16={args.bf16}"
    dense, oneshot = cached_perplexities(teacher, student, eval_ids, key, args, autocast)
    batches, corpus_tokens = training_batches(tokenizer, args)
    config = RecoveryConfig(tokens=max(args.budgets), lr=args.lr, warmup=args.warmup if args.warmup < 1 else
                            int(args.warmup), decay=args.decay, loss=args.loss, temperature=args.temperature,
                            weight_decay=args.weight_decay, accumulation=args.accumulation,
                            precision="bf16" if args.bf16 else "fp32", checkpoint_every=args.checkpoint_every)
    run = Recovery(student, teacher, batches, config)
    print(f"dense {dense:.3f}, one-shot 2:4 {oneshot:.3f} on {n_eval} Grimm tokens; training on "
          f"{args.train_corpus} ({corpus_tokens} tokens tokenised, {len(batches)} batches of "
          f"{args.batch_size}x{args.seq_len}); {run.steps} steps; threads {args.threads}", flush=True)

    def evaluate() -> float:
        student.eval()
        with autocast():
            ppl = perplexity(student, eval_ids, args.seq_len_eval)
        student.train()
        return ppl

    meta = {"model": "SmolLM2-135M-Instruct (float32)", "pruning": "SparseGPT 2:4, lm_head dense",
            "calibration": f"{args.calib} x {args.seq_len_calib} Friends windows", "train_corpus": args.train_corpus,
            "eval": f"grimm-tales, {n_eval} tokens, windows of {args.seq_len_eval}", "dense_ppl": dense,
            "oneshot_ppl": oneshot, "config": config.model_dump(mode="json"), "threads": args.threads,
            "batch": [args.batch_size, args.seq_len], "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine()}
    curve = Curve(run, eval_steps(run.step_tokens, sorted(args.budgets)), evaluate, meta, args.out, args.resume)
    run.run(checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress=True, callback=curve)
    curve.write()
    print(f"\n{curve.table()}\nwrote {args.out}")
    if args.save_student is not None:
        pk.finalize(student)
        with atomic_path(args.save_student) as tmp:
            save_file({k: v.contiguous() for k, v in student.state_dict().items() if k != "lm_head.weight"}, tmp)
        print(f"wrote the recovered model to {args.save_student}")


if __name__ == "__main__":
    main()
