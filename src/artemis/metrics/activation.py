"""``activation``: the Wanda criterion, weight magnitude times input-feature norm.

Score of weight ``W_ij`` (output ``i``, input feature ``j``)::

    score(W_ij) = |W_ij| · ‖X_j‖₂,    ‖X_j‖₂ = sqrt(Σ_tokens x_j²)

where the sum runs over every token the layer has seen as input since the previous
pruning event (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
Language Models"). Hugging Face ``Conv1D`` weights are stored ``(in, out)``; the norm
is then broadcast along the other axis, so the score is still shaped like the weight.

Statistics are streamed by a forward pre-hook on each prunable layer: a running sum of
squares per input feature (float32) and a token count, so the cost is **one float per
input feature per layer**, whatever the number of tokens; activations are never kept.
They are gathered from forward passes made in training mode and from
``manager.calibrate()`` batches; forward passes of a model in ``eval()`` mode outside
calibration (your evaluation loop) are ignored, so evaluating does not skew the
statistics. During calibration, when a batch is a dict with a 2-D ``attention_mask``
shaped like the layer input's leading dimensions, padding tokens are left out; during
training every token is counted.

Scope: by default weights are compared within each output row (``scope: row``), as
Wanda does. With ``scope: global`` the raw products ``|W_ij|·‖X_j‖₂`` of all layers are
ranked together with one threshold; every layer sees the same tokens, so the norms are
on a common scale, but layers whose inputs have large norms (for example the MLP
down-projection after a wide activation) keep more of their weights. ``scope: layer``
ranks each weight matrix on its own.

Fused Mixture-of-Experts weights (3-D ``(experts, out, in)`` targets) get one ``‖X_j‖₂`` per
expert from the tokens routed to it, weighted by the token's router weight, gathered by
a pre-hook on the experts module (:class:`artemis.metrics.experts.ExpertInputStats`, which
works whatever experts implementation transformers dispatches to). ``metric_options:
{calibrate_all_experts: true}`` sends every calibration token through every expert for
the statistics (not for the model's output); ``{expert_weighting: uniform}`` counts each
routed token once, without its router weight.

Example:
    >>> import torch
    >>> activation_scores(torch.tensor([[1.0, -2.0], [3.0, 1.0]]), torch.tensor([4.0, 1.0])).tolist()
    [[2.0, 2.0], [6.0, 1.0]]
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Mapping, Optional

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from artemis.core.distributed import all_reduce_sum_, is_dtensor, local_slice, local_tensor
from artemis.core.errors import CalibrationError
from artemis.core.targets import PrunableTarget
from artemis.metrics.base import METRICS, ImportanceMetric
from artemis.metrics.experts import ExpertInputStats

__all__ = ["ActivationMetric", "ActivationOptions", "activation_scores"]


class ActivationOptions(BaseModel):
    """``metric_options`` of ``activation`` (they only concern fused MoE experts).

    Attributes:
        calibrate_all_experts: during calibration, gather every expert's statistics from
            every token (weight 1), not only from the tokens routed to it.
        expert_weighting: ``router`` (default): a routed token counts with its router
            weight squared; ``uniform``: each routed token counts once.
    """

    model_config = ConfigDict(extra="forbid")
    calibrate_all_experts: bool = False
    expert_weighting: Literal["router", "uniform"] = "router"


def _sq_shape(t: PrunableTarget) -> tuple[int, ...]:
    """Shape of the sum of squares kept for target ``t``: ``(in,)``, or ``(experts, in)``."""
    return (t.experts, t.in_features) if t.experts else (t.in_features,)


def activation_scores(weight: Tensor, sq_sum: Tensor, transposed: bool = False) -> Tensor:
    """``|W_ij| · sqrt(sq_sum_j)`` in float32, shaped like ``weight``.

    Args:
        weight: ``(out, in)`` weight, or ``(in, out)`` when ``transposed`` (HF ``Conv1D``).
        sq_sum: ``(in,)`` sum of squares of each input feature over the tokens seen.
        transposed: the weight is stored ``(in, out)``.
    """
    w = weight.detach().abs().to(torch.float32)
    if w.dim() != 2:
        raise ValueError(f"the activation metric needs 2-D weights, got shape {tuple(w.shape)}")
    in_features = w.shape[0] if transposed else w.shape[1]
    if sq_sum.shape != (in_features,):
        raise ValueError(f"sq_sum has shape {tuple(sq_sum.shape)}; expected ({in_features},) input features")
    norm = sq_sum.to(device=w.device, dtype=torch.float32).clamp_min(0).sqrt()
    return w * (norm[:, None] if transposed else norm[None, :])


@METRICS.register("activation")
class ActivationMetric(ImportanceMetric):
    """Wanda: ``|W_ij| · ‖X_j‖₂`` from streamed input statistics (see the module docstring)."""

    name = "activation"
    default_scope = "row"
    needs_activations = True
    options_model = ActivationOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._sq: dict[str, Tensor] = {}
        self._tokens: dict[str, int] = {}
        self._handles: list[Any] = []
        self._calibrating = False
        self._token_mask: Optional[Tensor] = None
        self._reduced = False
        self._experts: Optional[ExpertInputStats] = None

    def attach(self, model: nn.Module, targets) -> None:
        super().attach(model, targets)
        modules = dict(model.named_modules(remove_duplicate=False))
        fused: dict[int, tuple[nn.Module, dict[str, str]]] = {}
        for t in targets:
            if t.experts:  # fused MoE experts: one pre-hook per experts module
                fused.setdefault(id(t.module), (t.module, {}))[1][t.param_name] = t.key
                continue
            for name in [t.name, *t.tied_names]:
                module = modules.get(name, t.module)
                self._handles.append(module.register_forward_pre_hook(self._hook(t), with_kwargs=True))
        if fused:
            self._experts = ExpertInputStats(
                self._sq,
                self._tokens,
                lambda: (self._calibrating, self._token_mask),
                all_experts=bool(self.options.get("calibrate_all_experts")),
                weighting=self.options.get("expert_weighting", "router"),
            )
            self._experts.on_update = self._touched
            for module, keys in fused.values():
                self._experts.attach(module, keys)

    def _touched(self) -> None:
        self._reduced = False

    def _hook(self, target: PrunableTarget):
        key = target.key
        weight = target.param
        in_features = weight.shape[0] if target.transposed else weight.shape[1]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not (self._calibrating or module.training):
                return
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor) or x.shape[-1] != in_features:
                return
            with torch.no_grad():
                x = x.detach()
                mask = self._token_mask
                if mask is not None and x.dim() >= 2 and tuple(x.shape[:-1]) == tuple(mask.shape):
                    x = x[mask.to(x.device)]  # (tokens kept, in)
                x = x.reshape(-1, in_features)  # (tokens, in)
                sq = self._sq.get(key)
                if sq is None:
                    sq = torch.zeros(in_features, dtype=torch.float32, device=x.device)
                    self._sq[key] = sq
                sq.add_(x.to(torch.float32).pow(2).sum(0).to(sq.device))
                self._tokens[key] = self._tokens.get(key, 0) + x.shape[0]
                self._reduced = False

        return hook

    @contextlib.contextmanager
    def calibrating(self, batch: Any) -> Iterator[None]:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self._token_mask = mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self._calibrating = True
        try:
            yield
        finally:
            self._calibrating = False
            self._token_mask = None

    def all_reduce_(self, group: Any = None) -> None:
        """Sum the per-feature sums of squares and the token counts over the ranks (each
        rank streamed its own batches), once per batch of new statistics."""
        if self._reduced:
            return
        sq = []
        for t in self.targets:
            if t.key not in self._sq:  # every rank must send the same shapes
                self._sq[t.key] = torch.zeros(_sq_shape(t), dtype=torch.float32, device=local_tensor(t.param).device)
            sq.append(self._sq[t.key])
        tokens = torch.tensor([self._tokens.get(t.key, 0) for t in self.targets], dtype=torch.int64)
        all_reduce_sum_([*sq, tokens], group)
        counts = {t.key: int(n) for t, n in zip(self.targets, tokens.tolist()) if n > 0}
        self._tokens.clear()  # in place: the experts' collector writes into these dicts
        self._tokens.update(counts)
        for k in [k for k in self._sq if k not in counts]:
            del self._sq[k]
        self._reduced = True

    def tokens_seen(self, key: str) -> int:
        """Tokens seen by the layer of weight ``key`` since the last reset."""
        return self._tokens.get(key, 0)

    def check_ready(self) -> None:
        missing = [t.key for t in self.targets if self._tokens.get(t.key, 0) == 0]
        if len(missing) == len(self.targets):
            raise CalibrationError(
                "importance_metric 'activation' has no activation statistics yet: run "
                "manager.calibrate(batches) or pass calibration_data to manager.apply_pruning(sparsity, "
                "calibration_data) (for example artemis.data.corpus.tokenize_batches(texts, tokenizer)); during "
                "training, statistics come from forward passes in train mode"
            )
        if missing:
            raise CalibrationError(
                f"importance_metric 'activation': {len(missing)} of {len(self.targets)} pruned layers saw no input "
                f"tokens (for example {missing[:3]}); they are not run by the model's forward. Exclude them "
                "with pruning.exclude"
            )

    def score(self, target: PrunableTarget) -> Tensor:
        sq = self._sq.get(target.key)
        if sq is None:
            self.check_ready()
            raise CalibrationError(f"no activation statistics for {target.key}")
        if target.experts:  # fused MoE experts: each expert's matrix with its own norms
            w = target.matrices(target.param.detach()).abs().to(torch.float32)  # (experts, out, in)
            norm = sq.to(device=w.device, dtype=torch.float32).clamp_min(0).sqrt()
            return target.matrices(w * norm[:, None, :])
        if is_dtensor(target.param):  # FSDP2: score the local shard with its features' norms
            sq = sq[local_slice(target.param, 0 if target.transposed else 1)]
        return activation_scores(local_tensor(target.param), sq, target.transposed)

    def reset(self) -> None:
        self._sq.clear()  # cleared in place: the experts' collector writes into these dicts
        self._tokens.clear()
        self._reduced = False

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._experts is not None:
            self._experts.remove()
            self._experts = None
        self._calibrating = False
        self._token_mask = None
        self.reset()

    def state_dict(self) -> dict:
        return {"sq": {k: v.detach() for k, v in self._sq.items()}, "tokens": dict(self._tokens)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        known = {t.key: t for t in self.targets}
        sq, tokens = state.get("sq", {}), state.get("tokens", {})
        bad = sorted(set(sq) - set(known)) or sorted(set(sq) ^ set(tokens))
        if bad:
            raise CalibrationError(f"activation state does not match this model's targets: {bad[:3]}")
        new: dict[str, Tensor] = {}
        for k, v in sq.items():
            t = known[k]
            if tuple(v.shape) != _sq_shape(t):
                raise CalibrationError(f"activation state for {k} has shape {tuple(v.shape)}; expected {_sq_shape(t)}")
            new[k] = v.to(device=t.param.device, dtype=torch.float32, copy=True)
        self._sq.clear()
        self._sq.update(new)
        self._tokens.clear()
        self._tokens.update({k: int(v) for k, v in tokens.items()})
