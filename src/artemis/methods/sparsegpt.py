"""SparseGPT-style weight reconstruction: the OBS update of the kept weights, layer by layer.

After a pruning mask is chosen, the weights that are kept can be changed to make up for
the ones removed. For a linear layer ``y = W x`` and calibration inputs ``X`` the layer's
output error ``‖W X − Ŵ X‖²`` is a quadratic in each output row, with Hessian
``H = 2 X Xᵀ / n`` shared by all rows. The Optimal Brain Surgeon (OBS) update removes
one input column at a time and spreads its error over the not-yet-processed columns
with the inverse Hessian; SparseGPT (Frantar & Alistarh, 2023) does this for all rows at
once with one Cholesky factor of ``H⁻¹``, in blocks of columns, which is what
:func:`sparsegpt_prune` implements. It can either keep a given mask (Artemis's default:
the mask comes from the configured metric, scope and N:M pattern) or choose the mask
itself with the OBS saliency ``w² / [H⁻¹]ᵢᵢ²`` (``sparsity=`` or ``pattern=``, as the paper).

:func:`reconstruct_layers` drives it over a model **one layer at a time**: for each target,
in module order, the calibration batches are run through the model until that layer's
input has been seen (a forward pre-hook adds ``xᵀx`` to a running sum and stops the
forward pass there), the layer is updated, and its Hessian is freed before the next layer.
So the inputs of every layer come from the already pruned and updated layers before it
(sequential, as SparseGPT), and the extra memory at any time is one layer's Hessian and
a few float32 copies of its weight (see :func:`reconstruction_extra_bytes`). The cost is
one partial forward pass of the calibration data per target layer.

Example:
    >>> import torch
    >>> from artemis.methods.sparsegpt import sparsegpt_prune
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(256, 16, generator=g)            # (samples, in_features)
    >>> w = torch.randn(8, 16, generator=g)              # (out_features, in_features)
    >>> mask = torch.rand(8, 16, generator=g) > 0.5
    >>> new_w, keep = sparsegpt_prune(w, 2 * x.T @ x / 256, mask=mask)
    >>> bool((new_w[~mask] == 0).all()), bool(torch.equal(keep, mask))
    (True, True)
    >>> err = lambda v: float(((x @ (w - v).T) ** 2).mean())
    >>> err(new_w) < err(w * mask)
    True
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Literal, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from pydantic import field_validator, model_validator
from torch import Tensor
from torch.func import functional_call

from artemis.core.config import one_of
from artemis.core.errors import CalibrationError
from artemis.core.masks import count_to_prune
from artemis.data.calibration import check_calibration_batches, forward_batch, model_device
from artemis.methods.base import MethodOptions

__all__ = [
    "SparseGPTOptions",
    "RECONSTRUCTIONS",
    "SPARSEGPT_OBS_SCOPES",
    "SPARSEGPT_TARGETS",
    "HessianAccumulator",
    "sparsegpt_prune",
    "dense_target_weight",
    "reconstruct_layers",
    "reconstruction_extra_bytes",
    "layer_inputs_2d",
    "check_calibration_batches",
]

logger = logging.getLogger(__name__)

RECONSTRUCTIONS = ("none", "sparsegpt")
SPARSEGPT_OBS_SCOPES = ("layer", "row")
SPARSEGPT_TARGETS = ("pruned", "dense")
SPARSEGPT_SHRINKAGES = ("none", "ledoit_wolf")
SPARSEGPT_VARIANTS = ("artemis", "paper")

#: The settings each ``sparsegpt_variant`` gives the keys that are not set explicitly.
SPARSEGPT_VARIANT_SETTINGS: dict[str, dict[str, Any]] = {
    # the paper (Frantar & Alistarh, 2023) and its reference code
    "paper": {
        "sparsegpt_mask": "obs",
        "sparsegpt_obs_scope": "layer",
        "sparsegpt_target": "pruned",
        "sparsegpt_dampening": 0.01,
        "sparsegpt_shrinkage": "none",
        "sparsegpt_bias_correction": False,
    },
    # the measured best (docs/benchmarks/sparsegpt.md)
    "artemis": {
        "sparsegpt_mask": "obs",
        "sparsegpt_obs_scope": "row",
        "sparsegpt_target": "dense",
        "sparsegpt_dampening": 0.2,
        "sparsegpt_shrinkage": "ledoit_wolf",
        "sparsegpt_bias_correction": True,
    },
}


class SparseGPTOptions(MethodOptions):
    """The reconstruction keys of the ``pruning:`` section (``magnitude_progressive``).

    Attributes:
        reconstruction: ``none`` (default) or ``sparsegpt``: after the masks are chosen,
            update the kept weights of each layer (one layer at a time) to minimise the
            layer's output error on calibration data (the OBS update with the inverse
            Hessian of the layer inputs, :func:`reconstruct_layers`). Needs calibration data
            (``apply_pruning(s, calibration_data)`` or ``manager.set_calibration_data(batches)``).
        sparsegpt_variant: ``artemis`` (default) or ``paper``: the settings of the keys
            below that are not given (:data:`SPARSEGPT_VARIANT_SETTINGS`). ``paper`` is the
            SparseGPT paper's algorithm (OBS-chosen mask compared over each layer, pruned
            inputs as the target, dampening 0.01, no shrinkage, biases unchanged);
            ``artemis`` is the measured best of docs/benchmarks/sparsegpt.md (per-row OBS
            mask, dense targets, dampening 0.2, Ledoit-Wolf shrinkage of the Hessian, bias
            refitted). An explicit key overrides its variant's setting.
        sparsegpt_blocksize: columns updated together by the reconstruction (default 128).
        sparsegpt_dampening: fraction of the mean Hessian diagonal added to its diagonal
            before inversion: 0.01 (``paper``) or 0.2 (``artemis``; with dense targets it
            also pulls ``W*`` toward the dense weight, see :func:`dense_target_weight`).
        sparsegpt_mask: ``obs`` (both variants): the reconstruction keeps only each
            layer's pruned count (or the N:M pattern) and chooses the weights itself by the
            OBS saliency ``w²/[H⁻¹]ᵢᵢ²`` while it updates, as the SparseGPT paper does;
            ``metric``: it keeps the masks the metric, scope and pattern chose.
        sparsegpt_obs_scope: with ``sparsegpt_mask: obs`` and no ``pattern``, where the
            OBS saliency competes: ``layer`` (``paper``: each block of columns prunes its
            share over all rows of the layer) or ``row`` (``artemis``: every output row
            prunes the same share of its weights in each block, as Wanda's per-row
            comparison). Without obs selection, or with a pattern, the variant's setting
            becomes ``layer`` (the only one that applies). With ``obs`` and no ``scope``
            or ``pattern`` given, every layer prunes the same share (``scope`` becomes
            ``layer``, as in the paper), not the shares a global metric threshold gives.
        sparsegpt_target: which output each layer is reconstructed to: ``pruned``
            (``paper``; ``‖W X − Ŵ X‖²`` with ``X`` the layer's inputs in the
            model pruned so far) or ``dense`` (``artemis``; ``‖W X_dense − Ŵ X‖²``: the dense model's
            output from the pruned model's input, so each layer also corrects the error
            that the earlier pruned layers left). ``dense`` runs every calibration batch
            twice per layer and keeps a copy of the pruned weights as they were before the
            event; without shrinkage it needs several times the widest layer's input size
            in calibration tokens, else it fits the calibration noise.
        sparsegpt_shrinkage: ``ledoit_wolf`` (``artemis``): each layer's Hessian is shrunk
            toward a multiple of the identity by the Ledoit-Wolf intensity estimated from
            its own calibration inputs (:meth:`HessianAccumulator.ledoit_wolf_dampening`),
            added to ``sparsegpt_dampening``: strong when a layer has few tokens for its
            width, near zero with plenty; ``none`` (``paper``): the fixed dampening only.
        sparsegpt_bias_correction: ``true`` (``artemis``): a layer with a bias refits it
            with the weights, so the OBS update works on the input covariance (the
            Hessian of centred inputs) and the bias takes the mean output shift
            ``(W − Ŵ) μ``; ``false`` (``paper``): the bias is left as it is.

    Example:
        >>> opts = SparseGPTOptions(reconstruction="sparsegpt")
        >>> opts.sparsegpt_blocksize, opts.sparsegpt_mask, opts.sparsegpt_obs_scope, opts.sparsegpt_shrinkage
        (128, 'obs', 'row', 'ledoit_wolf')
        >>> SparseGPTOptions(reconstruction="sparsegpt", sparsegpt_variant="paper").sparsegpt_obs_scope
        'layer'
        >>> opts.calibration_need(None)
        'reconstruction: sparsegpt'
    """

    reconstruction: str = "none"
    sparsegpt_variant: str = "artemis"
    sparsegpt_blocksize: int = 128
    sparsegpt_dampening: Optional[float] = None
    sparsegpt_mask: Optional[Literal["metric", "obs"]] = None
    sparsegpt_obs_scope: Optional[str] = None
    sparsegpt_target: Optional[str] = None
    sparsegpt_shrinkage: Optional[str] = None
    sparsegpt_bias_correction: Optional[bool] = None

    @field_validator("reconstruction")
    @classmethod
    def _check_reconstruction(cls, v: str) -> str:
        return one_of("reconstruction", v, RECONSTRUCTIONS)

    @field_validator("sparsegpt_variant")
    @classmethod
    def _check_variant(cls, v: str) -> str:
        return one_of("sparsegpt_variant", v, SPARSEGPT_VARIANTS)

    @field_validator("sparsegpt_obs_scope")
    @classmethod
    def _check_obs_scope(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else one_of("sparsegpt_obs_scope", v, SPARSEGPT_OBS_SCOPES)

    @field_validator("sparsegpt_target")
    @classmethod
    def _check_target(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else one_of("sparsegpt_target", v, SPARSEGPT_TARGETS)

    @field_validator("sparsegpt_shrinkage")
    @classmethod
    def _check_shrinkage(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else one_of("sparsegpt_shrinkage", v, SPARSEGPT_SHRINKAGES)

    @field_validator("sparsegpt_blocksize")
    @classmethod
    def _check_blocksize(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"sparsegpt_blocksize must be at least 1 column, got {v!r}")
        return v

    @field_validator("sparsegpt_dampening")
    @classmethod
    def _check_damp(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"sparsegpt_dampening must be in (0, 1], got {v!r}")
        return v

    @model_validator(mode="after")
    def _apply_variant(self) -> "SparseGPTOptions":
        """Give every key left unset (None) its variant's setting."""
        for key, value in SPARSEGPT_VARIANT_SETTINGS[self.sparsegpt_variant].items():
            if self.__dict__[key] is None:
                self.__dict__[key] = value
        return self

    def in_use(self, cfg: Any) -> list[str]:
        """The keys whose value differs from what ``sparsegpt_variant: artemis`` gives."""
        defaults = {"reconstruction": "none", "sparsegpt_variant": "artemis", "sparsegpt_blocksize": 128}
        defaults.update(SPARSEGPT_VARIANT_SETTINGS["artemis"])
        return [k for k, v in defaults.items() if getattr(self, k) != v]

    def check(self, cfg: Any) -> None:
        if self.reconstruction != "none" and self.sparsegpt_mask == "obs" and cfg.scope is None and cfg.pattern is None:
            # the OBS choice keeps each layer's count: with no scope given, the same share per layer
            cfg.__dict__["scope"] = "layer"
        scope_applies = self.sparsegpt_mask == "obs" and cfg.pattern is None
        if self.sparsegpt_obs_scope != "layer" and not scope_applies:
            if "sparsegpt_obs_scope" not in self.model_fields_set:
                # the variant's setting, where it does not apply: the one that does
                self.__dict__["sparsegpt_obs_scope"] = "layer"
                extra = getattr(cfg, "__pydantic_extra__", None)
                if isinstance(extra, dict) and "sparsegpt_obs_scope" in extra:
                    extra["sparsegpt_obs_scope"] = "layer"
                return
            raise ValueError(
                f"sparsegpt_obs_scope {self.sparsegpt_obs_scope!r} only applies with sparsegpt_mask: obs and no "
                f"pattern (sparsegpt_mask is {self.sparsegpt_mask!r}, pattern is {cfg.pattern!r}); remove it"
            )

    def calibration_need(self, cfg: Any) -> Optional[str]:
        return f"reconstruction: {self.reconstruction}" if self.reconstruction != "none" else None


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer's input was seen."""


