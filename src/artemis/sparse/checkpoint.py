"""Compressed checkpoints of pruned models: ``save_pruned`` / ``load_pruned``.

A checkpoint is a folder:

* ``config.json`` — the Hugging Face config (absent for a plain ``torch.nn.Module``).
  When any weight is stored sparse or int8 it carries the Artemis marker: a
  ``quantization_config`` with ``quant_method: "artemis"`` (its ``sparsity_config`` has
  compressed-tensors' schema, ``format: "sparse-bitmask"``, and ``format:
  "int-quantized"`` with a channel-wise int8 ``config_groups`` entry for ``quantize="int8"``)
  and a ``transformers_weights`` entry whose text says what the folder is and how to load
  it. Stock transformers ignores an unknown ``quant_method`` with a warning but refuses a
  ``transformers_weights`` that is not a ``.safetensors`` name, so ``from_pretrained``
  without Artemis raises with that text instead of initialising the pruned weights at
  random. ``import artemis`` registers the ``artemis`` quantizer
  (:mod:`artemis.sparse.hf_quantizer`), which decodes the folder inside ``from_pretrained``;
* ``model.safetensors`` — every tensor. A pruned weight ``<module>.weight`` is stored in
  compressed-tensors' ``sparse-bitmask`` layout as ``<module>.compressed`` (the non-zero
  values, row-major), ``<module>.bitmask`` (uint8, one bit per weight, each row packed
  with ``numpy.packbits(..., bitorder="little")``), ``<module>.shape`` (int64) and
  ``<module>.row_offsets`` (int64, index of each row's first value) — the layout
  compressed-tensors' ``BitmaskCompressor`` wrote — when that is smaller than storing it
  dense; an int8 layer adds ``<module>.weight_scale`` (float32, ``(out, 1)``) and its
  values are int8;
* ``artemis_export.json`` — format version, model class, which modules are sparse or
  int8, tied-weight aliases, a checksum of every stored tensor (XXH3-64, named in its
  ``checksum`` key; format 1 folders used CRC-32 and are still read) and, from format 3,
  of every other file ``load_pruned`` reads (``config.json``, in its ``files`` key);
* the tokenizer files, when a tokenizer is passed; ``generation_config.json`` when the
  model has one; a sentence-transformers model's own files (``modules.json``,
  ``config_sentence_transformers.json``, ``sentence_bert_config.json``, ``1_Pooling/``,
  ...) when the source folder has them.

``save_pruned(..., format="dense")`` writes a plain Hugging Face folder instead (the
zeros in place, ``save_pretrained``'s files, no marker) for tools that read only dense
checkpoints (vLLM, llama.cpp's converter, ONNX export).

Every folder is written to a temporary sibling (``.<name>.artemis-tmp-<pid>-<hex>``) and
renamed into place at the end: an error or an interruption leaves no half-written
output, a stale temporary folder of a killed run is removed by the next write to the
same destination, and an existing output is swapped atomically where the OS can
(``renameat2(RENAME_EXCHANGE)`` on Linux), else by two renames.

Why not compressed-tensors' own compressor: version 0.20 removed it (only
``BitmaskConfig`` and the legacy ``pack_bitmasks`` helpers remain, and
``ModelCompressor.update_config`` now writes an empty ``sparsity_config``), and
importing the package takes many seconds. Artemis writes the same documented layout
with the same two numpy calls (``packbits``/``unpackbits``, little bit order, per row);
the tests check the bytes against compressed-tensors' helpers. Folders of format 1 and
2 (``quant_method: "compressed-tensors"``, no marker) are still read by ``load_pruned``.

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

import errno
import json
import logging
import math
import os
import secrets
import shutil
import struct
import sys
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
    "QUANT_METHOD",
    "SAVE_FORMATS",
]

logger = logging.getLogger(__name__)

# 1: CRC-32 checksums (no "checksum" key); 2: XXH3-64; 3: the Artemis marker in config.json
# (quant_method "artemis", transformers_weights) and checksums of config.json ("files")
EXPORT_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
WEIGHTS_NAME = "model.safetensors"
META_NAME = "artemis_export.json"
CONFIG_NAME = "config.json"
#: ``quantization_config.quant_method`` of a compressed folder (the transformers plugin's name)
QUANT_METHOD = "artemis"
#: what ``save_pruned(format=...)`` writes
SAVE_FORMATS = ("compressed", "dense")
# config.json's ``transformers_weights``: stock transformers (no ``import artemis``) raises
# "The transformers file in the config seems to be incorrect: ...: <this text>" at load time
# (it accepts only a *.safetensors name there); the artemis quantizer removes it.
MARKER_PREFIX = "ARTEMIS COMPRESSED CHECKPOINT"
LOAD_HINT = (
    f"{MARKER_PREFIX} (written by artemis.save_pruned: pruned weights stored as sparse-bitmask/int8 tensors, "
    f"config.json quantization_config.quant_method={QUANT_METHOD!r}); stock transformers cannot decode it and "
    "would initialise those weights at random. Load it with artemis.load_pruned(folder), or run `import artemis` "
    "first (it registers the 'artemis' quantizer for AutoModel*.from_pretrained and SentenceTransformer); "
    "artemis.save_pruned(model, folder, format='dense') writes a plain Hugging Face folder"
)
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
    from artemis.core.targets import fused_expert_params, is_prunable_module
    from artemis.sparse.quantization import Int8Linear

    names = {id(m): n for n, m in model.named_modules()}
    out: dict[int, str] = {}
    if manager is not None:
        for p in manager.sparse_params():
            for t in manager.method.targets:
                if t.param is p and id(t.module) in names and t.param_name == "weight":
                    out[id(p)] = names[id(t.module)]
                elif t.param is p and id(t.module) in names and t.experts:  # fused experts: the key
                    out[id(p)] = f"{names[id(t.module)]}.{t.param_name}"
    else:
        for n, m in model.named_modules():
            if is_prunable_module(m) and m.weight.dim() == 2:
                out.setdefault(id(m.weight), n)
            for pn in fused_expert_params(m):
                out.setdefault(id(getattr(m, pn)), f"{n}.{pn}")
    for n, m in model.named_modules():  # an already-int8 layer is always a candidate
        if isinstance(m, Int8Linear):
            out[id(m.weight)] = n
    return out


def _hf_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None and hasattr(cfg, "to_json_string") and hasattr(cfg, "save_pretrained") else None


def _quantization_config(sparse_modules: list[str], int8_modules: list[str], sparsity: float) -> dict[str, Any]:
    """The ``quantization_config`` entry of ``config.json``: compressed-tensors' schema for the
    layout (``sparsity_config``, ``config_groups``) under ``quant_method: "artemis"``."""
    qc: dict[str, Any] = {"quant_method": QUANT_METHOD, "version": f"artemis-export-{EXPORT_FORMAT_VERSION}"}
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


# ------------------------------------------------------- atomic folders
_TMP_TAG = "artemis-tmp"
_OLD_TAG = "artemis-old"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep it
    return True


def _clean_stale(dest: Path) -> None:
    """Remove ``.<name>.artemis-tmp-<pid>-*`` / ``artemis-old`` siblings of ``dest`` left by
    a run that was killed (its process is gone); another live writer's are kept."""
    prefix = f".{dest.name}."
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return
    for p in siblings:
        rest = p.name[len(prefix) :] if p.name.startswith(prefix) else ""
        tag, _, tail = rest.partition("-")
        tag2, _, tail = tail.partition("-")
        if f"{tag}-{tag2}" not in (_TMP_TAG, _OLD_TAG):
            continue
        pid = tail.partition("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and p.is_dir() and not p.is_symlink():
            logger.info("removing %s, left by an interrupted save_pruned", p)
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return rc == 0


def _looks_like_output(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    known = {
        META_NAME,
        CONFIG_NAME,
        WEIGHTS_NAME,
        "model.safetensors.index.json",
        "modules.json",
        "artemis_run.json",
        "tokenizer_config.json",
    }
    return not names or bool(names & known)


@contextmanager
def _atomic_folder(dest: Path) -> Iterator[Path]:
    """Yield a new temporary sibling of ``dest``; on success it replaces ``dest``."""
    if dest.is_symlink():
        dest = dest.resolve()
    if dest.exists():
        if not dest.is_dir():
            raise CheckpointError(f"{dest}: exists and is not a folder")
        if not _looks_like_output(dest):
            raise CheckpointError(
                f"{dest}: the folder exists and holds other files; save_pruned replaces the whole output folder, so "
                f"it only overwrites an empty folder or a model folder (one with {CONFIG_NAME}, {WEIGHTS_NAME} or "
                f"{META_NAME}). Choose a new path or empty it"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dest)
    tmp = dest.parent / f".{dest.name}.{_TMP_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # the process umask applies, as for a plain mkdir
    try:
        yield tmp
        _replace_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(tmp: Path, dest: Path) -> None:
    try:
        os.rename(tmp, dest)  # dest absent or an empty folder: one atomic rename
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) and not isinstance(exc, FileExistsError):
            raise
    if _exchange(tmp, dest):  # dest now holds the new files, tmp the old ones
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = dest.parent / f".{dest.name}.{_OLD_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------- sentence-transformers
def _sentence_transformers_source(model: nn.Module, source_dir: Any) -> Optional[Path]:
    """The folder whose sentence-transformers files are copied: ``source_dir``, else the
    local folder the model was loaded from (``config._name_or_path``) when it has a
    ``modules.json``; ``source_dir=False`` copies none."""
    if source_dir is False:
        return None
    if source_dir is not None:
        src = Path(source_dir)
        if not (src / "modules.json").is_file():
            raise ConfigError(
                f"save_pruned: source_dir {str(src)!r} has no modules.json (not a sentence-transformers folder)"
            )
        return src
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    if isinstance(name, (str, os.PathLike)) and str(name) and os.path.isfile(os.path.join(name, "modules.json")):
        return Path(name)
    return None


def _copy_sentence_transformers_files(src: Path, out: Path) -> list[str]:
    """Copy ``modules.json``, ``config_sentence_transformers.json``, ``sentence_*_config.json``
    and the folders of the modules listed in ``modules.json`` (``1_Pooling/``, ...)."""
    copied: list[str] = []
    try:
        modules = json.loads((src / "modules.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"save_pruned: {src / 'modules.json'} cannot be read ({exc})") from None
    names = ["modules.json", "config_sentence_transformers.json"]
    names += sorted(p.name for p in src.glob("sentence_*_config.json"))
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    root = src.resolve()
    for entry in modules if isinstance(modules, list) else []:
        rel = entry.get("path", "") if isinstance(entry, dict) else ""
        if not rel:
            continue
        folder = (src / rel).resolve()
        if folder.parent != root or not folder.is_dir():  # only first-level module folders
            continue
        shutil.copytree(folder, out / folder.name, dirs_exist_ok=True)
        copied.append(folder.name + "/")
    return copied


def _file_checksum(file: Path, algo: str) -> int:
    """The checksum of a file's bytes (the same function as a uint8 tensor of them)."""
    data = file.read_bytes()
    if algo == "crc32":
        return zlib.crc32(data) if data else 0
    import xxhash

    return xxhash.xxh3_64_intdigest(data) if data else 0


# -------------------------------------------------------- save_pruned
@torch.no_grad()
def save_pruned(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    quantize: Optional[str] = None,
    tokenizer: Any = None,
    manager: Any = None,
    format: str = "compressed",
    source_dir: Union[str, os.PathLike, None, bool] = None,
) -> dict[str, Any]:
    """Write ``model`` to the folder ``path`` with its sparse weights compressed (or dense).

    Args:
        model: a pruned model (Hugging Face or any ``nn.Module``). Its masks should be
            folded (``manager.finalize()``); the weights as they are now are written.
        path: the output folder. It is written to a temporary sibling and renamed into
            place at the end, replacing an existing output as a whole (an empty folder or
            a model folder; a folder with other files is refused).
        quantize: ``None`` (values in their own dtype) or ``"int8"`` (the pruned layers as
            sparsity-keeping symmetric per-channel int8, as :func:`artemis.sparse.quantization.quantize_int8`
            would make them; the model itself is not changed). Compressed format only.
        tokenizer: saved alongside with ``save_pretrained`` when given.
        manager: the :class:`~artemis.core.manager.PruningManager`; default ``model.pruning_manager``
            if set. It decides which weights are candidates for sparse storage (none for a
            structural method, whose smaller model is saved dense); without one, every
            ``Linear``/``Conv1D`` weight is a candidate. A candidate is stored sparse when
            that is smaller than dense (:func:`artemis.core.sizing.stores_sparse`).
        format: ``"compressed"`` (default: the sparse-bitmask / int8 folder that
            :func:`load_pruned`, or transformers after ``import artemis``, reads) or
            ``"dense"`` (a plain Hugging Face folder, zeros in place: ``save_pretrained``'s
            ``model.safetensors`` and ``config.json`` without the Artemis marker, for vLLM,
            llama.cpp's converter, ONNX; a plain ``nn.Module`` gets ``model.safetensors`` only).
        source_dir: a sentence-transformers folder whose module files (``modules.json``,
            ``config_sentence_transformers.json``, ``sentence_*_config.json`` and the module
            folders such as ``1_Pooling/``) are copied, so that ``SentenceTransformer(path)``
            keeps its pooling and normalisation. Default: the folder the model was loaded
            from (``model.config._name_or_path``) when it is a local folder with a
            ``modules.json``; ``False`` copies none.

    Returns:
        ``{"path", "format", "bytes_on_disk", "dense_bytes", "sparse_modules", "int8_modules", "files"}``;
        ``bytes_on_disk`` counts the weights and JSON files (not the tokenizer).

    Raises:
        ConfigError: ``quantize`` is not None or ``"int8"``, ``format`` is unknown,
            ``format="dense"`` with int8 (asked for or already in the model), or ``source_dir``
            has no ``modules.json``.
        CheckpointError: ``path`` exists and is a file or a folder holding other files.
    """
    from artemis.arch import unwrap_model

    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"save_pruned: quantize must be None or 'int8', got {quantize!r}")
    if format not in SAVE_FORMATS:
        raise ConfigError(f"save_pruned: format must be one of {', '.join(map(repr, SAVE_FORMATS))}, got {format!r}")
    model = unwrap_model(model)
    _check_saveable(model, format, quantize)
    st_source = _sentence_transformers_source(model, source_dir)
    with _atomic_folder(Path(os.path.abspath(path))) as tmp:
        if format == "dense":
            info = _write_dense(model, tmp)
        else:
            info = _write_compressed(model, tmp, quantize, manager)
        if st_source is not None:
            info["files"] += _copy_sentence_transformers_files(st_source, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if format == "compressed":
            info["meta"]["files"] = {
                name: _file_checksum(tmp / name, CHECKSUM) for name in (CONFIG_NAME,) if (tmp / name).is_file()
            }
            (tmp / META_NAME).write_text(json.dumps(info["meta"], indent=1, sort_keys=True) + "\n", encoding="utf-8")
            info["files"].append(META_NAME)
        counted = [f for f in info["files"] if not f.endswith("/") and (tmp / f).is_file()]
        bytes_on_disk = sum((tmp / f).stat().st_size for f in counted)
    from artemis.core.sizing import model_dense_bytes

    out = Path(os.path.abspath(path))
    return {
        "path": str(out.resolve() if out.is_symlink() else out),
        "format": format,
        "bytes_on_disk": bytes_on_disk,
        "dense_bytes": model_dense_bytes(model),
        "sparse_modules": info["sparse_modules"],
        "sparse_tensors": info.get("sparse_tensors", []),
        "int8_modules": info["int8_modules"],
        "files": info["files"],
    }


def _check_saveable(model: nn.Module, format: str, quantize: Optional[str]) -> None:
    from artemis.sparse.inference import SparseLinear
    from artemis.sparse.quantization import Int8Linear

    sparse = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    if sparse:
        raise ConfigError(
            f"save_pruned: {sparse[0]!r} is a SparseLinear (an inference-only layer whose weight is not in the state "
            "dict); save the model before sparsify_for_inference, or load it with sparse_backend='dense'"
        )
    if format == "dense":
        if quantize is not None:
            raise ConfigError(
                "save_pruned: format='dense' writes floating-point weights; quantize='int8' needs format='compressed'"
            )
        int8 = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
        if int8:
            raise ConfigError(
                f"save_pruned: format='dense' writes floating-point weights, but {int8[0]!r} is an Int8Linear "
                "(a plain Hugging Face folder has no int8 layout); save it with format='compressed'"
            )


def _write_dense(model: nn.Module, out: Path) -> dict[str, Any]:
    """A plain Hugging Face folder (``save_pretrained``), or ``model.safetensors`` for a torch module."""
    cfg = _hf_config(model)
    if cfg is None or not hasattr(model, "save_pretrained"):
        from safetensors.torch import save_model

        save_model(model, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        return {"files": [WEIGHTS_NAME], "sparse_modules": [], "int8_modules": []}
    model.save_pretrained(str(out))
    cfg_path = out / CONFIG_NAME
    data = json.loads(cfg_path.read_text(encoding="utf-8"))
    qc = data.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") in (QUANT_METHOD, "compressed-tensors"):
        data.pop("quantization_config")  # the weights written are plain dense tensors
    data.pop("transformers_weights", None)
    cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    return {"files": files, "sparse_modules": [], "int8_modules": []}


def _write_compressed(model: nn.Module, out: Path, quantize: Optional[str], manager: Any) -> dict[str, Any]:
    from artemis.core.targets import conv1d_class
    from artemis.sparse.quantization import Int8Linear, default_quant_targets, quantize_weight_int8

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
    sparse_tensors: dict[str, list[int]] = {}  # fused MoE experts: key -> 3-D shape
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
        if id(t) in candidates and t.dim() == 3:  # fused experts: stored as (experts·rows, cols)
            flat = t.detach().cpu().contiguous().reshape(-1, t.shape[-1])
            if store_sparse(name, flat):
                sparse_modules.remove(name)
                sparse_tensors[name] = list(t.shape)
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

    from safetensors.torch import save_file

    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    files = [WEIGHTS_NAME]
    cfg = _hf_config(model)
    if cfg is not None:
        cfg.save_pretrained(str(out))
        cfg_path = out / CONFIG_NAME
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
        data.pop("quantization_config", None)
        data.pop("transformers_weights", None)
        if sparse_modules or int8_modules or sparse_tensors:
            data["quantization_config"] = _quantization_config(
                sorted(sparse_modules) + sorted(sparse_tensors), sorted(int8_modules), zeros / total if total else 0.0
            )
            data["transformers_weights"] = LOAD_HINT
        if isinstance(data.get("moe_sparsity_config"), dict) and "quantization_config" in data:
            # compressed-tensors keeps per-layer expert counts in quantization_config.moe_sparsity_config
            data["quantization_config"]["moe_sparsity_config"] = data["moe_sparsity_config"]
        cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files.append(CONFIG_NAME)
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
        "sparse_tensors": dict(sorted(sparse_tensors.items())),
        "int8_modules": int8_modules,
        "aliases": aliases,
        "checksum": CHECKSUM,
        "checksums": {k: CHECKSUMS[CHECKSUM](v) for k, v in tensors.items()},
    }
    return {
        "files": files,
        "sparse_modules": sorted(sparse_modules),
        "sparse_tensors": sorted(sparse_tensors),
        "int8_modules": sorted(int8_modules),
        "meta": meta,
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


def read_export_meta(root: Path, verify: bool = True) -> tuple[dict, str]:
    """``artemis_export.json`` of the folder ``root`` with its format version checked, and the
    checksum algorithm of its tensors; with ``verify``, also checks every file it lists a
    checksum for (``config.json`` from format 3).

    Raises:
        CheckpointError: a missing or unreadable ``artemis_export.json``, an unknown format
            version or checksum, a listed file that is missing or was changed after saving.
    """
    meta_file = root / META_NAME
    if not meta_file.is_file() and (root / CONFIG_NAME).is_file() and (root / WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"{meta_file}: file is missing; {root} looks like a plain Hugging Face folder (save_pruned(..., "
            "format='dense') writes these): load it with transformers' from_pretrained"
        )
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
    files = meta.get("files", {}) if version >= 3 else {}
    if not isinstance(files, dict):
        raise CheckpointError(f"{meta_file}: 'files' must be an object, got {type(files).__name__}")
    if version >= 3 and meta.get("library") == "transformers" and CONFIG_NAME not in files:
        raise CheckpointError(f"{meta_file}: {CONFIG_NAME} has no checksum (the 'files' entry is incomplete)")
    for name, want in sorted(files.items()):
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"{file}: file is missing; is this a folder written by artemis.save_pruned?")
        if verify:
            got = _file_checksum(file, algo)
            if got != want:
                expected = f"{want:#x}" if isinstance(want, int) else repr(want)
                raise CheckpointError(
                    f"{file}: the file was changed after save_pruned wrote it ({_CHECKSUM_LABEL[algo]} {got:#x}, "
                    f"expected {expected} in {META_NAME}); restore it or save the model again"
                )
    return meta, algo


def _build_hf_model(path: Path, meta: dict) -> nn.Module:
    import transformers
    from transformers import AutoConfig

    _read_json(path / CONFIG_NAME)
    cls = getattr(transformers, meta.get("model_class", ""), None)
    if cls is None:
        raise CheckpointError(
            f"{path / META_NAME}: model_class {meta.get('model_class')!r} is not a transformers class; "
            "pass model= to load_pruned"
        )
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path / CONFIG_NAME}: cannot be read as a transformers config ({exc})") from None
    # our layout is decoded here, not by transformers (format 1/2: compressed-tensors' entry; 3: the marker)
    config.__dict__.pop("quantization_config", None)
    config.__dict__.pop("transformers_weights", None)
    config._name_or_path = str(path)  # save_pruned finds a sentence-transformers folder's files from here
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.modeling_utils import no_init_weights

    dtype = getattr(torch, meta.get("dtype", "float32"), torch.float32)
    with no_init_weights(), _default_dtype(dtype):
        model = cls(config)
    moe = getattr(config, "moe_sparsity_config", None)
    if isinstance(moe, dict) and moe.get("num_experts"):  # per-layer expert counts (expert_pruning)
        from artemis.arch.moe import apply_expert_counts

        try:
            apply_expert_counts(model, moe["num_experts"])
        except Exception as exc:
            raise CheckpointError(f"{path / CONFIG_NAME}: moe_sparsity_config cannot be applied ({exc})") from None
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
        verify: check every tensor's checksum (XXH3-64; CRC-32 in format-1 folders) and,
            from format 3, that of ``config.json``: a corrupted byte or an edited config
            raises instead of loading.
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
    meta, algo = read_export_meta(root, verify)
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
    fused = {k: tuple(int(d) for d in v) for k, v in (meta.get("sparse_tensors") or {}).items()}
    sparse += [k for k in fused if k not in sparse]
    jobs = [
        (mname, {k: stored.pop(f"{mname}.{k}") for k in SPARSE_KEYS if f"{mname}.{k}" in stored}) for mname in sparse
    ]

    def decode(idx: list[int]) -> list[tuple[int, Any]]:
        done: list[tuple[int, Any]] = []
        for i in idx:
            mname, parts = jobs[i]
            try:
                sp = check_parts(parts, mname if mname in fused else f"{mname}.weight", str(wfile))
                out = empty_dense(sp)
                decode_into(sp, out)
                dense = as_dense(sp, out)
                if mname in fused:  # a fused-experts weight stored as (experts·rows, cols)
                    if math.prod(fused[mname]) != dense.numel() or fused[mname][-1] != sp.cols:
                        raise CheckpointError(
                            f"{wfile}: fused experts tensor {mname!r} decodes to {sp.rows}x{sp.cols}, which is not "
                            f"its recorded shape {list(fused[mname])}"
                        )
                    dense = dense.reshape(fused[mname])
            except CheckpointError as exc:
                done.append((i, exc))
                continue
            done.append((i, dense))
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
    state: dict[str, Tensor] = {
        (mname if mname in fused else f"{mname}.weight"): decoded[i] for i, (mname, _) in enumerate(jobs)
    }
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
