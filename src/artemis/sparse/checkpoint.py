"""Compressed checkpoints of pruned models: ``save_pruned`` / ``load_pruned``.

A checkpoint is a folder:

* ``config.json`` — the Hugging Face config (absent for a plain ``torch.nn.Module``),
  with a compressed-tensors ``quantization_config`` entry whose ``sparsity_config`` has
  ``format: "sparse-bitmask"`` when any weight is stored sparse (and ``format:
  "int-quantized"`` with a channel-wise int8 ``config_groups`` entry for ``quantize="int8"``);
* ``model.safetensors`` — every tensor. A pruned weight ``<module>.weight`` is stored in
  compressed-tensors' ``sparse-bitmask`` layout as ``<module>.compressed`` (the non-zero
  values, row-major), ``<module>.bitmask`` (uint8, one bit per weight, each row packed
  with ``numpy.packbits(..., bitorder="little")``), ``<module>.shape`` (int64) and
  ``<module>.row_offsets`` (int64, index of each row's first value) — the layout
  compressed-tensors' ``BitmaskCompressor`` wrote and vLLM / llm-compressor read — when
  that is smaller than storing it dense; an int8 layer adds ``<module>.weight_scale``
  (float32, ``(out, 1)``) and its values are int8;
* ``artemis_export.json`` — format version, model class, which modules are sparse or
  int8, tied-weight aliases and a checksum of every stored tensor (XXH3-64, named in
  its ``checksum`` key; format 1 folders used CRC-32 and are still read);
* the tokenizer files, when a tokenizer is passed; ``generation_config.json`` when the
  model has one.

Why not compressed-tensors' own compressor: version 0.20 removed it (only
``BitmaskConfig`` and the legacy ``pack_bitmasks`` helpers remain, and
``ModelCompressor.update_config`` now writes an empty ``sparsity_config``), and
importing the package takes many seconds. Artemis writes the same documented layout
with the same two numpy calls (``packbits``/``unpackbits``, little bit order, per row);
the tests check the bytes against compressed-tensors' helpers.

The bytes written are the bytes :mod:`artemis.core.sizing` predicts (the manager's
``model_size_reduction``) up to the safetensors header and the JSON files. Zeros come
back as ``+0.0`` (a pruned weight multiplied by its mask can be ``-0.0``; the bitmask
keeps no sign for zeros); every other bit of every tensor is restored exactly.

Example:
    >>> import tempfile, torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    >>> with torch.no_grad():
    ...     net[0].weight[:, :40] = 0
    >>> d = tempfile.mkdtemp()
    >>> info = save_pruned(net, d)
    >>> info["sparse_modules"]
    ['0']
    >>> back = load_pruned(d, model=nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)))
    >>> torch.equal(back[0].weight, net[0].weight)
    True
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from artemis.core.errors import CheckpointError, ConfigError
from artemis.core.sizing import QUANTIZE_CHOICES, stores_sparse, unique_state_tensors
from artemis.sparse.bitmask import (
    SPARSE_KEYS,
    as_dense,
    bitmask_compress,
    bitmask_decompress,
    check_parts,
    decode_into,
    empty_dense,
    nonzero_mask,
)

__all__ = [
    "save_pruned",
    "load_pruned",
    "bitmask_compress",
    "bitmask_decompress",
    "EXPORT_FORMAT_VERSION",
    "WEIGHTS_NAME",
    "META_NAME",
]

logger = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: CRC-32 checksums (no "checksum" key)
WEIGHTS_NAME = "model.safetensors"
META_NAME = "artemis_export.json"
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _raw_bytes(t: Tensor) -> np.ndarray:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def _crc32(t: Tensor) -> int:
    return zlib.crc32(_raw_bytes(t)) if t.numel() else 0


def _xxh3(t: Tensor) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(_raw_bytes(t)) if t.numel() else 0


# checksum of every stored tensor, by the name artemis_export.json gives it. Format 1
# used CRC-32 (zlib); format 2 writes XXH3-64, which is 3x faster to verify (12 GB/s
# against 4 GB/s on the benchmark machine) and is what keeps load_pruned within 2x of a
# dense load. Both are read.
CHECKSUMS: dict[str, Callable[[Tensor], int]] = {"crc32": _crc32, "xxh3_64": _xxh3}
_CHECKSUM_LABEL = {"crc32": "CRC-32", "xxh3_64": "XXH3-64"}
CHECKSUM = "xxh3_64"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# ---------------------------------------------------------------- saving
def _candidate_weights(model: nn.Module, manager: Any) -> tuple[dict[int, str], Optional[bool]]:
    """``id(weight) -> module name`` of the weights that may be stored sparse."""
    from artemis.core.targets import is_prunable_module
    from artemis.sparse.quantization import Int8Linear

    names = {id(m): n for n, m in model.named_modules()}
    out: dict[int, str] = {}
    if manager is not None:
        for p in manager.sparse_params():
            for t in manager.method.targets:
                if t.param is p and id(t.module) in names and t.param_name == "weight":
                    out[id(p)] = names[id(t.module)]
    else:
        for n, m in model.named_modules():
            if is_prunable_module(m) and m.weight.dim() == 2:
                out.setdefault(id(m.weight), n)
    for n, m in model.named_modules():  # an already-int8 layer is always a candidate
        if isinstance(m, Int8Linear):
            out[id(m.weight)] = n
    return out


def _hf_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None and hasattr(cfg, "to_json_string") and hasattr(cfg, "save_pretrained") else None


def _quantization_config(sparse_modules: list[str], int8_modules: list[str], sparsity: float) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` entry of ``config.json``."""
    qc: dict[str, Any] = {"quant_method": "compressed-tensors", "version": "artemis-export-1"}
    if sparse_modules:
        qc["sparsity_config"] = {
            "format": "sparse-bitmask",
            "global_sparsity": sparsity,
            "sparsity_structure": "unstructured",
            "targets": sparse_modules,
            "ignore": [],
        }
    if int8_modules:
        qc.update(
            {
                "format": "int-quantized",
                "quantization_status": "compressed",
                "ignore": [],
                "config_groups": {
                    "group_0": {
                        "targets": int8_modules,
                        "weights": {
                            "num_bits": 8,
                            "type": "int",
                            "symmetric": True,
                            "strategy": "channel",
                            "dynamic": False,
                            "observer": "minmax",
                        },
                        "input_activations": None,
                        "output_activations": None,
                    }
                },
            }
        )
    return qc


