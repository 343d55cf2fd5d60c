"""The Hugging Face Trainer callback prunes during training and leaves a from_pretrained-able model."""

from __future__ import annotations

import pytest
import torch

import prunekit as pk

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def test_trainer_callback_prunes_and_saves_plain_weights(tmp_path) -> None:
    from torch.utils.data import Dataset

    from prunekit.train.integrations import pruning_callback

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_labels=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)

    class Toy(Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict:
            ids = torch.randint(1, 50, (8,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": int(ids[0] > 25)}

    pruner = pk.GradualPruner(model, pk.UnstructuredConfig(sparsity=0.6, exclude=("classifier",)),
                              pk.Cubic(end_step=6, every=2))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=16,
                                          max_steps=8, report_to=[], save_strategy="no", use_cpu=True,
                                          disable_tqdm=True, logging_strategy="no")
    transformers.Trainer(model=model, args=args, train_dataset=Toy(), callbacks=[pruning_callback(pruner)]).train()
    assert pruner.current_sparsity == pytest.approx(0.6)
    assert not any("parametrizations" in k for k in model.state_dict())
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "saved")
    layers = pk.sparsity(reloaded).layers
    assert layers["bert.encoder.layer.0.intermediate.dense"] == pytest.approx(0.6, abs=0.05)
    assert layers["classifier"] == 0.0
