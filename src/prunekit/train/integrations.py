"""Training-framework hooks: a Hugging Face `Trainer` callback that drives a `GradualPruner`.

For a plain PyTorch loop no hook is needed: call `pruner.step(step)` after `optimizer.step()`.
"""

from __future__ import annotations

from typing import Any

from prunekit.core.extras import require
from prunekit.core.masks import finalize
from prunekit.train.schedule import GradualPruner


def pruning_callback(pruner: GradualPruner, *, finalize_at_end: bool = True) -> Any:
    """A `transformers.TrainerCallback` that steps `pruner` with the Trainer's global step.

    Masks stay attached through training (and intermediate checkpoints, which resume with
    `resume_from_checkpoint`); at the end of training they are baked into plain weights when
    `finalize_at_end`, so `save_pretrained` writes ordinary tensors with zeros that
    `from_pretrained` loads into the unmodified architecture.

    Example:
        >>> pruner = GradualPruner(model, UnstructuredConfig(sparsity=0.5), Cubic(end_step=1000))  # doctest: +SKIP
        >>> Trainer(model, args, callbacks=[pruning_callback(pruner)], ...).train()  # doctest: +SKIP
    """
    trainer_callback = require("transformers", extra="hf", what="the Trainer callback").TrainerCallback

    class PruningCallback(trainer_callback):  # type: ignore[misc, valid-type]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            pruner.step(state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if finalize_at_end:
                finalize(pruner.model)

    return PruningCallback()
