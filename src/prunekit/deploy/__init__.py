"""Getting a pruned model out: checkpoints, INT8, ONNX export and its check, 2:4 tensor-core layouts."""
