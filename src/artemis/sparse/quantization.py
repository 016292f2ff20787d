"""8-bit quantization that keeps sparsity: scales, fake quantization, int8 layers, 8-bit loading.

Scheme: symmetric int8 per output channel, ``q = clamp(round(w / s), -127, 127)`` with
``s = max|w_row| / 127`` computed from the kept weights (pruned weights are exactly 0
and never set the maximum). Zero maps to zero, so a pruned weight stays pruned.
Artemis adds one rule so that the *sparsity pattern* survives too: a kept weight whose
value would round to 0 (``|w| < s/2``) is stored as ``±1`` instead, so the int8 tensor
has exactly the zeros of the pruned weight and the bitmask of the pruned model is the
bitmask of the int8 model (plain round-to-nearest, as in ``torch.ao`` or bitsandbytes,
adds zeros and so changes the mask). The extra error on such a weight is at most ``s``.

Pieces:

* :func:`int8_channel_scales`, :func:`quantize_weight_int8`, :func:`fake_quantize_int8` —
  pure tensor functions.
* :func:`enable_fake_quant` — quantization-aware training: the listed ``Linear``/``Conv1D``
  layers run their forward with fake-quantized weights (straight-through gradients);
  the manager turns it on from ``pruning_end`` when ``quantization_aware: true`` and
  :meth:`FakeQuantHandle.remove` (called by ``finalize()``) turns it off.
* :func:`quantize_int8` — replaces layers by :class:`Int8Linear` (int8 weight + scales).
* :func:`load_in_8bit` — load a Hugging Face model in 8-bit with bitsandbytes (CUDA only).

Kernels (which runs where): :class:`Int8Linear` calls ``torch._weight_int8pack_mm``,
PyTorch's own int8 weight-only matmul (the kernel torchao's int8 weight-only path
dispatches to), on CPU (float32/bfloat16/float16 inputs) and on CUDA where the
installed PyTorch supports the input dtype, for inputs of at most
``INT8_KERNEL_MAX_ROWS`` rows (token-by-token decoding, where it wins); for larger
inputs (prefill, batches), and anywhere the kernel is unavailable (another device or
dtype, or a shape it rejects), the layer dequantizes its weight to a temporary and
calls ``F.linear``. ``Int8Linear.backend`` records which one ran.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 1.27, -0.001], [0.0, 0.0, 0.0]])
    >>> q, s = quantize_weight_int8(w)
    >>> q.tolist(), s.tolist()
    ([[0, 127, -1], [0, 0, 0]], [0.009999999776482582, 1.0])
"""

from __future__ import annotations

import logging
import types
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from artemis.core.errors import ModelError
from artemis.core.targets import conv1d_class, find_targets, is_prunable_module

__all__ = [
    "int8_channel_scales",
    "quantize_weight_int8",
    "dequantize_int8",
    "fake_quantize_int8",
    "prepare_model_for_quantization",
    "FakeQuantHandle",
    "enable_fake_quant",
    "Int8Linear",
    "quantize_int8",
    "default_quant_targets",
    "load_in_8bit",
    "INT8_KERNEL_MAX_ROWS",
]

logger = logging.getLogger(__name__)

QMAX = 127
#: ``Int8Linear`` calls the int8 kernel for at most this many input rows (tokens); above it,
#: the CPU kernel is slower than dequantizing the weight and calling ``F.linear`` (measured:
#: 29x slower at 2048 rows of a 384->1536 layer, faster at 1-16 rows).
INT8_KERNEL_MAX_ROWS = 32


def int8_channel_scales(weight: Tensor, transposed: bool = False) -> Tensor:
    """Symmetric int8 scale of each output channel: ``max|w| / 127`` (1 where a row is all zero).

    Args:
        weight: ``(out, in)`` weight, or ``(in, out)`` when ``transposed`` (HF ``Conv1D``).
        transposed: the weight is stored ``(in, out)``.

    Returns:
        float32 tensor of ``out`` scales.

    Example:
        >>> import torch
        >>> int8_channel_scales(torch.tensor([[0.0, -2.54], [0.0, 0.0]])).tolist()
        [0.019999999552965164, 1.0]
    """
    w = weight.detach().to(torch.float32)
    if transposed:
        w = w.t()
    amax = w.abs().amax(dim=1)
    return torch.where(amax > 0, amax / float(QMAX), torch.ones_like(amax))


