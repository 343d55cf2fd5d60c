"""Atomic file writes: a temporary file in the same folder, fsync, then rename into place.

A crash at any moment leaves either the previous file or the complete new one, never half.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, TypeVar

from prunekit.errors import PrunekitError

if TYPE_CHECKING:
    from pydantic import BaseModel

_Model = TypeVar("_Model", bound="BaseModel")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` for a writer that wants a file name (safetensors' `save_file`).

    It replaces `path`, synced to disk, only if the block finishes without error; otherwise it
    is deleted and `path` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise PrunekitError(f"cannot write {str(path)!r}: {err.strerror}") from None
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The rename itself must reach the disk for the new file to survive a power loss.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """Open a binary stream that replaces `path` only if the block finishes without error."""
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        yield stream


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically and return the path."""
    with atomic_writer(path) as stream:
        stream.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically and return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------------------------
# Reading the small documents prunekit writes (JSON/YAML): bounded, text only, never code.

MAX_DOCUMENT_BYTES = 64 * 2**20  # plans, tables and recipes are kilobytes; refuse to slurp a huge file
_PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))  # PROTO opcode of pickle protocols 2..5


def sniff_format(head: bytes) -> str | None:
    """Name the binary format a file starts with when it is one that executes code on load."""
    if head.startswith(_PICKLE_MAGIC):
        return "a pickle"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save format, which holds a pickle)"
    return None


def read_document(path: str | Path, what: str, error: type[PrunekitError] = PrunekitError) -> str:
    """Read a UTF-8 text document written by prunekit; refuse pickles, binaries and huge files.

    Raises:
        error: the file is missing, larger than `MAX_DOCUMENT_BYTES`, binary, or not UTF-8;
            the message names the file and says what it expected.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise error(f"{what} {str(path)!r} is {size:,} bytes; a prunekit document is at most "
                        f"{MAX_DOCUMENT_BYTES:,}: is it the right file?")
        raw = path.read_bytes()
    except OSError as err:
        raise error(f"{what} {str(path)!r} cannot be read: {err.strerror}") from None
    found = sniff_format(raw[:8])
    if found is not None:
        raise error(f"{what} {str(path)!r} is {found}, not a JSON/YAML document; prunekit never unpickles")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{what} {str(path)!r} is not UTF-8 text (byte {err.start}): a binary file?") from None


def read_json_document(path: str | Path, what: str, error: type[PrunekitError] = PrunekitError) -> Any:
    """`read_document`, parsed as JSON; malformed or absurdly deep JSON raises `error` naming the file."""
    import json

    try:
        return json.loads(read_document(path, what, error))
    except (json.JSONDecodeError, RecursionError) as err:  # RecursionError: nesting deeper than Python's stack
        raise error(f"{what} {str(path)!r} is not JSON: {err}") from None



_Doc = TypeVar("_Doc", bound="JsonDocument")


class JsonDocument:
    """`save`/`load` for a class that has `to_dict`/`from_dict`: atomic JSON out, a checked read in.

    Subclasses name the document for error messages (`document_name`) and the error to raise.
    """

    document_name: ClassVar[str] = "document"
    document_error: ClassVar[type[PrunekitError]] = PrunekitError
    json_indent: ClassVar[int | None] = None

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[_Doc], data: Any) -> _Doc:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the document as JSON, atomically; returns the path."""
        import json

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=self.json_indent))

    @classmethod
    def load(cls: type[_Doc], path: str | Path) -> _Doc:
        """Read a document written by `save`; a malformed file raises `document_error` naming it."""
        return cls.from_dict(read_json_document(path, cls.document_name, cls.document_error))


def validate_document(data: Any, schema: type[_Model], what: str, error: type[PrunekitError]) -> _Model:
    """Check parsed JSON/YAML `data` against a pydantic `schema`; errors name each bad field."""
    from pydantic import ValidationError

    try:
        return schema.model_validate(data)
    except ValidationError as err:
        problems = []
        for e in err.errors()[:5]:
            field = ".".join(str(p) for p in e["loc"]) or "<root>"
            problems.append(f"field {field!r}: {e['msg']} (got {_short(e.get('input'))})")
        raise error(f"{what}: " + "; ".join(problems)) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


MAX_DOCUMENT_NODES = 1_000_000


def check_expanded_size(data: Any, what: str, error: type[PrunekitError] = PrunekitError) -> None:
    """Refuse a parsed document whose YAML aliases expand it past `MAX_DOCUMENT_NODES` nodes.

    A few hundred bytes of nested aliases ("billion laughs") parse into shared objects that any
    walk over the document visits exponentially often; the size is counted once per object.
    """
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if id(node) in sizes:
            if sizes[id(node)] < 0:  # YAML can build `&a [*a]`: any walk over it never ends
                raise error(f"{what} contains a YAML alias that refers to itself; refusing to read it")
            return sizes[id(node)]
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        sizes[id(node)] = -1  # in progress
        total = 1 + sum(size(c) for c in children)
        sizes[id(node)] = total
        return total

    if size(data) > MAX_DOCUMENT_NODES:
        raise error(f"{what} expands to more than {MAX_DOCUMENT_NODES:,} values through YAML aliases "
                    "(a 'billion laughs' document?); refusing to read it")
