"""Readying pruned models for 8-bit quantization.

Symmetric per-output-channel int8 keeps exact zeros (0 / scale = 0), so a pruned
weight stays pruned after quantization. The scales are computed from the kept weights
only (pruned weights are zero and never set the maximum).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from artemis.targets import is_prunable_module

__all__ = ["int8_channel_scales", "prepare_model_for_quantization"]


def int8_channel_scales(weight: Tensor, transposed: bool = False) -> Tensor:
    """Symmetric int8 scale of each output channel: ``max|w| / 127`` (1 where a row is all zero).

    Example:
        >>> import torch
        >>> int8_channel_scales(torch.tensor([[0.0, -2.54], [0.0, 0.0]])).tolist()
        [0.019999999552965164, 1.0]
    """
    w = weight.detach().to(torch.float32)
    if transposed:
        w = w.t()
    amax = w.abs().amax(dim=1)
    return torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))


@torch.no_grad()
def prepare_model_for_quantization(model: nn.Module) -> nn.Module:
    """Attach per-channel int8 scales (non-persistent buffer ``int8_scale``) to every
    ``Linear``/``Conv1D`` and return the model."""
    from artemis.targets import conv1d_class

    conv = conv1d_class()
    for module in model.modules():
        if is_prunable_module(module):
            transposed = conv is not None and isinstance(module, conv)
            scale = int8_channel_scales(module.weight, transposed)
            if "int8_scale" in module._buffers:
                module.int8_scale = scale
            else:
                module.register_buffer("int8_scale", scale, persistent=False)
    return model
