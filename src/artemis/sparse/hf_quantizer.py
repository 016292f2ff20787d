"""Stock transformers loading of ``save_pruned`` folders: the ``artemis`` quantizer plugin.

A compressed folder's ``config.json`` has ``quantization_config.quant_method: "artemis"``.
``import artemis`` calls :func:`install`, which registers, through transformers' own
plugin API (``transformers.quantizers.auto.register_quantization_config`` and
``register_quantizer``), a config class and an ``HfQuantizer`` for that name. Then
``AutoModel*.from_pretrained(folder)`` and ``SentenceTransformer(folder)`` load the
folder with the same weights as :func:`artemis.load_pruned`:

* the quantizer checks ``artemis_export.json`` (format version, the checksum of
  ``config.json`` and, unless ``verify=False``, of every stored tensor) before any weight
  is loaded, and raises :class:`~artemis.core.errors.CheckpointError` naming the file;
* int8 layers become :class:`~artemis.sparse.quantization.Int8Linear` before loading;
* a weight converter (transformers' ``WeightConverter``) gathers each pruned layer's
  ``compressed``/``bitmask``/``shape``/``row_offsets`` tensors and decodes them with the
  checkpoint's codec into ``<module>.weight`` — bit for bit what ``load_pruned`` gives;
* afterwards, the layers stay dense ``nn.Linear`` (``sparse_backend="dense"``, the
  default; the model is then a plain model: its quantization config is removed and
  ``save_pretrained`` writes an ordinary dense folder), or are replaced by
  :class:`~artemis.sparse.inference.SparseLinear` (``"csr"``, ``"bitmask"``, or ``"auto"``:
  ``bitmask`` where its compiled kernel runs, else ``csr``; float32 values).

Choose the layers with the ``ARTEMIS_SPARSE_BACKEND`` environment variable or per call::

    from artemis.sparse.hf_quantizer import ArtemisQuantizationConfig
    AutoModel.from_pretrained(folder, quantization_config=ArtemisQuantizationConfig(sparse_backend="csr"))
    SentenceTransformer(folder, model_kwargs={"quantization_config": ArtemisQuantizationConfig(verify=False)})

(the call's value wins over the environment variable).

Importing transformers takes seconds, so :func:`install` does not: if
``transformers.quantizers.auto`` is not imported yet, it puts a finder on ``sys.meta_path``
that registers the classes right after that module is first executed (which
``from_pretrained`` always does first).

Without ``import artemis``, stock transformers ignores the unknown ``quant_method`` with a
warning, but the folder's ``config.json`` also holds ``transformers_weights`` (a text,
not a ``*.safetensors`` name) which makes ``from_pretrained`` raise a ``ValueError`` quoting
that text: what the folder is and how to load it. The quantizer removes that entry from
the loaded config before transformers looks for the weights.

Example:
    >>> import tempfile, torch
    >>> from transformers import AutoModel, BertConfig, BertModel
    >>> import artemis
    >>> _ = torch.manual_seed(0)
    >>> bert = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
    ...                             num_attention_heads=2, intermediate_size=32))
    >>> dense = bert.encoder.layer[0].intermediate.dense
    >>> with torch.no_grad():
    ...     dense.weight[:, :12] = 0
    >>> folder = tempfile.mkdtemp()
    >>> "encoder.layer.0.intermediate.dense" in artemis.save_pruned(bert, folder)["sparse_modules"]
    True
    >>> back = AutoModel.from_pretrained(folder)  # the artemis quantizer decodes it
    >>> torch.equal(back.encoder.layer[0].intermediate.dense.weight, dense.weight)
    True
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from artemis import _transformers_hook
from artemis.core.errors import CheckpointError
from artemis.sparse.checkpoint import MARKER_PREFIX, QUANT_METHOD

__all__ = [
    "install",
    "register",
    "SPARSE_BACKENDS",
    "ENV_SPARSE_BACKEND",
    "ArtemisQuantizationConfig",  # noqa: F822 - built on first access (module __getattr__: imports transformers)
    "ArtemisHfQuantizer",  # noqa: F822
]

logger = logging.getLogger(__name__)

#: values of ``sparse_backend`` (``ArtemisQuantizationConfig`` / ``ARTEMIS_SPARSE_BACKEND``)
SPARSE_BACKENDS = ("dense", "csr", "bitmask", "auto")
ENV_SPARSE_BACKEND = "ARTEMIS_SPARSE_BACKEND"
_PARTS = ("compressed", "bitmask", "shape", "row_offsets")
_lock = threading.RLock()
_classes: dict[str, Any] = {}


# ------------------------------------------------------------------ install
def install() -> None:
    """Register the ``artemis`` quantizer now if transformers' quantizer registry is
    imported, else as soon as it is (``import artemis`` does this through
    :mod:`artemis._transformers_hook`; cheap, idempotent)."""
    _transformers_hook.install()


def register() -> Any:
    """Register the config class and the quantizer with transformers (idempotent);
    returns the quantizer class."""
    if "quantizer" in _classes:
        return _classes["quantizer"]
    # imported outside the lock: this import may run the post-import hook, which calls
    # register() again (in this thread, or in another that holds the import lock)
    from transformers.quantizers import auto

    with _lock:
        if "quantizer" in _classes:  # the hook, or another thread, registered meanwhile
            return _classes["quantizer"]
        config_cls, quantizer_cls = _build_classes()
        have_cfg = auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD)
        have_q = auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
        if have_cfg is not None or have_q is not None:  # someone else's, or ours from a reloaded module
            logger.warning("artemis: replacing the quantizer already registered as %r (%s)", QUANT_METHOD, have_q)
            auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
            auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
        auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
        # from_pretrained(quantization_config=ArtemisQuantizationConfig(...)) passes its loading
        # options (sparse_backend, verify) only for the config types listed here
        types = getattr(auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
        if isinstance(types, tuple) and config_cls not in types:
            auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*types, config_cls)
        _classes.update(config=config_cls, quantizer=quantizer_cls)
    _transformers_hook.uninstall()  # after the lock: install() holds the hook's lock while it registers
    return quantizer_cls


def __getattr__(name: str) -> Any:
    if name in ("ArtemisQuantizationConfig", "ArtemisHfQuantizer"):
        register()
        return _classes["config" if name == "ArtemisQuantizationConfig" else "quantizer"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_backend(value: Any, where: str) -> Optional[str]:
    if value is None or value in SPARSE_BACKENDS:
        return value
    raise ValueError(f"{where}: sparse_backend must be one of {', '.join(map(repr, SPARSE_BACKENDS))}, got {value!r}")


# ------------------------------------------------------------------ classes
def _build_classes() -> tuple[type, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class ArtemisQuantizationConfig(QuantizationConfigMixin):
        """``quantization_config`` of a ``save_pruned`` folder (``quant_method: "artemis"``).

        Args:
            sparse_backend: ``"dense"`` (pruned layers decoded to ``nn.Linear``, the
                default), ``"csr"``, ``"bitmask"`` or ``"auto"`` (kept sparse as
                ``SparseLinear``); ``None``: the ``ARTEMIS_SPARSE_BACKEND`` environment
                variable, else ``"dense"``.
            verify: check the checksum of every stored tensor before loading (the
                checksum of ``config.json`` is always checked).
            **kwargs: the entries ``save_pruned`` wrote (``sparsity_config``,
                ``config_groups``, ...), kept as they are.
        """

        _loading_keys = ("sparse_backend", "verify", "dequantize")

        def __init__(self, sparse_backend: Optional[str] = None, verify: bool = True, **kwargs: Any) -> None:
            kwargs.pop("quant_method", None)
            for k, v in kwargs.items():
                setattr(self, k, v)
            self.quant_method = QUANT_METHOD
            self.sparse_backend = _check_backend(sparse_backend, "ArtemisQuantizationConfig")
            self.verify = bool(verify)

        def get_loading_attributes(self) -> dict[str, Any]:
            return {"sparse_backend": self.sparse_backend, "verify": self.verify}

        def to_dict(self) -> dict[str, Any]:
            d = super().to_dict()
            for k in self._loading_keys:  # how it was loaded is not part of the checkpoint
                d.pop(k, None)
            return d

    class ArtemisHfQuantizer(HfQuantizer):
        """Loads a ``save_pruned`` folder inside ``from_pretrained`` (see the module docs)."""

        requires_calibration = True  # reads pre-compressed folders only; save_pruned writes them

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.root: Optional[Path] = None
            self.meta: dict = {}
            self.sparse_modules: list[str] = []
            self.int8_modules: list[str] = []

        # -- before the model is built
        def update_attn_implementation(self, config: Any) -> Any:
            # the marker that makes stock transformers refuse the folder; we read it ourselves
            marker = getattr(config, "transformers_weights", None)
            if isinstance(marker, str) and marker.startswith(MARKER_PREFIX):
                config.__dict__.pop("transformers_weights", None)
            return super().update_attn_implementation(config)

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("artemis: a save_pruned folder cannot be loaded with disk offloading")

        def backend(self) -> str:
            value = getattr(self.quantization_config, "sparse_backend", None)
            if value is None:
                value = _check_backend(os.environ.get(ENV_SPARSE_BACKEND) or None, ENV_SPARSE_BACKEND)
            return value or "dense"

        # -- the model skeleton exists (meta device), no weight loaded yet
        def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            from artemis.sparse.checkpoint import WEIGHTS_NAME, read_export_meta
            from artemis.sparse.quantization import Int8Linear, _set_submodule

            files = kwargs.get("checkpoint_files") or []
            if not files:
                raise CheckpointError("artemis: from_pretrained found no weights file for this folder")
            root = Path(files[0]).parent
            if len(files) != 1 or Path(files[0]).name != WEIGHTS_NAME:
                raise CheckpointError(f"{root}: a save_pruned folder has one {WEIGHTS_NAME}; found {files}")
            self.root = root
            backend = self.backend()
            verify = bool(getattr(self.quantization_config, "verify", True))
            self.meta, algo = read_export_meta(root, verify=True)  # config.json always, tensors if verify
            if verify:
                _verify_tensors(root / WEIGHTS_NAME, self.meta, algo)
            if self.meta.get("sparse_tensors"):
                raise CheckpointError(
                    f"{root}: this folder stores fused Mixture-of-Experts weights in the bitmask layout "
                    f"(for example {next(iter(self.meta['sparse_tensors']))!r}), which from_pretrained cannot decode "
                    "yet; load it with artemis.load_pruned(folder), or save with save_pruned(..., format='dense')"
                )
            names = dict(model.named_modules())
            prefix = getattr(model, "base_model_prefix", "") or ""

            def resolve(name: str) -> Optional[str]:
                """The saved model's module name in the model being loaded (``AutoModel`` on
                a ``...ForCausalLM`` folder drops the ``base_model_prefix``)."""
                if name in names:
                    return name
                if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in names:
                    return name[len(prefix) + 1 :]
                if prefix and f"{prefix}.{name}" in names:
                    return f"{prefix}.{name}"
                return None

            self.int8_modules = []
            for saved, info in self.meta.get("int8_modules", {}).items():
                name = resolve(saved)
                if name is None:
                    continue  # not part of this class (e.g. a head AutoModel leaves out)
                _set_submodule(
                    model,
                    name,
                    Int8Linear(
                        int(info["in_features"]),
                        int(info["out_features"]),
                        bool(info["bias"]),
                        bias_dtype=getattr(torch, info.get("bias_dtype", "float32")),
                        device=torch.device("meta"),
                        init=False,
                    ),
                )
                self.int8_modules.append(name)
            self.sparse_modules = [n for n in (resolve(s) for s in self.meta.get("sparse_modules", [])) if n]
            # dense layers and no int8: the loaded model is a plain model (config entry removed)
            self.quantization_config.dequantize = backend == "dense" and not self.int8_modules
            return model

        def get_weight_conversions(self) -> list:
            from transformers.core_model_loading import WeightConverter

            sources = [rf"^(.+)\.{part}$" for part in _PARTS]
            return [WeightConverter(sources, r"\1.weight", [_decode_op(self)], force_cpu=True)]

        # -- every weight loaded
        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
            backend = self.backend()
            if backend != "dense":
                _to_sparse_linear(model, [n for n in self.sparse_modules if n not in self.int8_modules], backend)
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            logger.warning(
                "this model was loaded from a save_pruned folder with int8 or SparseLinear layers: save it with "
                "artemis.save_pruned(model, folder) (format='dense' for a plain Hugging Face folder)"
            )
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    ArtemisQuantizationConfig.__module__ = ArtemisHfQuantizer.__module__ = __name__
    ArtemisQuantizationConfig.__qualname__ = "ArtemisQuantizationConfig"
    ArtemisHfQuantizer.__qualname__ = "ArtemisHfQuantizer"
    return ArtemisQuantizationConfig, ArtemisHfQuantizer


def _decode_op(quantizer: Any) -> Any:
    """The conversion op (built once; transformers deep-copies converters per layer, the op
    returns itself from ``__deepcopy__``)."""
    cls = _classes.get("op")
    if cls is None:
        from transformers.core_model_loading import ConversionOps

        class ArtemisBitmaskDecode(ConversionOps):
            """``{compressed, bitmask, shape, row_offsets}`` of one layer -> its dense weight."""

            def __init__(self, hf_quantizer: Any) -> None:
                # transformers casts nothing on its way to an op that has `hf_quantizer`
                self.hf_quantizer = hf_quantizer

            def __deepcopy__(self, memo: dict) -> "ArtemisBitmaskDecode":
                return self

            def convert(self, input_dict: dict[str, Any], source_patterns: Any = None, **kwargs: Any) -> dict:
                from artemis.sparse.bitmask import bitmask_decompress
                from artemis.sparse.checkpoint import WEIGHTS_NAME

                name = kwargs.get("full_layer_name") or "weight"
                parts = {}
                for pattern, tensors in input_dict.items():
                    part = next((p for p in _PARTS if pattern.endswith(rf"\.{p}$")), None)
                    if part is not None and tensors:
                        parts[part] = (tensors[0] if isinstance(tensors, list) else tensors).cpu()
                root = self.hf_quantizer.root
                w = bitmask_decompress(parts, name=name, file=str(root / WEIGHTS_NAME) if root else WEIGHTS_NAME)
                target = _target_tensor(kwargs.get("model"), name)
                if target is not None and w.is_floating_point() and target.dtype != w.dtype:
                    w = w.to(target.dtype)  # only when from_pretrained was asked for another dtype
                return {name: w}

            @property
            def reverse_op(self) -> Any:
                raise NotImplementedError("artemis: save with artemis.save_pruned")

        cls = _classes["op"] = ArtemisBitmaskDecode
    return cls(quantizer)


def _target_tensor(model: Any, name: str) -> Optional[torch.Tensor]:
    if model is None:
        return None
    mod_name, _, attr = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    t = getattr(mod, attr, None)
    return t if isinstance(t, torch.Tensor) else None


def _verify_tensors(wfile: Path, meta: dict, algo: str) -> None:
    """Every tensor of ``wfile`` against the checksums of ``artemis_export.json``."""
    from safetensors import SafetensorError, safe_open

    from artemis.sparse.checkpoint import _CHECKSUM_LABEL, CHECKSUMS, META_NAME, _check_safetensors

    header = _check_safetensors(wfile)
    checksums = meta.get("checksums", {})
    missing = sorted(set(checksums) - set(header))
    if missing:
        raise CheckpointError(f"{wfile}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    unlisted = sorted(set(header) - set(checksums))
    if unlisted:
        raise CheckpointError(f"{wfile}: tensor {unlisted[0]!r} is not listed in {META_NAME}")
    try:
        with safe_open(str(wfile), framework="pt") as f:
            for k in f.keys():
                got, want = CHECKSUMS[algo](f.get_tensor(k)), checksums[k]
                if got != want:
                    expected = f"{want:#x}" if isinstance(want, int) else repr(want)
                    raise CheckpointError(
                        f"{wfile}: tensor {k!r} is corrupted ({_CHECKSUM_LABEL[algo]} {got:#x}, expected {expected})"
                    )
    except SafetensorError as exc:
        raise CheckpointError(f"{wfile}: corrupted safetensors file ({exc})") from None


def _to_sparse_linear(model: nn.Module, names: list[str], backend: str) -> None:
    from artemis.core.targets import conv1d_class
    from artemis.sparse import kernels
    from artemis.sparse.inference import SparseLinear
    from artemis.sparse.quantization import _set_submodule

    if backend == "auto":
        backend = "bitmask" if kernels.matvec_ready() else "csr"
    conv = conv1d_class()
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            w = m.weight.detach()
        elif conv is not None and isinstance(m, conv):
            w = m.weight.detach().t()
        else:
            continue
        if w.dtype != torch.float32 and not (backend == "csr" and w.dtype == torch.float64):
            w = w.float()  # SparseLinear's CPU kernels take float32 values (exact for bf16/fp16)
        _set_submodule(model, name, SparseLinear(w.contiguous(), m.bias, backend))