def layer_inputs_2d(x: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """The input of a linear layer as ``(tokens, in_features)`` float32, padding removed.

    Args:
        x: the layer input ``(..., in_features)``.
        token_mask: optional ``(batch, seq)`` attention mask; when ``x`` is
            ``(batch, seq, in)`` the positions where it is 0 are dropped.

    Example:
        >>> import torch
        >>> x = torch.ones(2, 3, 4)
        >>> layer_inputs_2d(x, torch.tensor([[1, 1, 0], [1, 0, 0]])).shape
        torch.Size([3, 4])
    """
    if token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
        x = x[token_mask.to(device=x.device, dtype=torch.bool)]
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float32)


def _frobenius2(s: Tensor) -> float:
    """``‖S‖²_F`` accumulated in float64, row block by row block (no ``in × in`` temporary)."""
    total = 0.0
    for k in range(0, s.shape[0], 64):
        total += float(torch.linalg.vector_norm(s[k : k + 64], dtype=torch.float64) ** 2)
    return total


class HessianAccumulator:
    """Running ``H = 2 XᵀX / n`` of one layer's inputs (``X``: tokens × in_features).

    Keeps a float32 sum ``XᵀX`` and the token count; :meth:`hessian` returns the mean.

    Example:
        >>> import torch
        >>> acc = HessianAccumulator(2)
        >>> acc.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
        >>> acc.hessian().tolist()
        [[2.0, 2.0], [2.0, 4.0]]
    """

    def __init__(self, in_features: int, device: Optional[torch.device] = None, moments: bool = False) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0
        self.moments = moments  # also the sums that the mean and the shrinkage intensities need
        # first moments and the fourth-moment terms that the Ledoit-Wolf intensity needs (float64, O(in))
        self.x_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq_x_sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.sq_sum = 0.0
        self.fourth_sum = 0.0

    def add(self, x2d: Tensor) -> None:
        """Add the rows of ``x2d`` ``(tokens, in_features)``."""
        if x2d.shape[-1] != self.sum.shape[0]:
            raise ValueError(f"input has {x2d.shape[-1]} features, the Hessian is {self.sum.shape[0]} wide")
        x2d = x2d.to(device=self.sum.device, dtype=torch.float32)
        self.sum.addmm_(x2d.T, x2d)
        self.count += x2d.shape[0]
        if not self.moments:
            return
        sq = torch.linalg.vector_norm(x2d, dim=1) ** 2  # (tokens,): no tokens × in temporary
        self.x_sum += x2d.sum(0)
        self.sq_x_sum += sq @ x2d
        sq = sq.to(torch.float64)
        self.sq_sum += float(sq.sum())
        self.fourth_sum += float((sq * sq).sum())

    def mean(self) -> Tensor:
        """Mean input ``μ = Σx / n`` (float32, ``(in,)``; needs ``moments=True``)."""
        if not self.moments:
            raise ValueError("this accumulator keeps only XᵀX; create it with moments=True for the mean")
        if self.count == 0:
            raise CalibrationError("the layer saw no calibration tokens; its mean is undefined")
        return (self.x_sum / self.count).to(torch.float32)

    def covariance_hessian(self) -> Tensor:
        """``2 (XᵀX/n − μμᵀ)``: the Hessian of the output error when the layer's bias is
        refitted with the weight (the error of a centred input)."""
        mu = self.mean().to(self.sum.device)
        return self.hessian().addr_(mu, mu, alpha=-2.0)

    def _second_and_fourth(self, centered: bool) -> tuple[Tensor, float]:
        """``(S, Σᵢ‖xᵢ‖⁴)`` of the raw or centred inputs (``S`` float32)."""
        if not self.moments:
            raise ValueError("this accumulator keeps only XᵀX; create it with moments=True for the shrinkage")
        n = self.count
        s = self.sum / n  # the one in × in temporary here (float32)
        fourth = self.fourth_sum
        if centered:
            mu = self.x_sum / n
            c = float(mu @ mu)
            s.addr_(mu.to(s.dtype), mu.to(s.dtype), alpha=-1.0)
            # Σ‖x−μ‖⁴ from the raw sums: ‖x−μ‖² = a − 2b + c with a = ‖x‖², b = xᵀμ
            sum_ab = float(mu @ self.sq_x_sum)
            sum_b2 = float(mu @ (self.sum @ mu.to(self.sum.dtype)).to(torch.float64))
            fourth = fourth - 4 * sum_ab + 4 * sum_b2 + 2 * c * self.sq_sum - 3 * n * c * c
        return s, fourth

    def ledoit_wolf_dampening(self, centered: bool = False) -> float:
        """The Ledoit-Wolf shrinkage of the input second moment ``S`` (or covariance, with
        ``centered``) toward ``mean(diag S)·I``, as a dampening ratio ``α/(1−α)``: the
        shrunk ``(1−α)S + α·mean(diag S)·I`` is ``S + α/(1−α)·mean(diag S)·I`` up to scale.

        ``α = min(β², δ²)/δ²`` with ``δ² = ‖S − mI‖²_F`` and
        ``β² = (Σᵢ‖xᵢ‖⁴/n − ‖S‖²_F)/n`` (Ledoit & Wolf, 2004): the estimated variance of
        ``S``'s entries against their spread. Few tokens for many inputs give α near 1.

        Example:
            >>> import torch
            >>> acc = HessianAccumulator(2, moments=True)
            >>> acc.add(torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 1.0]] * 2))
            >>> round(acc.ledoit_wolf_dampening(), 4)  # S = diag(2.5, .5): α = 1.8125/2, α/(1−α) = 29/3
            9.6667
        """
        n = self.count
        if n == 0:
            raise CalibrationError("the layer saw no calibration tokens; its Hessian is undefined")
        d = self.sum.shape[0]
        s, fourth = self._second_and_fourth(centered)
        m = float(s.diagonal().to(torch.float64).mean())
        fro2 = _frobenius2(s)
        delta2 = fro2 - d * m * m
        if delta2 <= 0:
            return 0.0
        beta2 = min(max((fourth / n - fro2) / n, 0.0), delta2)
        alpha = beta2 / delta2
        return alpha / (1.0 - alpha) if alpha < 1.0 else 1e6

    def hessian(self) -> Tensor:
        """``2 XᵀX / n`` (float32, ``(in, in)``)."""
        if self.count == 0:
            raise CalibrationError("the layer saw no calibration tokens; its Hessian is undefined")
        return self.sum * (2.0 / self.count)