@torch.no_grad()
def save_pruned(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    quantize: Optional[str] = None,
    tokenizer: Any = None,
    manager: Any = None,
) -> dict[str, Any]:
    """Write ``model`` to the folder ``path`` with its sparse weights compressed.

    Args:
        model: a pruned model (Hugging Face or any ``nn.Module``). Its masks should be
            folded (``manager.finalize()``); the weights as they are now are written.
        path: the output folder (created; existing files of the same names are replaced).
        quantize: ``None`` (values in their own dtype) or ``"int8"`` (the pruned layers as
            sparsity-keeping symmetric per-channel int8, as :func:`artemis.sparse.quantization.quantize_int8`
            would make them; the model itself is not changed).
        tokenizer: saved alongside with ``save_pretrained`` when given.
        manager: the :class:`~artemis.core.manager.PruningManager`; default ``model.pruning_manager``
            if set. It decides which weights are candidates for sparse storage (none for a
            structural method, whose smaller model is saved dense); without one, every
            ``Linear``/``Conv1D`` weight is a candidate. A candidate is stored sparse when
            that is smaller than dense (:func:`artemis.core.sizing.stores_sparse`).

    Returns:
        ``{"path", "bytes_on_disk", "dense_bytes", "sparse_modules", "int8_modules", "files"}``;
        ``bytes_on_disk`` counts the weights and JSON files (not the tokenizer).

    Raises:
        ConfigError: ``quantize`` is not None or ``"int8"``.
    """
    from artemis.arch import unwrap_model
    from artemis.core.targets import conv1d_class
    from artemis.sparse.quantization import Int8Linear, default_quant_targets, quantize_weight_int8

    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"save_pruned: quantize must be None or 'int8', got {quantize!r}")
    model = unwrap_model(model)
    if manager is None:
        manager = getattr(model, "pruning_manager", None)
    candidates = _candidate_weights(model, manager)
    conv = conv1d_class()
    int8_from_float: dict[int, tuple[str, nn.Module]] = {}
    if quantize == "int8":
        if manager is not None:
            modules = manager._quant_modules()
            mod_names = {id(m): n for n, m in model.named_modules()}
            qnames = [mod_names[id(m)] for m in modules if id(m) in mod_names]
        else:
            qnames = default_quant_targets(model)
        for n in qnames:
            m = model.get_submodule(n)
            if not isinstance(m, Int8Linear):
                int8_from_float[id(m.weight)] = (n, m)

    tensors: dict[str, Tensor] = {}
    stored_as: dict[int, str] = {}
    sparse_modules: list[str] = []
    int8_modules: dict[str, dict[str, Any]] = {}
    zeros = total = 0

    def store_sparse(mname: str, w: Tensor) -> bool:
        """Count ``w``'s zeros; store it in the bitmask layout when that is smaller."""
        nonlocal zeros, total
        mask = nonzero_mask(w)
        nnz = int(np.count_nonzero(mask))
        zeros += w.numel() - nnz
        total += w.numel()
        if not stores_sparse(w, nnz=nnz):
            return False
        for k, v in bitmask_compress(w, mask).items():
            tensors[f"{mname}.{k}"] = v
        sparse_modules.append(mname)
        return True

    for name, t in unique_state_tensors(model):
        stored_as[id(t)] = name
        if id(t) in int8_from_float:
            mname, m = int8_from_float[id(t)]
            transposed = conv is not None and isinstance(m, conv)
            q, s = quantize_weight_int8(t, transposed, m._buffers.get("int8_scale"))
            q, s = q.cpu(), s.cpu()
            if not store_sparse(mname, q):
                tensors[name] = q
            tensors[f"{mname}.weight_scale"] = s[:, None].contiguous()
            bias = getattr(m, "bias", None)
            int8_modules[mname] = {
                "in_features": int(q.shape[1]),
                "out_features": int(q.shape[0]),
                "transposed": transposed,
                "bias": bias is not None,
                "bias_dtype": _dtype_name(bias.dtype if bias is not None else t.dtype),
            }
            continue
        if id(t) in candidates and t.dim() == 2:
            if store_sparse(candidates[id(t)], t.detach().cpu().contiguous()):
                continue
        tensors[name] = t.detach().cpu().contiguous()
    for n, m in model.named_modules():
        if isinstance(m, Int8Linear):
            int8_modules[n] = {
                "in_features": m.in_features,
                "out_features": m.out_features,
                "transposed": False,
                "bias": m.bias is not None,
                "bias_dtype": _dtype_name(m.bias.dtype if m.bias is not None else torch.float32),
            }
    # tied / shared tensors are stored once; the other names are aliases
    aliases: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        target = stored_as.get(id(t))
        if target is not None and target != name:
            aliases[name] = target

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    files = [WEIGHTS_NAME]
    cfg = _hf_config(model)
    if cfg is not None:
        cfg.save_pretrained(str(out))
        cfg_path = out / "config.json"
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
        data.pop("quantization_config", None)
        if sparse_modules or int8_modules:
            data["quantization_config"] = _quantization_config(
                sorted(sparse_modules), sorted(int8_modules), zeros / total if total else 0.0
            )
        cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files.append("config.json")
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            try:
                gen.save_pretrained(str(out))
                files.append("generation_config.json")
            except Exception as exc:  # a model without a valid generation config
                logger.warning("generation_config not saved: %s", exc)
    float_dtypes = sorted({_dtype_name(t.dtype) for _, t in unique_state_tensors(model) if t.is_floating_point()})
    meta = {
        "format": "artemis-sparse-bitmask",
        "format_version": EXPORT_FORMAT_VERSION,
        "library": "transformers" if cfg is not None else "torch",
        "model_class": type(model).__name__,
        "dtype": float_dtypes[0] if len(float_dtypes) == 1 else (float_dtypes or ["float32"])[0],
        "quantize": quantize,
        "sparse_modules": sorted(sparse_modules),
        "int8_modules": int8_modules,
        "aliases": aliases,
        "checksum": CHECKSUM,
        "checksums": {k: CHECKSUMS[CHECKSUM](v) for k, v in tensors.items()},
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    files.append(META_NAME)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    from artemis.core.sizing import model_dense_bytes

    return {
        "path": str(out),
        "bytes_on_disk": sum((out / f).stat().st_size for f in files),
        "dense_bytes": model_dense_bytes(model),
        "sparse_modules": sorted(sparse_modules),
        "int8_modules": sorted(int8_modules),
        "files": files,
    }


# --------------------------------------------------------------- loading
def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: file is missing; is this a folder written by artemis.save_pruned?")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc}); the file is corrupted or truncated") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_safetensors(file: Path) -> dict[str, Any]:
    """Parse the safetensors header; name the tensors a truncated file cuts off."""
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file is missing")
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes; no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated or corrupted: the header claims {n} bytes, the file has {size}")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{file}: corrupted safetensors header (not valid JSON)") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    cut = [k for k, v in header.items() if v.get("data_offsets", [0, 0])[1] > data_size]
    if cut:
        raise CheckpointError(
            f"{file}: truncated: tensor(s) {', '.join(sorted(cut)[:5])} end beyond the end of the file "
            f"({data_size} data bytes present)"
        )
    return header


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build_hf_model(path: Path, meta: dict) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    _read_json(path / "config.json")
    cls = getattr(transformers, meta.get("model_class", ""), None)
    if cls is None:
        raise CheckpointError(
            f"{path / META_NAME}: model_class {meta.get('model_class')!r} is not a transformers class; "
            "pass model= to load_pruned"
        )
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path / 'config.json'}: cannot be read as a transformers config ({exc})") from None
    config.__dict__.pop("quantization_config", None)  # our layout is decoded here, not by transformers
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.modeling_utils import no_init_weights

    dtype = getattr(torch, meta.get("dtype", "float32"), torch.float32)
    with no_init_weights(), _default_dtype(dtype):
        model = cls(config)
    return model


