"""SmolLM2-135M: does pruning + INT8 beat INT8 alone? Perplexity and weight bytes, one run.

Rows: dense and pruned, each in fp32, W8A8 dynamic INT8 (`pk.quantize` with
`DynamicInt8Config`: symmetric per-channel weights, so pruned zeros stay int8 zeros, and
activations quantized per batch) and W8 weight-only INT8 (int8 weights, fp32 activations, the
kind of kernel `pk.accelerate(..., allow_int8=True)` and LLM runtimes use). The
pruned model is SparseGPT 2:4 one-shot (as in `llm_oneshot.py`) unless `--pruned` names a
safetensors state dict of an already pruned (e.g. recovered) SmolLM2, such as the one
`llm_recovery.py` writes.

Bytes count the decoder blocks' Linear weights only (the tied embedding / head stays fp32 in
every row, as INT8 is applied to Linear layers and the head is excluded): dense INT8 stores
1 byte per weight plus one fp32 scale per row; sparse INT8 stores 1 byte per non-zero plus a
1-bit mask per weight (the bitmask format of `prunekit.save`) plus the scales. Perplexity on
held-out Grimm tales (>= 50k tokens), calibration on Friends transcripts.

The equal-size reference is dense 4-bit weight-only (symmetric, one scale per 64 inputs):
about the bytes of 2:4 + INT8. Caveat: the float weights are dequantised from the Q4_1 GGUF that ships offline, so the
"dense" model already sits on a 4-bit grid; INT8 of it is close to lossless.

    python benchmarks/llm_int8.py                       # prunes 2:4 with SparseGPT (~5-7 min)
    python benchmarks/llm_int8.py --pruned /tmp/recovered.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

import prunekit as pk
from prunekit.zoo.llm import corpus_texts, load_smollm2, perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_oneshot import _peak_rss_gib, calibration_batches  # noqa: E402


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def weight_bytes(model: nn.Module, *, int8: bool) -> tuple[int, float]:
    """(bytes of the decoder Linear weights in the row's storage, their sparsity)."""
    total, zeros, numel = 0, 0, 0
    for m in _block_linears(model).values():
        w = m.weight.detach()
        nnz, n = int(torch.count_nonzero(w)), w.numel()
        zeros, numel = zeros + n - nnz, numel + n
        width = 1 if int8 else 4
        total += min(nnz * width + (n + 7) // 8, n * width)  # bitmask + non-zeros, or dense
        total += 4 * w.shape[0] if int8 else 0
    return total, zeros / numel


@torch.no_grad()
def weight_only(model: nn.Module, bits: int = 8, group: int | None = None) -> nn.Module:
    """Round every decoder Linear weight to symmetric `bits`-bit integers and back (mutates `model`).

    One fp32 scale per row (or per `group` consecutive inputs of a row). This is the arithmetic
    of a weight-only kernel (integer weights, fp32 activations and accumulation), so the
    perplexity is that deployment's; zeros stay zero.
    """
    qmax = 2 ** (bits - 1) - 1
    for m in _block_linears(model).values():
        w = m.weight.view(m.weight.shape[0], -1, group or m.weight.shape[1])
        scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
        m.weight.copy_(((w / scale).round().clamp(-qmax, qmax) * scale).view_as(m.weight))
    return model


def _row(name: str, model: nn.Module, eval_ids: torch.Tensor, seq_len: int,
         int8: str | None) -> dict:
    size, sparsity = weight_bytes(model, int8=int8 is not None)
    if int8 == "dynamic":  # W8A8: activations quantized per batch at run time (fbgemm)
        model = pk.quantize(model, pk.DynamicInt8Config(exclude=("lm_head",)))
    elif int8 == "weight-only":  # W8A32
        model = weight_only(model)
    elif int8 == "w4-g64":  # the equal-size reference: 4-bit weights, one fp32 scale per 64
        numel = sum(m.weight.numel() for m in _block_linears(model).values())
        model = weight_only(model, bits=4, group=64)
        size = numel // 2 + 4 * numel // 64
    t0 = time.perf_counter()
    ppl = perplexity(model, eval_ids, seq_len)
    row = {"row": name, "perplexity": ppl, "weight_MB": size / 1e6, "sparsity": sparsity,
           "eval_s": time.perf_counter() - t0, "peak_rss_GiB": _peak_rss_gib()}
    print(f"{name:>22}: ppl {ppl:8.2f}  block Linear weights {size / 1e6:7.2f} MB  sparsity {sparsity:.3f}  "
          f"peak RSS {row['peak_rss_GiB']:.2f} GiB", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", type=Path, help="safetensors state dict of a pruned SmolLM2 (skips pruning)")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=51200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("llm_int8.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2()
    eval_ids = torch.tensor(tokenizer("\n\n".join(corpus_texts("grimm-tales")))["input_ids"])[: args.eval_tokens]
    print(f"eval: {eval_ids.numel()} tokens (Grimm); threads {args.threads}", flush=True)
    rows = [_row("dense fp32", model, eval_ids, args.seq_len, None),
            _row("dense W8A8 dynamic", load_smollm2()[0], eval_ids, args.seq_len, "dynamic"),
            _row("dense W8 weight-only", load_smollm2()[0], eval_ids, args.seq_len, "weight-only"),
            _row("dense W4 g64 weight-only", load_smollm2()[0], eval_ids, args.seq_len, "w4-g64")]

    pruned, _ = load_smollm2()
    if args.pruned is not None:
        pruned.load_state_dict(load_file(args.pruned), strict=False)
        label = args.pruned.stem
    else:
        t0 = time.perf_counter()
        pk.prune(pruned, pk.NMConfig(n=2, m=4, criterion="sparsegpt"), data=calibration_batches(
            tokenizer, args.calib, args.seq_len), progress=False)
        pk.finalize(pruned)
        label = "2:4 SparseGPT"
        print(f"pruned 2:4 with SparseGPT on {args.calib} Friends windows in {time.perf_counter() - t0:.0f} s")
    state = {k: v.clone() for k, v in pruned.state_dict().items()}
    rows.append(_row(f"{label} fp32", pruned, eval_ids, args.seq_len, None))
    rows.append(_row(f"{label} W8 weight-only", pruned, eval_ids, args.seq_len, "weight-only"))
    pruned.load_state_dict(state)
    rows.append(_row(f"{label} W8A8 dynamic", pruned, eval_ids, args.seq_len, "dynamic"))

    for kind, dense_int8, pruned_int8 in (("W8 weight-only", rows[2], rows[5]), ("W8A8 dynamic", rows[1], rows[6]),
                                          ("W4 g64 (about the same bytes)", rows[3], rows[5])):
        verdict = "yes" if pruned_int8["perplexity"] <= dense_int8["perplexity"] else "no"
        size, ppl = (pruned_int8[k] / dense_int8[k] for k in ("weight_MB", "perplexity"))
        print(f"{kind}: pruned + INT8 is {size:.2f}x the bytes of the dense quantized model, at {ppl:.2f}x its "
              f"perplexity: better at equal or smaller size? {verdict}")
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
