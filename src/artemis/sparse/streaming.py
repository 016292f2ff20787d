"""Checkpoints one block at a time: a lazily opened model folder and a streaming writer.

:class:`LazyCheckpoint` builds a Hugging Face model from a folder's ``config.json`` with
every parameter on the ``meta`` device (``accelerate.init_empty_weights()``: no memory),
indexes the tensors of its safetensors shards (``model.safetensors`` or
``model.safetensors.index.json``) and reads them with ``safetensors.safe_open`` only when
asked: :meth:`~LazyCheckpoint.materialise` puts the named parameters on a real device,
:meth:`~LazyCheckpoint.release` puts them back on ``meta``; within
:meth:`~LazyCheckpoint.on_demand` named parameters are read only where torch functions
read them (the rows an embedding lookup needs), and :meth:`~LazyCheckpoint.stored_bytes`
gives a stored tensor's bytes a piece at a time. It counts the bytes that are real at any
time (``live_bytes``, ``peak_bytes``). The folder is only read.

:class:`StreamingWriter` writes the folder that :func:`artemis.sparse.checkpoint.save_pruned`
writes (``format="compressed"``: sparse-bitmask weights, ``config.json`` with the Artemis
marker, ``artemis_export.json`` with XXH3-64 checksums), but tensor by tensor: each
tensor's bytes go to a data file as soon as it is added (a sparse weight's layout made a
few rows at a time; :meth:`~StreamingWriter.add_stored` copies a stored tensor from its
shard without loading it), and :meth:`~StreamingWriter.close` puts the safetensors header
in front. The folder is built in a temporary sibling and
renamed into place only by a successful :meth:`~StreamingWriter.close`; an error (or
:meth:`~StreamingWriter.abort`) removes it, so a failed run never leaves a folder that
looks complete. :func:`artemis.load_pruned` reads the result.

Example:
    >>> import tempfile, torch, torch.nn as nn
    >>> from artemis import load_pruned
    >>> net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    >>> with torch.no_grad():
    ...     net[0].weight[:, :40] = 0
    >>> d = tempfile.mkdtemp() + "/out"
    >>> w = StreamingWriter(d, net, candidates={"0.weight": "0", "1.weight": "1"})
    >>> for name, t in net.state_dict().items():
    ...     w.add(name, t)
    >>> info = w.close()
    >>> info["sparse_modules"], torch.equal(load_pruned(d, model=nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8)))[0].weight, net[0].weight)
    (['0'], True)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode

from artemis.core.errors import CheckpointError
from artemis.core.sizing import stores_sparse, unique_state_tensors
from artemis.sparse import checkpoint as _ckpt
from artemis.sparse.bitmask import _as_int_numpy, _row_counts, bitmask_compress, nonzero_mask

__all__ = ["LazyCheckpoint", "StreamingWriter", "TOKENIZER_FILES"]

logger = logging.getLogger(__name__)

#: files copied from a source folder next to the weights (when present)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
_ST_DTYPE = {v: k for k, v in _ckpt._DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
#: bytes read at a time when a stored tensor is copied to the output without being loaded
COPY_CHUNK = 8 << 20
#: weights of a sparse candidate masked and gathered at a time by the writer
SPARSE_CHUNK = 1 << 20


def _set_tensor(model: nn.Module, name: str, value: Tensor, is_param: bool) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if is_param:
        mod._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


class LazyCheckpoint:
    """A model folder opened lazily: the model on ``meta``, tensors read on demand.

    Args:
        folder: a Hugging Face folder with ``config.json`` and safetensors weights.
        device: where :meth:`materialise` puts tensors (default CPU).

    Attributes:
        model: the model, every parameter on ``meta`` until materialised.
        live_bytes / peak_bytes: parameter bytes on a real device now / at most so far.

    Raises:
        CheckpointError: no ``config.json``, no safetensors weights, or a class that
            transformers does not have.
    """

    def __init__(self, folder: Union[str, os.PathLike], device: Union[str, torch.device, None] = None) -> None:
        import transformers
        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if not (self.folder / _ckpt.CONFIG_NAME).is_file():
            raise CheckpointError(f"{self.folder}: no {_ckpt.CONFIG_NAME}; streaming needs a Hugging Face model folder")
        files = self._weight_files()
        self._handles = {f: safe_open(str(self.folder / f), framework="pt", device="cpu") for f in files}
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                self._where[k] = f
        config = AutoConfig.from_pretrained(str(self.folder))
        config._name_or_path = str(self.folder)
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
        if cls is None:
            raise CheckpointError(
                f"{self.folder / _ckpt.CONFIG_NAME}: architectures {archs!r} is not a transformers class; "
                "load the model yourself and pass it as a module"
            )
        with init_empty_weights(include_buffers=False):
            self.model: nn.Module = cls.from_config(config) if cls is transformers.AutoModel else cls(config)
        # built on meta, tied parameters (lm_head and the embeddings) are apart until tied, outside
        # init_empty_weights (which would re-register a copy); the checkpoint stores them once
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()
        self.model.eval()
        self._prefix = getattr(self.model, "base_model_prefix", "") or ""
        self.live_bytes = 0
        self.peak_bytes = 0
        self._persistent = self._persistent_buffers()
        self._headers: dict[str, tuple[int, dict]] = {}
        self._stored_dtypes()

    def _stored_dtypes(self) -> None:
        """Give each meta parameter the dtype it is stored in (the model is built in the
        default float32; a bf16 checkpoint would otherwise count twice its bytes)."""
        groups: dict[int, list[str]] = {}
        params: dict[int, nn.Parameter] = {}
        for n, p in self.model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(n)
            params[id(p)] = p
        for pid, names in groups.items():
            key = next((k for k in map(self.key_of, names) if k is not None), None)
            if key is None:
                continue
            dtype = self._stored_dtype(key)
            p = params[pid]
            if dtype is None or dtype == p.dtype or not dtype.is_floating_point:
                continue
            meta = nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"), requires_grad=False)
            for n in names:
                _set_tensor(self.model, n, meta, True)

    def _stored_dtype(self, key: str) -> Optional[torch.dtype]:
        """The dtype the checkpoint stores ``key`` in (None: not a plain stored tensor)."""
        if key not in self._where:
            return None
        return _ckpt._DTYPES.get(self._handles[self._where[key]].get_slice(key).get_dtype())

    def _weight_files(self) -> list[str]:
        index = self.folder / INDEX_NAME
        if index.is_file():
            data = _ckpt._read_json(index)
            return sorted(set(data.get("weight_map", {}).values()))
        if (self.folder / _ckpt.WEIGHTS_NAME).is_file():
            return [_ckpt.WEIGHTS_NAME]
        raise CheckpointError(
            f"{self.folder}: no {_ckpt.WEIGHTS_NAME} or {INDEX_NAME}; streaming reads safetensors weights only"
        )

    def _persistent_buffers(self) -> set[str]:
        out = set()
        for mod_name, mod in self.model.named_modules():
            for b in mod._buffers:
                if b not in getattr(mod, "_non_persistent_buffers_set", ()):
                    out.add(f"{mod_name}.{b}" if mod_name else b)
        return out

    def key_of(self, name: str) -> Optional[str]:
        """The checkpoint key of the model's tensor ``name`` (with or without the base
        model prefix), or None."""
        p = self._prefix
        for k in (name, f"{p}.{name}" if p else None, name[len(p) + 1 :] if p and name.startswith(p + ".") else None):
            if k is not None and k in self._where:
                return k
        return None

    def read(self, name: str) -> Tensor:
        """The stored tensor of the model's ``name`` (CPU, its stored dtype).

        The tensor is a copy read through a mapping of the shard opened for this read and
        closed after it: a tensor of a long-lived mapping keeps the pages it touched resident
        while the shard is open (and an in-place prune turns them into private copies), so
        every block read would stay in the process's memory until the end."""
        from safetensors import safe_open

        key = self.key_of(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        with safe_open(str(self.folder / self._where[key]), framework="pt", device="cpu") as h:
            t = h.get_tensor(key)
            out = t.clone()
            del t
        return out

    def materialise(self, names: Iterable[str]) -> None:
        """Read the parameters (and stored persistent buffers) ``names`` onto ``device``.
        Names sharing one parameter (tied weights) get one tensor."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        aliases: dict[int, list[str]] = {}
        for n, p in params.items():
            aliases.setdefault(id(p), []).append(n)
        done: set[int] = set()
        for name in names:
            if name in params:
                p = params[name]
                if id(p) in done or p.device.type != "meta":
                    continue
                done.add(id(p))
                group = aliases[id(p)]
                key = next((n for n in group if self.key_of(n) is not None), None)
                if key is None:
                    raise CheckpointError(f"{self.folder}: parameter {name!r} is not in the checkpoint")
                t = self.read(key).to(self.device)
                new = nn.Parameter(t, requires_grad=False)
                for n in group:
                    _set_tensor(self.model, n, new, True)
                self.live_bytes += t.numel() * t.element_size()
            elif name in self._persistent and self.key_of(name) is not None:
                _set_tensor(self.model, name, self.read(name).to(self.device), False)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def release(self, names: Iterable[str]) -> None:
        """Put the parameters ``names`` back on ``meta`` (their memory is freed)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        aliases: dict[int, list[str]] = {}
        for n, p in params.items():
            aliases.setdefault(id(p), []).append(n)
        done: set[int] = set()
        for name in names:
            p = params.get(name)
            if p is None or id(p) in done or p.device.type == "meta":
                continue
            done.add(id(p))
            self.live_bytes -= p.numel() * p.element_size()
            meta = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            for n in aliases[id(p)]:
                _set_tensor(self.model, n, meta, True)
        if done:
            del p, params  # the last references to the released tensors: freed before the trim
            _return_freed_memory()

    @contextlib.contextmanager
    def mapped(self, names: Iterable[str]) -> Iterator[None]:
        """The parameters ``names`` backed by mappings of their shards while the block runs:
        nothing is read up front, and a page of a tensor becomes resident only when the
        model touches it (an embedding lookup touches the rows of the tokens looked up and
        the pages around them; a head that is not called, nothing). On exit they are back
        on ``meta`` and the mappings are closed. ``live_bytes`` counts their whole bytes
        meanwhile (the most they can take). Names that are not parameters are ignored."""
        from safetensors import safe_open

        params = dict(self.model.named_parameters(remove_duplicate=False))
        aliases: dict[int, list[str]] = {}
        for n, p in params.items():
            aliases.setdefault(id(p), []).append(n)
        mapped: list[str] = []
        done: set[int] = set()
        with contextlib.ExitStack() as stack:
            handles: dict[str, Any] = {}
            try:
                for name in names:
                    p = params.get(name)
                    if p is None or id(p) in done or p.device.type != "meta":
                        continue
                    done.add(id(p))  # tied names share one parameter: mapped and counted once
                    group = aliases[id(p)]
                    key = next((self.key_of(n) for n in group if self.key_of(n) is not None), None)
                    if key is None:
                        raise CheckpointError(f"{self.folder}: parameter {name!r} is not in the checkpoint")
                    f = self._where[key]
                    if f not in handles:
                        handles[f] = stack.enter_context(safe_open(str(self.folder / f), framework="pt", device="cpu"))
                    t = handles[f].get_tensor(key).to(self.device)
                    new = nn.Parameter(t, requires_grad=False)
                    for n in group:
                        _set_tensor(self.model, n, new, True)
                    mapped.append(name)
                    self.live_bytes += t.numel() * t.element_size()
                    del t, new
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                yield
            finally:
                self.release(mapped)

    @contextlib.contextmanager
    def on_demand(self, names: Iterable[str]) -> Iterator[None]:
        """The parameters ``names`` (CPU) as uninitialised tensors that are filled from the
        checkpoint only where torch functions read them, while the block runs: an embedding
        lookup (``F.embedding``) reads the rows of the ids looked up, any other function
        that receives the tensor reads it whole first, and a head that is not called is
        never read. Untouched memory of an uninitialised tensor is not resident, so the
        calibration tokens' rows are what the embeddings cost (with a mapping of the shard,
        each row looked up made about 1 MiB around it resident). ``live_bytes`` counts the
        whole bytes meanwhile (the most they can take); on exit they are back on ``meta``.
        On another device this is :meth:`mapped`."""
        if self.device.type != "cpu":
            with self.mapped(names):
                yield
            return
        params = dict(self.model.named_parameters(remove_duplicate=False))
        aliases: dict[int, list[str]] = {}
        for n, p in params.items():
            aliases.setdefault(id(p), []).append(n)
        placed: list[str] = []
        lazy: dict[int, _StoredRows] = {}
        done: set[int] = set()
        try:
            for name in names:
                p = params.get(name)
                if p is None or id(p) in done or p.device.type != "meta":
                    continue
                done.add(id(p))
                group = aliases[id(p)]
                key = next((n for n in group if self.key_of(n) is not None), None)
                if key is None:
                    raise CheckpointError(f"{self.folder}: parameter {name!r} is not in the checkpoint")
                path, start, end, st_dtype, shape = self.stored_tensor(key)
                if _ckpt._DTYPES.get(st_dtype) != p.dtype or shape != list(p.shape) or p.dim() == 0:
                    t = self.read(key)  # stored otherwise than the model holds it: read whole
                    rows = None
                else:
                    t = torch.empty(p.shape, dtype=p.dtype)
                    rows = _StoredRows(t, path, start, end, name)
                new = nn.Parameter(t, requires_grad=False)
                for n in group:
                    _set_tensor(self.model, n, new, True)
                if rows is not None:
                    lazy[id(new)] = rows
                placed.append(name)
                self.live_bytes += t.numel() * t.element_size()
                del t, new
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            with _ReadWhereUsed(lazy):
                yield
        finally:
            lazy.clear()
            self.release(placed)

    def stored_tensor(self, name: str) -> tuple[Path, int, int, str, list[int]]:
        """Where the model's tensor ``name`` is stored: ``(shard, first byte, end byte,
        safetensors dtype, shape)``, the bytes counted from the start of the shard file."""
        key = self.key_of(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: tensor {name!r} is not in the checkpoint")
        f = self._where[key]
        header = self._headers.get(f)
        if header is None:
            path = self.folder / f
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = self._headers[f] = (8 + n, json.loads(fh.read(n)))
        base, entries = header
        e = entries[key]
        start, end = e["data_offsets"]
        return self.folder / f, base + start, base + end, e["dtype"], list(e["shape"])

    def stored_bytes(self, name: str, chunk: Optional[int] = None) -> Iterator[memoryview]:
        """The stored bytes of ``name``, ``chunk`` bytes at a time (default ``COPY_CHUNK``),
        read from the shard file into one reused buffer (no mapping: only the buffer is
        resident; ``live_bytes`` counts it while the copy runs)."""
        chunk = COPY_CHUNK if chunk is None else chunk
        if chunk < 1:
            raise CheckpointError(f"stored_bytes: chunk must be a positive number of bytes, got {chunk!r}")
        path, start, end, _, _ = self.stored_tensor(name)
        size = min(chunk, end - start)
        buf = bytearray(size)
        view = memoryview(buf)
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        try:
            with open(path, "rb") as fh:
                fh.seek(start)
                left = end - start
                while left > 0:
                    got = fh.readinto(view[: min(size, left)])
                    if not got:
                        raise CheckpointError(f"{path}: ends inside tensor {name!r}")
                    yield view[:got]
                    left -= got
        finally:
            self.live_bytes -= size

    def close(self) -> None:
        self._handles.clear()


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc ``malloc_trim``; nothing elsewhere):
    a freed block's tensors otherwise stay in the process's resident set as free heap."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM: Any = None


class _StoredRows:
    """An uninitialised tensor and where its stored bytes are: rows read on demand."""

    def __init__(self, t: Tensor, path: Path, start: int, end: int, name: str) -> None:
        if end - start != t.numel() * t.element_size():
            raise CheckpointError(f"{path}: tensor {name!r} stores {end - start} bytes, its shape needs another size")
        self.path, self.start, self.name = path, start, name
        self.rows = t.shape[0]
        self.u8 = t.detach().view(-1).view(torch.uint8).numpy().reshape(self.rows, -1)  # its bytes, row by row
        self.have = torch.zeros(self.rows, dtype=torch.bool)
        self.complete = False

    def _read(self, a: int, b: int) -> None:
        width = self.u8.shape[1]
        with open(self.path, "rb") as fh:
            fh.seek(self.start + a * width)
            view = memoryview(self.u8[a:b]).cast("B")
            got = 0
            while got < view.nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise CheckpointError(f"{self.path}: ends inside tensor {self.name!r}")
                got += n

    def read_rows(self, ids: Tensor) -> None:
        """Read the rows ``ids`` (those in range, not read before)."""
        if self.complete:
            return
        ids = ids.detach().reshape(-1).to("cpu", torch.int64)
        ids = torch.unique(ids[(ids >= 0) & (ids < self.rows)])
        ids = ids[~self.have[ids]]
        if not len(ids):
            return
        cuts = torch.nonzero(ids[1:] - ids[:-1] != 1).reshape(-1) + 1  # runs of consecutive rows
        bounds = [0, *cuts.tolist(), len(ids)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            self._read(int(ids[lo]), int(ids[hi - 1]) + 1)
        self.have[ids] = True

    def read_all(self) -> None:
        if self.complete:
            return
        step = max(1, COPY_CHUNK // max(self.u8.shape[1], 1))
        for a in range(0, self.rows, step):
            b = min(self.rows, a + step)
            if not bool(self.have[a:b].all()):
                self._read(a, b)
        self.complete = True


#: torch functions that read a tensor's metadata only (they leave an on-demand tensor unread)
_METADATA = frozenset(
    ["__get__", "size", "dim", "numel", "stride", "element_size", "is_floating_point", "is_contiguous", "ndimension"]
)


class _ReadWhereUsed(TorchFunctionMode):
    """While active, fills the on-demand tensors of :meth:`LazyCheckpoint.on_demand` before a
    torch function reads them: ``F.embedding`` gets the rows it looks up, anything else the
    whole tensor (so every result is what the stored tensor gives)."""

    def __init__(self, lazy: dict[int, _StoredRows]) -> None:
        super().__init__()
        self.lazy = lazy

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if self.lazy and getattr(func, "__name__", "") not in _METADATA:
            if func is torch.nn.functional.embedding:
                ids = args[0] if args else kwargs.get("input")
                weight = args[1] if len(args) > 1 else kwargs.get("weight")
                rows = self.lazy.get(id(weight))
                if rows is not None and isinstance(ids, Tensor):
                    rows.read_rows(ids)
                    # the ids themselves and any other on-demand tensor passed: read whole
                    others = [a for i, a in enumerate(args) if i != 1] + [v for k, v in kwargs.items() if k != "weight"]
                    self._read_whole(others)
                    return func(*args, **kwargs)
            self._read_whole(list(args) + list(kwargs.values()))
        return func(*args, **kwargs)

    def _read_whole(self, values: list) -> None:
        for v in values:
            if isinstance(v, (list, tuple)):
                self._read_whole(list(v))
            elif isinstance(v, Tensor):
                rows = self.lazy.get(id(v))
                if rows is not None:
                    rows.read_all()


def _xxh3_update(state: Any, piece: memoryview) -> Any:
    state.update(piece)
    return state


def _xxh3_new() -> Any:
    import xxhash

    return xxhash.xxh3_64()


#: checksums computed a piece at a time: (start, update, digest), each giving what
#: ``checkpoint.CHECKSUMS`` gives for the whole tensor's bytes
_INCREMENTAL: dict[str, tuple[Callable[[], Any], Callable[[Any, memoryview], Any], Callable[[Any], int]]] = {
    "xxh3_64": (_xxh3_new, _xxh3_update, lambda s: s.intdigest()),
    "crc32": (lambda: 0, lambda s, piece: zlib.crc32(piece, s), lambda s: s),
}


class StreamingWriter:
    """Writes a :func:`~artemis.sparse.checkpoint.save_pruned` folder tensor by tensor.

    Args:
        path: the output folder (replaced as a whole at :meth:`close`, as ``save_pruned`` does).
        model: the model (for its config, generation config, class name and tied-weight
            aliases; its tensors may be on ``meta``).
        candidates: ``{tensor name: module name}`` of the weights that may be stored
            sparse (each is, when that is smaller).
        source_dir: a folder whose sentence-transformers files and tokenizer files are
            copied (None: none).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        model: nn.Module,
        candidates: dict[str, str],
        *,
        source_dir: Optional[Union[str, os.PathLike]] = None,
    ) -> None:
        self.dest = Path(os.path.abspath(path))
        self.model = model
        self.candidates = dict(candidates)
        self.source_dir = Path(source_dir) if source_dir is not None else None
        stored_as: dict[int, str] = {}
        for name, t in unique_state_tensors(model):
            stored_as[id(t)] = name
        self.aliases = {
            n: stored_as[id(t)]
            for n, t in model.state_dict(keep_vars=True).items()
            if id(t) in stored_as and stored_as[id(t)] != n
        }
        self._ctx = _ckpt._atomic_folder(self.dest)
        self.tmp = self._ctx.__enter__()
        self._data_path = self.tmp / ".data.partial"
        self._data = open(self._data_path, "wb")
        self._header: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self.checksums: dict[str, int] = {}
        self.sparse_modules: list[str] = []
        self.zeros = self.total = 0
        self.float_dtypes: set[str] = set()
        self._open = True

    def _put(self, name: str, t: Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPE:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        if t.numel():
            self._data.write(_ckpt._raw_bytes(t))
        n = t.numel() * t.element_size()
        self._header[name] = {
            "dtype": _ST_DTYPE[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + n],
        }
        self._offset += n
        self.checksums[name] = _ckpt.CHECKSUMS[_ckpt.CHECKSUM](t)

    def add(self, name: str, t: Tensor) -> None:
        """Write the model tensor ``name`` (a tied alias is skipped: it is stored once)."""
        if not self._open:
            raise CheckpointError("StreamingWriter: add() after close()")
        if name in self.aliases or name in self._header:
            return
        if t.is_floating_point():
            self.float_dtypes.add(_ckpt._dtype_name(t.dtype))
        mname = self.candidates.get(name)
        if mname is not None and t.dim() == 2:
            w = t.detach().to("cpu").contiguous()
            hasher = _INCREMENTAL.get(_ckpt.CHECKSUM)
            if hasher is None:  # a checksum without a piecewise form: the whole tensor at once
                mask = nonzero_mask(w)
                nnz = int(mask.sum())
                self.zeros += w.numel() - nnz
                self.total += w.numel()
                if stores_sparse(w, nnz=nnz):
                    for k, v in bitmask_compress(w, mask).items():
                        self._put(f"{mname}.{k}", v)
                    self.sparse_modules.append(mname)
                    return
            elif self._add_sparse(mname, w, hasher):
                return
        self._put(name, t)

    def _add_sparse(self, mname: str, w: Tensor, hasher: tuple) -> bool:
        """Write the 2-D candidate ``w`` in the layout of ``bitmask_compress`` when that is
        smaller (returns whether it did), a few rows at a time: the masks, the indices of the
        kept weights and their values are never made for the whole matrix (several times its
        bytes); only the packed bitmask (one bit per weight) is. The same bytes and checksums."""
        rows, cols = w.shape
        step = max(1, SPARSE_CHUNK // max(cols, 1))
        bits = np.empty((rows, (cols + 7) // 8), dtype=np.uint8)
        nnz = 0
        for a in range(0, rows, step):
            m = nonzero_mask(w[a : a + step])
            nnz += int(m.sum())
            bits[a : a + step] = np.packbits(m, axis=-1, bitorder="little")
            del m
        self.zeros += w.numel() - nnz
        self.total += w.numel()
        if not stores_sparse(w, nnz=nnz):
            return False
        state = hasher[0]()
        start = self._offset
        for a in range(0, rows, step):
            chunk = w[a : a + step]
            values = np.take(_as_int_numpy(chunk).reshape(-1), np.flatnonzero(nonzero_mask(chunk)))
            piece = memoryview(values).cast("B")
            self._data.write(piece)
            state = hasher[1](state, piece)
            self._offset += piece.nbytes
            del values, piece
        name = f"{mname}.compressed"
        self._header[name] = {"dtype": _ST_DTYPE[w.dtype], "shape": [nnz], "data_offsets": [start, self._offset]}
        self.checksums[name] = hasher[2](state) if nnz else 0
        counts = _row_counts(bits)
        self._put(f"{mname}.bitmask", torch.from_numpy(bits))
        self._put(f"{mname}.shape", torch.tensor([rows, cols], dtype=torch.int64))
        self._put(f"{mname}.row_offsets", torch.from_numpy(np.cumsum(counts) - counts))
        self.sparse_modules.append(mname)
        return True

    def add_stored(self, name: str, lazy: LazyCheckpoint) -> None:
        """Write the model tensor ``name`` as ``lazy``'s checkpoint stores it, copied from
        the shard file a piece at a time (never whole in memory); the same bytes, header
        entry and checksum as :meth:`add` of the tensor read. A sparse candidate is read
        and given to :meth:`add` (it may be stored sparse)."""
        if not self._open:
            raise CheckpointError("StreamingWriter: add_stored() after close()")
        if name in self.aliases or name in self._header:
            return
        _, start, end, st_dtype, shape = lazy.stored_tensor(name)
        dtype = _ckpt._DTYPES.get(st_dtype)
        hasher = _INCREMENTAL.get(_ckpt.CHECKSUM)
        if name in self.candidates or dtype is None or hasher is None:
            self.add(name, lazy.read(name))
            return
        if dtype.is_floating_point:
            self.float_dtypes.add(_ckpt._dtype_name(dtype))
        state = hasher[0]()
        for piece in lazy.stored_bytes(name):
            self._data.write(piece)
            state = hasher[1](state, piece)
        n = end - start
        self._header[name] = {
            "dtype": _ST_DTYPE[dtype],
            "shape": shape,
            "data_offsets": [self._offset, self._offset + n],
        }
        self._offset += n
        self.checksums[name] = hasher[2](state) if n else 0

    def abort(self) -> None:
        """Remove the temporary folder (nothing is written to the destination)."""
        if not self._open:
            return
        self._open = False
        self._data.close()
        try:
            raise CheckpointError("aborted")
        except CheckpointError as exc:
            try:
                self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            except CheckpointError:
                pass

    def close(self) -> dict[str, Any]:
        """Finish the folder and rename it into place; returns ``save_pruned``-like info."""
        if not self._open:
            raise CheckpointError("StreamingWriter: close() called twice or after abort()")
        try:
            info = self._finish()
        except BaseException:
            self.abort()
            raise
        self._open = False
        self._ctx.__exit__(None, None, None)
        return info

    def _finish(self) -> dict[str, Any]:
        self._data.close()
        header = dict(self._header)
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        weights = self.tmp / _ckpt.WEIGHTS_NAME
        with open(weights, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 16 << 20)
        self._data_path.unlink()
        files = [_ckpt.WEIGHTS_NAME]
        cfg = _ckpt._hf_config(self.model)
        sparse = sorted(self.sparse_modules)
        if cfg is not None:
            cfg.save_pretrained(str(self.tmp))
            cfg_path = self.tmp / _ckpt.CONFIG_NAME
            data = json.loads(cfg_path.read_text(encoding="utf-8"))
            data.pop("quantization_config", None)
            data.pop("transformers_weights", None)
            if sparse:
                data["quantization_config"] = _ckpt._quantization_config(
                    sparse, [], self.zeros / self.total if self.total else 0.0
                )
                data["transformers_weights"] = _ckpt.LOAD_HINT
            cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            files.append(_ckpt.CONFIG_NAME)
            gen = getattr(self.model, "generation_config", None)
            if gen is not None and hasattr(gen, "save_pretrained"):
                try:
                    gen.save_pretrained(str(self.tmp))
                    files.append("generation_config.json")
                except Exception as exc:  # a model without a valid generation config
                    logger.warning("generation_config not saved: %s", exc)
        src = self.source_dir
        if src is not None and src.is_dir():
            if (src / "modules.json").is_file():
                files += _ckpt._copy_sentence_transformers_files(src, self.tmp)
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, self.tmp / name)
                    files.append(name)
        dtypes = sorted(self.float_dtypes)
        meta = {
            "format": "artemis-sparse-bitmask",
            "format_version": _ckpt.EXPORT_FORMAT_VERSION,
            "library": "transformers" if cfg is not None else "torch",
            "model_class": type(self.model).__name__,
            "dtype": dtypes[0] if dtypes else "float32",
            "quantize": None,
            "sparse_modules": sparse,
            "int8_modules": {},
            "aliases": dict(self.aliases),
            "checksum": _ckpt.CHECKSUM,
            "checksums": dict(self.checksums),
            "files": {
                n: _ckpt._file_checksum(self.tmp / n, _ckpt.CHECKSUM)
                for n in (_ckpt.CONFIG_NAME,)
                if (self.tmp / n).is_file()
            },
        }
        (self.tmp / _ckpt.META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        files.append(_ckpt.META_NAME)
        counted = [f for f in files if not f.endswith("/") and (self.tmp / f).is_file()]
        return {
            "path": str(self.dest),
            "format": "compressed",
            "bytes_on_disk": sum((self.tmp / f).stat().st_size for f in counted),
            "sparse_modules": sparse,
            "int8_modules": [],
            "files": files,
        }