@torch.no_grad()
def load_pruned(
    path: Union[str, os.PathLike],
    *,
    model: Optional[nn.Module] = None,
    device: Optional[Union[str, torch.device]] = None,
    verify: bool = True,
    workers: Optional[int] = None,
) -> nn.Module:
    """Load a folder written by :func:`save_pruned`; the weights are bit-identical to the
    saved ones (zeros as ``+0.0``), int8 layers come back as
    :class:`~artemis.sparse.quantization.Int8Linear`.

    Args:
        path: the folder.
        model: a model of the same architecture to load into (required for a plain
            ``torch.nn.Module`` checkpoint; for a Hugging Face one it is built from
            ``config.json``). Its tensors are replaced, dtypes included.
        device: move the model there after loading.
        verify: check every tensor's checksum (XXH3-64; CRC-32 in format-1 folders): a
            corrupted byte raises instead of loading.
        workers: threads that check and decode tensors in parallel (numpy and zlib release
            the GIL); default ``torch.get_num_threads()``. ``1`` decodes in this thread.

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: a file is missing, truncated or corrupted, a tensor is missing or
            inconsistent (bitmask size, value count, checksum, shape); the message names
            the tensor and the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: folder does not exist")
    meta_file = root / META_NAME
    meta = _read_json(meta_file)
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{meta_file}: format_version {version!r}; this Artemis reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    algo = meta.get("checksum", "crc32") if version >= 2 else "crc32"
    if algo not in CHECKSUMS:
        raise CheckpointError(f"{meta_file}: checksum {algo!r} is unknown; valid: {', '.join(map(repr, CHECKSUMS))}")
    wfile = root / WEIGHTS_NAME
    _check_safetensors(wfile)
    try:
        stored = load_file(str(wfile))
    except SafetensorError as exc:
        raise CheckpointError(f"{wfile}: corrupted safetensors file ({exc})") from None
    checksums = meta.get("checksums", {})
    missing = sorted(set(checksums) - set(stored))
    if missing:
        raise CheckpointError(f"{wfile}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if workers is None:
        workers = torch.get_num_threads()
    if workers < 1:
        raise ValueError(f"load_pruned: workers must be at least 1, got {workers!r}")
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        return _load_into(root, meta, meta_file, wfile, stored, checksums, algo, model, device, verify, pool, workers)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _bins(costs: list[int], n: int) -> list[list[int]]:
    """Indices of ``costs`` in ``n`` lists of about equal total cost (largest first, each
    to the lightest list). Few large tasks: a thread pool pays tens of microseconds of GIL
    hand-over per task, more than checking or decoding a small tensor takes."""
    bins: list[list[int]] = [[] for _ in range(max(1, n))]
    load = [0] * len(bins)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        j = load.index(min(load))
        bins[j].append(i)
        load[j] += costs[i]
    return [b for b in bins if b]


def _load_into(
    root: Path,
    meta: dict,
    meta_file: Path,
    wfile: Path,
    stored: dict[str, Tensor],
    checksums: dict,
    algo: str,
    model: Optional[nn.Module],
    device: Any,
    verify: bool,
    pool: Optional[ThreadPoolExecutor],
    workers: int,
) -> nn.Module:
    from artemis.sparse.quantization import Int8Linear, _set_submodule

    def submit(fn: Callable, *args: Any) -> Callable[[], Any]:
        if pool is None:
            result = fn(*args)
            return lambda: result
        return pool.submit(fn, *args).result

    names = list(stored)
    tensors = [stored[k] for k in names]
    crc_waits = []
    if verify:
        unlisted = [k for k in names if k not in checksums]
        if unlisted:
            raise CheckpointError(f"{wfile}: tensor {unlisted[0]!r} is not listed in {META_NAME}")
        for part in _bins([t.numel() * t.element_size() for t in tensors], 2 * workers):
            crc_waits.append(submit(lambda idx: [(i, CHECKSUMS[algo](tensors[i])) for i in idx], part))
    # the sparse tensors are checked and decoded while the checksums run and the model is built
    sparse = list(dict.fromkeys(meta.get("sparse_modules", [])))
    jobs = [
        (mname, {k: stored.pop(f"{mname}.{k}") for k in SPARSE_KEYS if f"{mname}.{k}" in stored}) for mname in sparse
    ]

    def decode(idx: list[int]) -> list[tuple[int, Any]]:
        done: list[tuple[int, Any]] = []
        for i in idx:
            mname, parts = jobs[i]
            try:
                sp = check_parts(parts, f"{mname}.weight", str(wfile))
                out = empty_dense(sp)
                decode_into(sp, out)
            except CheckpointError as exc:
                done.append((i, exc))
                continue
            done.append((i, as_dense(sp, out)))
        return done

    costs = [int(p["bitmask"].numel()) * 8 if "bitmask" in p else 0 for _, p in jobs]
    decode_waits = [submit(decode, part) for part in _bins(costs, 2 * workers)]
    if model is None:
        if meta.get("library") != "transformers":
            raise CheckpointError(
                f"{meta_file}: saved from a plain torch module ({meta.get('model_class')}); "
                "pass model= (an instance of the same architecture) to load_pruned"
            )
        model = _build_hf_model(root, meta)
    # errors in a fixed order (stored order, then module order), whatever the workers
    crcs = dict(item for wait in crc_waits for item in wait())
    for i, k in enumerate(names):
        got, want = crcs.get(i), checksums.get(k)
        if verify and got != want:
            expected = f"{want:#x}" if isinstance(want, int) else repr(want)
            raise CheckpointError(
                f"{wfile}: tensor {k!r} is corrupted ({_CHECKSUM_LABEL[algo]} {got:#x}, expected {expected})"
            )
    decoded = dict(item for wait in decode_waits for item in wait())
    for i in range(len(jobs)):
        if isinstance(decoded[i], CheckpointError):
            raise decoded[i]
    state: dict[str, Tensor] = {f"{mname}.weight": decoded[i] for i, (mname, _) in enumerate(jobs)}
    state.update(stored)
    for alias, target in meta.get("aliases", {}).items():
        if target not in state:
            raise CheckpointError(f"{wfile}: tensor {target!r} (shared with {alias!r}) is missing")
        state[alias] = state[target]

    # every check runs before the model is touched: a bad checkpoint leaves a passed-in model as it was
    int8_new: dict[str, nn.Module] = {}
    for name, info in meta.get("int8_modules", {}).items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(
                f"{meta_file}: int8 module {name!r} does not exist in {type(model).__name__}"
            ) from None
        int8_new[name] = Int8Linear(
            int(info["in_features"]),
            int(info["out_features"]),
            bool(info["bias"]),
            bias_dtype=getattr(torch, info.get("bias_dtype", "float32")),
            init=False,
        )
    expected = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not any(k.startswith(f"{name}.") for name in int8_new)
    }
    for name, mod in int8_new.items():
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in mod.state_dict().items()})
    for k, v in state.items():
        e = expected.get(k)
        if e is not None and e != tuple(v.shape):
            raise CheckpointError(f"{wfile}: tensor {k!r} has shape {tuple(v.shape)}; the model expects {e}")
    missing_keys = sorted(set(expected) - set(state))
    if missing_keys:
        raise CheckpointError(f"{wfile}: tensor {missing_keys[0]!r} is missing ({len(missing_keys)} missing in all)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{wfile}: tensor {unexpected[0]!r} is not part of {type(model).__name__} ({len(unexpected)} unexpected)"
        )
    for name, mod in int8_new.items():
        _set_submodule(model, name, mod)
    model.load_state_dict(state, strict=True, assign=True)
    tie = getattr(model, "tie_weights", None)
    if meta.get("aliases") and callable(tie):
        tie()
    if device is not None:
        model.to(device)
    return model.eval()
