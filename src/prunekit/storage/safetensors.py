"""The safetensors file layout, checked before any tensor is read: shared by every reader.

Model checkpoints (`prunekit.deploy.checkpoint`) and run states (`prunekit.storage.runstate`)
are both safetensors files read from paths a user hands us, so both first check that the
header is JSON, is not a pickle in disguise, and that every tensor's byte range lies inside
the file and matches its shape and dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from prunekit.errors import CheckpointError
from prunekit.storage.files import sniff_format

# safetensors' own cap on the JSON header; anything larger is not a checkpoint we wrote.
MAX_HEADER_BYTES = 100 * 2**20
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
                "F8_E8M0": 1}


def check_safetensors_layout(path: Path, what: str = "checkpoint") -> None:
    """Check that a safetensors file exists and that its header fits its size, before any tensor is read.

    Every tensor's byte range must lie inside the file and match its shape and dtype, so a
    file whose header claims more data than it holds is refused without reading past its end.

    Raises:
        CheckpointError: no such file (named as `what`), another format (a pickle, a torch.save
            zip), a truncated file, or a header entry out of bounds; the message names the file
            and the tensor.
    """
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            found = sniff_format(head)
            if found is not None:
                raise CheckpointError(f"{str(path)!r} is not a valid safetensors file: it is {found}, and "
                                      "prunekit never unpickles")
            if len(head) < 8:
                raise CheckpointError(f"{str(path)!r} is not a valid safetensors file: {size} bytes, no header")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(f"{str(path)!r} is not a valid safetensors file: its header claims {n:,} "
                                      f"bytes but the file holds {size:,} (truncated, or another format)")
            header = json.loads(f.read(n))
    except OSError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise CheckpointError(f"{str(path)!r} is not a valid safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(path)!r}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            numel = int(np.prod([int(d) for d in entry["shape"]], dtype=np.float64))
            nbytes = numel * _ST_ITEMSIZE[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{str(path)!r}: tensor {key!r} has a malformed header entry") from None
        if not 0 <= begin <= end <= data_bytes:
            raise CheckpointError(f"{str(path)!r}: tensor {key!r} claims bytes [{begin:,}, {end:,}) but the file "
                                  f"holds {data_bytes:,} bytes of data (truncated or forged)")
        if end - begin != nbytes:
            raise CheckpointError(f"{str(path)!r}: tensor {key!r} spans {end - begin:,} bytes, its shape and "
                                  f"dtype need {nbytes:,}")