def _inverse_hessian_factor(h: Tensor, dampening: float, chol: Optional[Tensor] = None) -> Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = dampening · mean(diag H)``;
    dead inputs (zero diagonal) get a unit diagonal. Retries with 10× and 100× damping.
    ``chol``: the lower Cholesky factor of that damped ``H`` when the caller has it already
    (:func:`dense_target_weight` with ``return_factor``); its factorisation is then skipped,
    and ``chol`` is overwritten by the inverse (no further ``in × in`` matrix).

    Works on one private copy of ``H`` and frees each intermediate as soon as the next
    exists, so at most two ``in × in`` matrices live here at once (plus the caller's ``H``).
    """
    if chol is not None:
        hinv = torch.cholesky_inverse(chol, out=chol)
        return torch.linalg.cholesky(hinv, upper=True)
    h = h.clone()
    diag = h.diagonal()  # a view: edits go into h
    diag[diag == 0] = 1.0
    mean_diag = float(diag.mean())
    applied = 0.0
    last: Optional[Exception] = None
    for factor in (1.0, 10.0, 100.0):
        damp = dampening * factor * mean_diag
        diag += damp - applied
        applied = damp
        try:
            chol = torch.linalg.cholesky(h)
        except torch.linalg.LinAlgError as exc:  # not positive definite: damp more
            last = exc
            logger.warning("Hessian not positive definite with dampening %g; retrying with more", dampening * factor)
            continue
        del h, diag
        hinv = torch.cholesky_inverse(chol)
        del chol
        return torch.linalg.cholesky(hinv, upper=True)
    raise CalibrationError(
        f"the layer's input Hessian is not positive definite even with dampening {dampening * 100:g} "
        f"× its mean diagonal ({last}); use more calibration data or raise sparsegpt_dampening"
    )


def _lowest(s: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` lowest entries of each row of ``s`` (along its last dimension),
    ties going to the lower index: the first ``k`` of a stable ``argsort``, found with a
    ``k``-th value and the ties at it instead of a sort (the same mask).

    Example:
        >>> _lowest(torch.tensor([[3.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]), 2).tolist()
        [[False, True, False, True], [True, True, False, False]]
    """
    n = s.shape[-1]
    if k <= 0 or k >= n:
        return torch.full(s.shape, k > 0, dtype=torch.bool, device=s.device)
    if bool(torch.isnan(s).any()):  # NaN sorts last in argsort; keep its order exactly
        out = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
        return out.scatter_(-1, torch.argsort(s, dim=-1, stable=True)[..., :k], True)
    kth = s.kthvalue(k, dim=-1, keepdim=True).values
    below = s < kth
    ties = s == kth
    room = k - below.sum(-1, keepdim=True)  # how many of the ties at the k-th value are taken, first first
    return below | (ties & (ties.cumsum(-1) <= room))


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    *,
    mask: Optional[Tensor] = None,
    sparsity: Optional[float] = None,
    pattern: Optional[tuple[int, int]] = None,
    prior: Optional[Tensor] = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    per_row: bool = False,
    factor: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Prune ``weight`` and update its kept entries to minimise the output error (OBS).

    Give exactly one of ``mask`` (keep that mask; only the kept weights change) or
    ``sparsity``/``pattern`` (choose the mask as SparseGPT does, by the OBS saliency
    ``w² / [H⁻¹]ᵢᵢ²`` inside each block of columns: ``sparsity`` prunes exactly
    ``round_half_up(sparsity · numel)`` weights; ``pattern=(N, M)`` keeps N of every M
    consecutive inputs of each row).

    Args:
        weight: ``(out_features, in_features)``; not modified.
        hessian: ``(in_features, in_features)`` Hessian of the inputs (``2XᵀX/n``).
        mask: bool keep-mask shaped like ``weight``.
        sparsity: fraction to prune when the mask is chosen here.
        pattern: ``(N, M)`` when the mask is chosen here with an N:M pattern.
        prior: bool keep-mask of an earlier pruning event when the mask is chosen here:
            the weights it prunes are pruned again first (masks only shrink). A block
            whose earlier-pruned weights exceed its share prunes them all, so the count
            can then exceed the target by those weights.
        blocksize: columns processed together (the lazy batch update of SparseGPT).
        dampening: fraction of the mean Hessian diagonal added to the diagonal.
        per_row: with ``sparsity``: every row prunes its own share
            ``round_half_up(sparsity · in_features)`` (spread over the blocks as the
            layer's count is) instead of each block's share going to the lowest
            saliencies over all rows (the paper's choice).
        factor: the lower Cholesky factor of the damped Hessian ``H + λI`` (what
            :func:`dense_target_weight` with ``return_factor=True`` returns), so that it is
            not computed twice; the result is the same. It is overwritten here.

    Returns:
        ``(new_weight, keep_mask)``: the updated weight (``weight``'s dtype, exactly zero
        where ``keep_mask`` is False) and the mask.

    Raises:
        ValueError: bad shapes or arguments.
        CalibrationError: the Hessian cannot be inverted even with more damping.
    """
    if weight.dim() != 2:
        raise ValueError(f"sparsegpt_prune needs a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"Hessian has shape {tuple(hessian.shape)}; expected ({cols}, {cols}) for weight {tuple(weight.shape)}"
        )
    if (mask is None) == (sparsity is None and pattern is None):
        raise ValueError("give either mask= or sparsity=/pattern= to sparsegpt_prune, not both or neither")
    if mask is not None and (tuple(mask.shape) != tuple(weight.shape) or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(weight.shape)}, got {tuple(mask.shape)}/{mask.dtype}"
        )
    if pattern is not None:
        n_keep, m = pattern
        if not (0 < n_keep < m) or cols % m:
            raise ValueError(f"pattern {n_keep}:{m} needs 0 < N < M and in_features ({cols}) divisible by M")
        if blocksize % m:
            blocksize = max(m, blocksize - blocksize % m)
    if prior is not None and (mask is not None or tuple(prior.shape) != tuple(weight.shape)):
        raise ValueError("prior= is only used when the mask is chosen here, and must be shaped like the weight")
    if sparsity is not None and not (0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be at least 1, got {blocksize}")
    if per_row and (sparsity is None or pattern is not None):
        raise ValueError(
            "per_row=True applies only when the mask is chosen here with sparsity= (not mask= or pattern=)"
        )

    w = weight.detach().to(torch.float32).clone()  # (out, in), updated in place
    hinv = _inverse_hessian_factor(hessian.detach().to(device=w.device, dtype=torch.float32), dampening, factor)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    total_prune = count_to_prune(rows * cols, sparsity) if sparsity is not None and pattern is None else 0

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2]  # (out, count), read before the block is updated
        hinv1 = hinv[i1:i2, i1:i2]
        diag1 = torch.diag(hinv1)
        forced1 = ~prior[:, i1:i2].to(w.device) if prior is not None else None
        if mask is not None:
            prune1 = ~mask[:, i1:i2].to(w.device)
        elif pattern is None and per_row:
            # each row prunes its own share round_half_up(s · in) of its weights, block by block
            k = count_to_prune(cols, sparsity * i2 / cols) - count_to_prune(cols, sparsity * i1 / cols)
            saliency = w1**2 / diag1.unsqueeze(0) ** 2
            if i2 < cols:
                k_row = torch.full((rows,), min(max(k, 0), count), dtype=torch.long, device=w.device)
            else:
                k_row = (count_to_prune(cols, sparsity) - torch.count_nonzero(pruned, dim=1)).clamp(min=0, max=count)
            if forced1 is not None:
                saliency[forced1] = -1.0
                k_row = torch.maximum(k_row, forced1.sum(1))
            if i2 < cols and forced1 is None:  # the same count in every row: its k lowest
                prune1 = _lowest(saliency, int(k_row[0]))
            else:
                order = torch.argsort(saliency, dim=1, stable=True)
                rank = torch.empty_like(order)
                rank.scatter_(1, order, torch.arange(count, device=w.device).expand(rows, count).contiguous())
                prune1 = rank < k_row.unsqueeze(1)
                del order
            del saliency
        elif pattern is None:
            # exact overall count: this block prunes its share of round_half_up(s · numel)
            k = count_to_prune(rows * cols, sparsity * i2 / cols) - count_to_prune(rows * cols, sparsity * i1 / cols)
            k = min(max(k, 0), rows * count) if i2 < cols else max(total_prune - int(torch.count_nonzero(pruned)), 0)
            saliency = w1**2 / diag1.unsqueeze(0) ** 2
            if forced1 is not None:
                saliency[forced1] = -1.0
                k = max(k, int(forced1.sum()))
            prune1 = _lowest(saliency.reshape(-1), k).view(rows, count)
            del saliency
        else:
            prune1 = torch.zeros(rows, count, dtype=torch.bool, device=w.device)
        # the block's columns as contiguous rows (the same arithmetic, faster updates)
        w1t = w1.t().contiguous()  # (count, out)
        prune1t = prune1.t().contiguous()
        err1t = torch.empty_like(w1t)  # every row is written
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        d1 = diag1.tolist()
        for i in range(count):
            if pattern is not None and mask is None and i % pattern[1] == 0:
                m = pattern[1]
                sal = w1t[i : i + m].t() ** 2 / diag1[i : i + m].unsqueeze(0) ** 2
                if forced1 is not None:
                    sal[forced1[:, i : i + m]] = -1.0
                lowest = torch.argsort(sal, dim=1, stable=True)[:, : m - pattern[0]]
                prune1[:, i : i + m].scatter_(1, lowest, True)
                prune1t[i : i + m] = prune1[:, i : i + m].t()
            # the OBS step of column i: its error e (the pruned weights' values over [H⁻¹]ᵢᵢ) moves
            # the later columns by e·[H⁻¹]ᵢ,ᵢ₊₁…; the column keeps its kept weights (pruned: 0)
            col, p, e = w1t[i], prune1t[i], err1t[i]
            torch.where(p, col, zero, out=e).div_(d1[i])
            w1t[i + 1 :].sub_(torch.outer(hinv1[i, i + 1 :], e))
            col.masked_fill_(p, 0.0)
        w[:, i1:i2] = w1t.t()
        del w1t, prune1t
        pruned[:, i1:i2] = prune1
        if i2 < cols:
            w[:, i2:] -= err1t.t() @ hinv[i1:i2, i2:]
        del err1t
    keep = ~pruned
    w[pruned] = 0.0
    return w.to(weight.dtype), keep.to(weight.device) if mask is None else mask


def reconstruction_extra_bytes(
    out_features: int,
    in_features: int,
    blocksize: int = 128,
    dense_target: bool = False,
    obs: bool = False,
) -> int:
    """Upper bound of the extra bytes :func:`reconstruct_layers` holds while it reconstructs
    one ``out × in`` layer (float32 work): the Hessian sum and its factor work (3 ``in²``
    matrices), the float32 weight copy and the result (2 ``out × in``), the pruned mask
    (1 byte per weight), and the column loop's buffers: three float32 ``out × block``
    (the block, its error, the update of the later columns), the block's mask and two
    ``out`` vectors. With ``dense_target`` (``sparsegpt_target: dense``) one more ``in²``
    matrix (the cross product of dense and pruned inputs) and one more ``out × in`` (the
    target weight ``W*``) are held. With ``obs`` (``sparsegpt_mask: obs`` without an N:M
    pattern: the mask chosen while updating) the choice's buffers add up to 32 bytes per
    weight of a block (saliencies, sort order, ranks) and 128 bytes per row (the per-row
    counts); with a pattern they fit in the buffers already counted. The weights copied
    before an event for a dense target are reported apart (``dense_copy_bytes``).
    ``tests/test_advanced_pruning.py`` measures the peak allocations against this bound.

    Example:
        >>> reconstruction_extra_bytes(4, 2, blocksize=2)
        256
        >>> reconstruction_extra_bytes(4, 2, blocksize=2, dense_target=True)
        304
        >>> reconstruction_extra_bytes(4, 2, blocksize=2, obs=True)
        1024
    """
    b = min(blocksize, in_features)
    extra = 4 * (in_features * in_features + out_features * in_features) if dense_target else 0
    choice = 32 * out_features * b + 128 * out_features if obs else 0
    return (
        4 * (3 * in_features * in_features + 2 * out_features * in_features + 3 * out_features * b)
        + (out_features * in_features + out_features * b + 8 * out_features)
        + extra
        + choice
    )


def _run_until(model: nn.Module, batches: Sequence, device: torch.device, state: dict) -> None:
    """Run every batch through ``model`` (no grad), stopping each at ``_StopForward``."""
    for batch in batches:
        state["token_mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
        state["x_obj"] = None
        try:
            forward_batch(model, batch, device)
        except _StopForward:
            pass
        state["after_batch"]()


def _run_until_paired(
    model: nn.Module, batches: Sequence, device: torch.device, state: dict, dense_params: dict[str, Tensor]
) -> None:
    """For every batch: a pass with ``dense_params`` substituted (``state['phase'] = 'dense'``),
    then one with the model's current weights (``'pruned'``), each stopped at ``_StopForward``."""

    class _Dense(nn.Module):  # forward_batch calls it like the model, with the dense weights
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return functional_call(model, dense_params, args, kwargs, strict=False)

    dense = _Dense()
    for batch in batches:
        state["token_mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
        for phase, run in (("dense", dense), ("pruned", model)):
            state["phase"] = phase
            state["x_obj"] = None
            try:
                forward_batch(run, batch, device)
            except _StopForward:
                pass
        state["after_batch"]()


def dense_target_weight(
    weight: Tensor, hessian: Tensor, cross: Tensor, dampening: float = 0.01, *, return_factor: bool = False
) -> Any:
    """The unconstrained optimum ``W*`` of ``‖W X_d − Ŵ X_p‖² + λ‖Ŵ − W‖²`` over ``Ŵ``.

    ``X_p`` are a layer's inputs in the pruned model, ``X_d`` the same tokens' inputs in
    the dense model: the layer is asked to reproduce the *dense* model's output from the
    pruned model's input. With ``H = 2X_pᵀX_p/n`` (``hessian``), ``C = 2X_pᵀX_d/n``
    (``cross``) and ``H_λ`` the damped Hessian that :func:`sparsegpt_prune` inverts
    (``λ = dampening · mean diag H``), ``W* = W + W (Cᵀ − H) H_λ⁻¹``, and the objective
    equals ``tr((Ŵ − W*) H_λ (Ŵ − W*)ᵀ)`` plus a constant, so running
    :func:`sparsegpt_prune` on ``W*`` with ``H`` minimises it under the sparsity
    constraint. When ``X_d = X_p`` (nothing before the layer was changed) ``W* = W``.

    With ``return_factor`` the result is ``(W*, L)``: ``L`` the lower Cholesky factor of
    ``H_λ`` (None when it needed more than ``dampening``), which :func:`sparsegpt_prune`
    takes as ``factor=`` instead of factorising ``H_λ`` again.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 4, generator=g)
        >>> w = torch.randn(3, 4, generator=g)
        >>> h = 2 * x.T @ x / 64
        >>> torch.allclose(dense_target_weight(w, h, h), w, atol=1e-5)
        True
    """
    w = weight.detach().to(torch.float32)
    h = hessian.detach().to(device=w.device, dtype=torch.float32)
    delta = w @ (cross.detach().to(device=w.device, dtype=torch.float32).T - h)  # (out, in)
    for factor in (1.0, 10.0, 100.0):  # the same retries as the factorisation in sparsegpt_prune
        chol, info = torch.linalg.cholesky_ex(_damped_hessian(h, dampening * factor))
        if int(info) == 0:
            out = (w + torch.cholesky_solve(delta.T, chol).T).to(weight.dtype)
            return (out, chol if factor == 1.0 else None) if return_factor else out
    raise CalibrationError(
        f"the layer's input Hessian is not positive definite even with dampening {dampening * 100:g} "
        "× its mean diagonal; use more calibration data or raise sparsegpt_dampening"
    )


def _damped_hessian(h: Tensor, dampening: float) -> Tensor:
    """``H`` with dead inputs (zero diagonal) set to 1 and ``dampening · mean diag`` added."""
    h = h.clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += dampening * float(diag.mean())
    return h


class _Stats(NamedTuple):
    """One layer's calibration statistics, as :func:`reconstruct_layers` uses them."""

    hessian: Tensor
    cross: Optional[Tensor]
    tokens: int
    extra_dampening: float
    mean: Optional[Tensor]
    dense_mean: Optional[Tensor]


def _layer_statistics(
    model: nn.Module,
    t: Any,
    later: Sequence[Any],
    data: Sequence,
    device: torch.device,
    target: str,
    dense_params: dict[str, Tensor],
    centered: bool = False,
    shrinkage: str = "none",
) -> tuple["_Stats", set]:
    """Run the calibration batches until ``t``'s input is seen and return ``(H, C, tokens,
    same)``: the Hessian, the dense/pruned cross product (``target='dense'``, else None),
    the token count, and the keys of the ``later`` targets that received the *very same
    input tensor* as ``t`` in every batch (q/k/v of an attention block, gate/up of a gated
    MLP). Such a target's input cannot depend on ``t``'s weight (it existed before ``t``
    ran), so the same ``H`` (and ``C``) serve it after ``t`` is updated. The pruned pass
    continues past ``t`` only until a later target is called with another input.

    With ``centered`` the Hessian and cross product are those of the centred inputs and
    the means are returned (for the bias refit); with ``shrinkage='ledoit_wolf'`` the
    Ledoit-Wolf dampening of the inputs is returned too."""
    cols = t.rows_view(t.param).shape[1]
    acc = HessianAccumulator(cols, device=t.param.device, moments=centered or shrinkage != "none")
    later_keys = {id(u.module): u.key for u in later}
    state: dict[str, Any] = {
        "token_mask": None,
        "phase": "pruned",
        "x_obj": None,
        "batch_same": set(),
        "same": None,
        "acc": acc,
    }
    if target == "dense":
        state["cross"] = torch.zeros_like(acc.sum)
        state["dense_sum"] = torch.zeros(cols, dtype=torch.float64, device=acc.sum.device)

    def after_batch() -> None:
        same = state["batch_same"] if state["x_obj"] is not None else set()
        state["same"] = same if state["same"] is None else state["same"] & same
        state["batch_same"] = set()

    state["after_batch"] = after_batch

    def hook(module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], Tensor):
            raise CalibrationError(f"layer {t.name} was called without a tensor input")
        if state["x_obj"] is not None:  # called a second time in this pass: the first input counts
            raise _StopForward
        x = layer_inputs_2d(args[0], state["token_mask"])
        if state["phase"] == "dense":
            state["x_dense"] = x
            raise _StopForward
        state["acc"].add(x)
        if target == "dense":
            xd = state.pop("x_dense").to(x.device)
            state["cross"].addmm_(x.T, xd)
            state["dense_sum"] += xd.to(torch.float64).sum(0)
        if not later_keys:
            raise _StopForward
        state["x_obj"] = args[0]
        state["x_version"] = args[0]._version  # an in-place change before a sharer breaks the sharing

    def later_hook(module: nn.Module, args: tuple) -> None:
        if state["x_obj"] is None:  # called before t: not a sharer; let the pass go on
            return
        if args and args[0] is state["x_obj"] and args[0]._version == state["x_version"] and id(module) in later_keys:
            state["batch_same"].add(later_keys[id(module)])
            return
        raise _StopForward

    handles = [t.module.register_forward_pre_hook(hook)]
    try:
        for u in later:
            if u.module is not t.module:
                handles.append(u.module.register_forward_pre_hook(later_hook))
        if target == "dense":
            _run_until_paired(model, data, device, state, dense_params)
        else:
            _run_until(model, data, device, state)
    finally:
        for handle in handles:
            handle.remove()
        state["x_obj"] = None
    if acc.count == 0:
        raise CalibrationError(f"no calibration batch reached layer {t.name}; the model never called it")
    tokens = acc.count
    cross = state.pop("cross").mul_(2.0 / acc.count) if target == "dense" else None
    dense_mean = (state.pop("dense_sum") / acc.count).to(torch.float32) if target == "dense" else None
    mean = acc.mean() if centered else None
    extra_damp = acc.ledoit_wolf_dampening(centered) if shrinkage == "ledoit_wolf" else 0.0
    h = acc.covariance_hessian() if centered else acc.hessian()
    del acc, state["acc"]  # its sum: one in × in matrix less while the layer is updated
    if cross is not None and centered:  # the cross product of centred inputs
        cross.addr_(mean.to(cross.device), dense_mean.to(cross.device), alpha=-2.0)
    return _Stats(h, cross, tokens, extra_damp, mean, dense_mean), state["same"] or set()


@torch.no_grad()
def reconstruct_layers(
    model: nn.Module,
    targets: Sequence[Any],
    masks: dict[str, Tensor],
    batches: Iterable,
    *,
    blocksize: int = 128,
    dampening: float = 0.01,
    select: str = "metric",
    priors: Optional[dict[str, Tensor]] = None,
    pattern: Optional[tuple[int, int]] = None,
    per_row: bool = False,
    target: str = "pruned",
    share_inputs: bool = True,
    bias_correction: bool = False,
    shrinkage: str = "none",
) -> dict[str, Any]:
    """Update the kept weights of each target (SparseGPT's OBS update), one layer at a time.

    For each target of ``targets`` whose key is in ``masks`` (in the given order, which
    should be the forward order), the calibration ``batches`` are run through ``model``
    until the layer's input is seen (the pass stops there), the input Hessian is built,
    the layer's weight is replaced by :func:`sparsegpt_prune` with its mask, and the
    Hessian is freed. Later layers therefore see the outputs of the updated ones.

    Args:
        model: the model, called as ``model(**batch)`` / ``model(batch)``.
        targets: :class:`~artemis.core.targets.PrunableTarget` objects (``key``, ``module``,
            ``param``, ``rows_view``).
        masks: ``{key: bool keep-mask shaped like the parameter}``.
        batches: calibration batches (iterated once per layer; materialised as a list).
        blocksize, dampening: see :func:`sparsegpt_prune`.
        select: ``metric`` keeps each mask of ``masks``; ``obs`` keeps only its pruned
            *count* per layer (or, with ``pattern``, the N:M pattern) and lets the OBS
            saliency choose which weights, as SparseGPT does. The chosen masks are
            written back into ``masks``.
        priors: ``{key: keep-mask of the previous event}`` for ``select='obs'``
            (earlier-pruned weights stay pruned).
        pattern: ``(N, M)`` kept per group, for ``select='obs'`` with an N:M pattern.
        per_row: for ``select='obs'`` without ``pattern``: every row prunes its own share
            (see :func:`sparsegpt_prune`) instead of the block's share over all rows.
        target: ``pruned`` (SparseGPT) fits each layer to its own output on the pruned
            model's inputs; ``dense`` fits it to the output of the model as it was before
            this call, from the pruned model's inputs (:func:`dense_target_weight`): each
            batch then runs twice per layer, once with a copy of the pre-call weights
            substituted (``torch.func.functional_call``).
        share_inputs: reuse a layer's Hessian for the later targets that receive the very
            same input tensor in every batch (q/k/v, gate/up), instead of rebuilding it
            with another partial forward pass; the result is identical.

    Returns:
        ``{"layers": n, "seconds": t, "peak_extra_bytes": b, "tokens": tokens per layer,
        "select": select, "target": target, "dense_copy_bytes": c}`` where
        ``peak_extra_bytes`` is :func:`reconstruction_extra_bytes` of the largest layer and
        ``dense_copy_bytes`` the pre-event copy of the pruned weights (0 unless ``target``
        is ``dense``); also ``"passes"`` (partial forward passes run) and
        ``"shared_hessians"`` (layers that reused an earlier layer's Hessian).

    Raises:
        CalibrationError: bad or empty calibration data, or a layer that no batch reaches.
    """
    if select not in ("metric", "obs"):
        raise ValueError(f"select must be 'metric' or 'obs', got {select!r}")
    if target not in ("pruned", "dense"):
        raise ValueError(f"target must be 'pruned' or 'dense', got {target!r}")
    if per_row and (select != "obs" or pattern is not None):
        raise ValueError("per_row=True applies only with select='obs' and no pattern")
    data = check_calibration_batches(batches)
    chosen = [t for t in targets if t.key in masks]
    dense_params: dict[str, Tensor] = {}
    if target == "dense":  # the weights before this event, substituted for the dense passes
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        dense_params = {names[id(t.param)]: t.param.detach().clone() for t in chosen if id(t.param) in names}
        if bias_correction:  # the refitted biases change too: the dense passes keep the old ones
            for t in chosen:
                b = getattr(t.module, "bias", None)
                if isinstance(b, Tensor) and id(b) in names:
                    dense_params[names[id(b)]] = b.detach().clone()
    copy_bytes = sum(p.numel() * p.element_size() for p in dense_params.values())
    device = model_device(model)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    peak = 0
    tokens = 0
    passes = reused = 0
    try:
        shared: dict[str, _Stats] = {}  # statistics of layers seen sharing an input
        for idx, t in enumerate(chosen):
            weight = t.rows_view(t.param)  # (out, in)
            bias = getattr(t.module, "bias", None)
            fit_bias = bias_correction and isinstance(bias, Tensor) and bias.numel() == weight.shape[0]
            if t.key in shared:  # same input tensor as an earlier target: the same Hessian
                stats = shared.pop(t.key)
                reused += 1
            else:
                stats, same = _layer_statistics(
                    model,
                    t,
                    chosen[idx + 1 :] if share_inputs else [],
                    data,
                    device,
                    target,
                    dense_params,
                    centered=fit_bias,
                    shrinkage=shrinkage,
                )
                passes += 1
                for u in chosen[idx + 1 :]:
                    if u.key in same:
                        shared[u.key] = stats
            h, tokens = stats.hessian, stats.tokens
            if fit_bias and stats.mean is None:  # shared from a layer without a bias: plain statistics
                fit_bias = False
            elif not fit_bias and stats.mean is not None:  # centred statistics from a sharer with a bias
                h = h.addr(stats.mean.to(h.device), stats.mean.to(h.device), alpha=2.0)
            damp = dampening + stats.extra_dampening
            ref_out = mean_p = None
            if fit_bias:
                mean_p = stats.mean.to(weight.device)
                mu_ref = stats.dense_mean if stats.dense_mean is not None else stats.mean
                ref_out = weight.detach().to(torch.float32) @ mu_ref.to(weight.device)  # W μ_dense
            if target == "dense":
                cross = stats.cross
                if cross is not None and stats.mean is not None and not fit_bias:
                    cross = cross.addr(stats.mean.to(cross.device), stats.dense_mean.to(cross.device), alpha=2.0)
                weight, factor = dense_target_weight(weight, h, cross, damp, return_factor=True)
                del cross
            else:
                factor = None
            mask = t.rows_view(masks[t.key].to(weight.device))
            if select == "metric":
                new_w, _ = sparsegpt_prune(weight, h, mask=mask, blocksize=blocksize, dampening=damp, factor=factor)
            else:
                prior = priors.get(t.key) if priors else None
                new_w, keep = sparsegpt_prune(
                    weight,
                    h,
                    sparsity=None if pattern is not None else int((~mask).sum()) / mask.numel(),
                    pattern=pattern,
                    prior=t.rows_view(prior.to(weight.device)) if prior is not None else None,
                    blocksize=blocksize,
                    dampening=damp,
                    per_row=per_row,
                    factor=factor,
                )
                masks[t.key] = t.rows_view(keep).contiguous()
            del h, stats, factor
            if fit_bias:  # b + W μ_d − Ŵ μ_p: the mean output the dense layer gave
                shift = ref_out - new_w.to(torch.float32) @ mean_p
                bias.add_(shift.to(bias.dtype))
            t.param.copy_(t.rows_view(new_w))
            rows, cols = weight.shape
            del new_w, weight  # free this layer's float32 result (and W*) before the next layer's Hessian
            obs = select == "obs" and pattern is None
            peak = max(peak, reconstruction_extra_bytes(rows, cols, blocksize, target == "dense", obs))
    finally:
        model.train(was_training)
        dense_params.clear()
    seconds = time.perf_counter() - start
    logger.info("SparseGPT reconstruction of %d layers took %.1fs", len(chosen), seconds)
    return {
        "layers": len(chosen),
        "seconds": seconds,
        "peak_extra_bytes": peak,
        "tokens": tokens,
        "select": select,
        "target": target,
        "dense_copy_bytes": copy_bytes,
        "passes": passes,
        "shared_hessians": reused,
    }