def _quantize_rows(w: Tensor, scale: Tensor) -> Tensor:
    """int8 values of float32 ``w`` (out, in) with ``scale`` (out,), zeros exactly kept."""
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX)
    # a kept weight never rounds to zero: the sparsity pattern stays exactly the same
    q = torch.where((q == 0) & (w != 0), torch.sign(w), q)
    return q


@torch.no_grad()
def quantize_weight_int8(
    weight: Tensor, transposed: bool = False, scale: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Quantize a weight to int8, symmetric per output channel, keeping its exact zeros.

    Args:
        weight: ``(out, in)`` weight (``(in, out)`` when ``transposed``).
        transposed: the weight is a HF ``Conv1D`` weight stored ``(in, out)``.
        scale: the ``out`` scales to use (default :func:`int8_channel_scales`).

    Returns:
        ``(q, scale)``: int8 values shaped ``(out, in)`` (always the ``Linear`` layout) and
        float32 scales ``(out,)``; ``q == 0`` exactly where ``weight == 0``.

    Example:
        >>> import torch
        >>> q, s = quantize_weight_int8(torch.tensor([[0.5, 0.0], [0.0, -0.25]]))
        >>> q.tolist()
        [[127, 0], [0, -127]]
    """
    w = weight.detach().to(torch.float32)
    if transposed:
        w = w.t()
    if scale is None:
        scale = int8_channel_scales(w)
    scale = scale.to(device=w.device, dtype=torch.float32)
    return _quantize_rows(w, scale).to(torch.int8).contiguous(), scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q · scale`` per row, in ``dtype`` (the inverse of :func:`quantize_weight_int8`).

    Example:
        >>> import torch
        >>> dequantize_int8(torch.tensor([[127, 0]], dtype=torch.int8), torch.tensor([0.01])).tolist()
        [[1.2699999809265137, 0.0]]
    """
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake int8 quantization with a straight-through gradient (identity)."""

    @staticmethod
    def forward(ctx, w: Tensor, transposed: bool) -> Tensor:  # type: ignore[override]
        w32 = w.detach().to(torch.float32)
        rows = w32.t() if transposed else w32
        scale = int8_channel_scales(rows)
        dq = _quantize_rows(rows, scale) * scale[:, None]
        if transposed:
            dq = dq.t()
        return dq.to(w.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


def fake_quantize_int8(weight: Tensor, transposed: bool = False) -> Tensor:
    """The weight as its int8 round trip (same dtype and shape), with a straight-through
    gradient: the forward sees quantization noise, the backward passes gradients unchanged.

    Example:
        >>> import torch
        >>> w = torch.tensor([[1.0, 0.0, 0.3333]], requires_grad=True)
        >>> y = fake_quantize_int8(w); y.sum().backward()
        >>> [round(v, 4) for v in y.tolist()[0]], w.grad.tolist()
        ([1.0, 0.0, 0.3307], [[1.0, 1.0, 1.0]])
    """
    return _FakeQuantSTE.apply(weight, transposed)


@torch.no_grad()
def prepare_model_for_quantization(model: nn.Module, modules: Optional[Iterable[nn.Module]] = None) -> nn.Module:
    """Attach per-channel int8 scales (non-persistent buffer ``int8_scale``) and return the model.

    Args:
        model: the model (masks already folded into its weights).
        modules: the layers to prepare (default: every ``Linear``/``Conv1D``).

    Returns:
        ``model``; each prepared layer has ``int8_scale`` computed from its current
        (kept) weights; :func:`quantize_int8` converts exactly the prepared layers.
    """
    conv = conv1d_class()
    chosen = list(modules) if modules is not None else [m for m in model.modules() if is_prunable_module(m)]
    for module in chosen:
        transposed = conv is not None and isinstance(module, conv)
        scale = int8_channel_scales(module.weight, transposed)
        if "int8_scale" in module._buffers:
            module.int8_scale = scale
        else:
            module.register_buffer("int8_scale", scale, persistent=False)
    return model


# ------------------------------------------------------------- fake quant (QAT)
def _qat_forward(self: nn.Module, x: Tensor) -> Tensor:
    conv = conv1d_class()
    if conv is not None and isinstance(self, conv):
        w = fake_quantize_int8(self.weight, True)
        size_out = x.size()[:-1] + (self.nf,)
        y = torch.addmm(self.bias, x.view(-1, x.size(-1)), w)
        return y.view(size_out)
    return F.linear(x, fake_quantize_int8(self.weight, False), self.bias)


class FakeQuantHandle:
    """Returned by :func:`enable_fake_quant`; :meth:`remove` restores the layers' own forward."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    @property
    def active(self) -> bool:
        return bool(self.modules)

    def remove(self) -> None:
        """Restore every layer's own ``forward`` (idempotent)."""
        for m in self.modules:
            if "forward" in m.__dict__:
                del m.forward
        self.modules = []


def enable_fake_quant(modules: Sequence[nn.Module]) -> FakeQuantHandle:
    """Run each ``Linear``/``Conv1D`` in ``modules`` with fake-quantized int8 weights.

    The layer's parameters, state-dict keys and hooks are untouched; only its forward
    computes ``fake_quantize_int8(weight)`` first. Cost per layer and forward: about five
    element-wise passes over the weight, and one extra weight-sized tensor kept for the
    backward (the fake-quantized weight).

    Args:
        modules: the layers (``nn.Linear`` or HF ``Conv1D``, not subclasses with their own forward).

    Returns:
        A :class:`FakeQuantHandle`; call ``remove()`` to stop.

    Raises:
        ModelError: a module is not a plain ``Linear``/``Conv1D``.

    Example:
        >>> import torch, torch.nn as nn
        >>> lin = nn.Linear(4, 2)
        >>> h = enable_fake_quant([lin]); y = lin(torch.ones(1, 4)); h.remove()
        >>> "forward" in lin.__dict__
        False
    """
    conv = conv1d_class()
    mods = list(modules)
    for m in mods:
        plain = type(m) is nn.Linear or (conv is not None and type(m) is conv)
        if not plain:
            raise ModelError(
                f"quantization_aware: cannot fake-quantize a {type(m).__name__}; only torch.nn.Linear "
                "and transformers Conv1D layers are supported (is the model already quantized?)"
            )
    for m in mods:
        m.forward = types.MethodType(_qat_forward, m)
    return FakeQuantHandle(mods)


# ------------------------------------------------------------------ int8 layer
class Int8Linear(nn.Module):
    """A linear layer with an int8 weight (``(out, in)``, exact zeros of the pruned weight)
    and float32 per-output-channel scales; ``y = x · (q · s)ᵀ + b``.

    State-dict names follow compressed-tensors' int-quantized layout: ``weight`` (int8),
    ``weight_scale`` (``(out, 1)`` float32) and ``bias``.

    Attributes:
        backend: what ran the last forward: ``"aten._weight_int8pack_mm"`` or
            ``"dequantize+F.linear"``.

    Example:
        >>> import torch, torch.nn as nn
        >>> lin = nn.Linear(8, 4)
        >>> q = Int8Linear.from_float(lin)
        >>> q.weight.dtype, tuple(q.weight_scale.shape), q(torch.ones(2, 8)).shape
        (torch.int8, (4, 1), torch.Size([2, 4]))
    """

    _unsupported: set = set()

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bias_dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        new = torch.zeros if init else torch.empty  # init=False: the loader fills every tensor
        self.register_buffer("weight", new(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(new(out_features, dtype=bias_dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.backend = ""

    @classmethod
    @torch.no_grad()
    def from_float(cls, module: nn.Module, scale: Optional[Tensor] = None) -> "Int8Linear":
        """Convert an ``nn.Linear`` or HF ``Conv1D`` (weights already pruned)."""
        conv = conv1d_class()
        transposed = conv is not None and isinstance(module, conv)
        w = module.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        bias = getattr(module, "bias", None)
        new = cls(
            in_f, out_f, bias is not None, bias_dtype=bias.dtype if bias is not None else w.dtype, device=w.device
        )
        q, s = quantize_weight_int8(w, transposed, scale)
        new.weight.copy_(q)
        new.weight_scale.copy_(s[:, None])
        if bias is not None:
            new.bias.data = bias.detach().clone()
        return new

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        key = (x.device.type, x.dtype)
        y = None
        if (
            x2.shape[0] <= INT8_KERNEL_MAX_ROWS
            and key not in Int8Linear._unsupported
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        ):
            try:
                y = torch._weight_int8pack_mm(x2, self.weight, self.weight_scale.view(-1).to(x.dtype))
                self.backend = "aten._weight_int8pack_mm"
            except (RuntimeError, NotImplementedError) as exc:
                Int8Linear._unsupported.add(key)
                logger.info("torch._weight_int8pack_mm unavailable for %s/%s (%s); dequantizing instead", *key, exc)
        if y is None:
            y = F.linear(x2, dequantize_int8(self.weight, self.weight_scale.view(-1), x.dtype))
            self.backend = "dequantize+F.linear"
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight ``q · s`` (``(out, in)``)."""
        return dequantize_int8(self.weight, self.weight_scale.view(-1), dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def default_quant_targets(model: nn.Module) -> list[str]:
    """Module names :func:`quantize_int8` converts by default: the layers prepared by
    ``prepare_for_quantization`` if any, else the default pruning targets (every
    ``Linear``/``Conv1D`` inside the transformer blocks)."""
    prepared = [n for n, m in model.named_modules() if is_prunable_module(m) and "int8_scale" in m._buffers]
    if prepared:
        return prepared
    from artemis.arch import get_adapter

    adapter = get_adapter(model)
    targets = find_targets(model, block_prefixes=adapter.block_prefixes() if adapter.blocks is not None else None)
    return [t.name for t in targets]


@torch.no_grad()
def quantize_int8(model: nn.Module, modules: Optional[Sequence[str]] = None) -> nn.Module:
    """Replace layers of ``model`` (in place) by :class:`Int8Linear` with the exact
    sparsity pattern of their weights.

    Args:
        model: a pruned model (masks folded: call ``manager.finalize()`` or
            ``prepare_for_quantization()`` first).
        modules: module names to convert; default: the layers that
            ``prepare_for_quantization()`` prepared, else every ``Linear``/``Conv1D`` inside
            the transformer blocks (embeddings and ``lm_head`` stay in floating point).

    Returns:
        ``model``.

    Raises:
        ModelError: a name is not a ``Linear``/``Conv1D`` of the model (nothing is changed).

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = quantize_int8(net, ["0"])
        >>> type(net[0]).__name__, type(net[2]).__name__
        ('Int8Linear', 'Linear')
    """
    names = list(modules) if modules is not None else default_quant_targets(model)
    converted: list[tuple[str, nn.Module]] = []
    for name in names:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"quantize_int8: module {name!r} does not exist in {type(model).__name__}") from None
        if not is_prunable_module(m):
            raise ModelError(
                f"quantize_int8: module {name!r} is a {type(m).__name__}; only nn.Linear and Conv1D can be quantized"
            )
        scale = m._buffers.get("int8_scale")
        converted.append((name, Int8Linear.from_float(m, scale)))
    for name, new in converted:  # everything computed first, then the model is changed
        _set_submodule(model, name, new)
    return model


# --------------------------------------------------------------- 8-bit loading
def load_in_8bit(name_or_path: str, *, model_class: Optional[type] = None, **kwargs) -> nn.Module:
    """Load a Hugging Face model with 8-bit weights (``model.load_in_8bit: true``) through
    bitsandbytes' LLM.int8() layers, which need a CUDA device.

    Args:
        name_or_path: model id or folder.
        model_class: the transformers class (default ``AutoModelForCausalLM``).
        **kwargs: passed to ``from_pretrained`` (``device_map`` defaults to ``"auto"``).

    Returns:
        The loaded model.

    Raises:
        ModelError: bitsandbytes is not installed, or no CUDA device is available; the
            message names what is missing.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            "model.load_in_8bit: true needs the 'bitsandbytes' package, which is not installed "
            "(pip install bitsandbytes; it needs a CUDA GPU). Set load_in_8bit: false to load in "
            "full precision, or use artemis.sparse.quantization.quantize_int8 after pruning (CPU and GPU)."
        ) from None
    if not torch.cuda.is_available():
        raise ModelError(
            "model.load_in_8bit: true needs a CUDA GPU for bitsandbytes' 8-bit layers, and no CUDA "
            "device is available here. Set load_in_8bit: false, or use artemis.sparse.quantization.quantize_int8 "
            "after pruning (runs on CPU)."
        )
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cls = model_class or AutoModelForCausalLM
    kwargs.setdefault("device_map", "auto")
    return cls.from_pretrained(name_or_path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), **kwargs)
