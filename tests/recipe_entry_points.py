"""Entry points used by the recipe tests: a tiny model and loaders, as a user's package would have."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3))


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 12, generator=g)
    y = x[:, :3].argmax(1)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=g), DataLoader(
        TensorDataset(x, y), batch_size=64)


def build_cnn() -> nn.Module:
    """A user's small CNN: conv-BN-ReLU twice, pooled, then a linear head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))


def image_loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, :, :4].mean((1, 2, 3)) > 0.2).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g), DataLoader(
        TensorDataset(x, y), batch_size=32)


def not_a_model() -> str:
    return "a string"


def broken() -> nn.Module:
    raise RuntimeError("no GPU here")


def wrong_example() -> torch.Tensor:
    return torch.randn(1, 3, 8, 8)  # the CNN takes one channel


def build_tiny_lm() -> nn.Module:
    """A user's causal LM: a two-block Llama with random weights (Hugging Face)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _token_stream(n: int, seed: int) -> torch.Tensor:
    """Ids with some structure (a noisy counter), so a model's loss depends on its weights."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) * 3 + torch.randint(0, 4, (n,), generator=g)) % 64


def text_data() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Training windows (2 x 16 tokens each) and held-out token ids in two named segments."""
    train = _token_stream(256, 0).view(-1, 2, 16)
    return list(train), {"counting": _token_stream(96, 1), "noise": torch.randint(0, 64, (64,))}


def short_text_data() -> tuple[list[torch.Tensor], torch.Tensor]:
    return list(_token_stream(64, 0).view(-1, 2, 16)), _token_stream(10, 1)
