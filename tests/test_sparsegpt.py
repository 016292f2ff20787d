"""SparseGPT's variants: the Ledoit-Wolf shrinkage, the bias refit and the ``sparsegpt_variant`` key."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from artemis import create_pruning_manager
from artemis.core.config import load_pruning_config
from artemis.core.errors import ConfigError
from artemis.methods.sparsegpt import (
    SPARSEGPT_VARIANT_SETTINGS,
    HessianAccumulator,
    reconstruct_layers,
    reconstruction_extra_bytes,
)
from tests.fixtures import lm_batch, tiny_llama

# four tokens, each twice: S = XᵀX/n = diag(2.5, 0.5)
_X = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 1.0]])


def _acc() -> HessianAccumulator:
    acc = HessianAccumulator(2, moments=True)
    acc.add(_X)
    acc.add(_X)
    return acc


def test_ledoit_wolf_intensity_hand_computed():
    # m = 1.5, δ² = ‖S − mI‖² = 2, Σ‖x‖⁴/n = 168/8 = 21, ‖S‖² = 6.5,
    # β² = (21 − 6.5)/8 = 1.8125, α = 1.8125/2 = 0.90625, α/(1−α) = 29/3
    assert _acc().ledoit_wolf_dampening() == pytest.approx(29 / 3, rel=1e-12)
    # centred: μ = (1, 0.5), S = [[1.5, −0.5], [−0.5, 0.25]], m = 0.875, δ² = 1.28125,
    # Σ‖x−μ‖⁴/n = 42.5/8, ‖S‖² = 2.8125, β² = 0.3125, α = 10/41, α/(1−α) = 10/31
    assert _acc().ledoit_wolf_dampening(centered=True) == pytest.approx(10 / 31, rel=1e-12)


def test_ledoit_wolf_matches_the_definition_and_shrinks_with_more_tokens():
    g = torch.Generator().manual_seed(0)
    d = 6
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    ratios = []
    for n in (20, 200, 2000):
        x = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.5).to(torch.float32)
        acc = HessianAccumulator(d, moments=True)
        acc.add(x[: n // 2])
        acc.add(x[n // 2 :])
        for centered in (False, True):
            y = x.double() - (x.double().mean(0) if centered else 0.0)
            s = y.T @ y / n
            m = s.diagonal().mean()
            delta2 = float(((s - m * torch.eye(d, dtype=torch.float64)) ** 2).sum())
            beta2 = sum(float(((torch.outer(r, r) - s) ** 2).sum()) for r in y) / n**2
            alpha = min(beta2, delta2) / delta2
            assert acc.ledoit_wolf_dampening(centered) == pytest.approx(alpha / (1 - alpha), rel=1e-5)
        ratios.append(acc.ledoit_wolf_dampening())
    assert ratios[0] > ratios[1] > ratios[2]


def test_moments_are_kept_only_when_asked():
    plain = HessianAccumulator(2)
    plain.add(_X)
    with pytest.raises(ValueError, match="create it with moments=True for the mean"):
        plain.mean()
    with pytest.raises(ValueError, match="create it with moments=True for the shrinkage"):
        plain.ledoit_wolf_dampening()
    assert torch.equal(plain.hessian(), _acc().hessian())


def test_covariance_hessian_and_mean():
    acc = _acc()
    assert acc.mean().tolist() == [1.0, 0.5]
    assert acc.covariance_hessian().tolist() == [[3.0, -1.0], [-1.0, 0.5]]  # 2 · cov


class _Target:
    """A minimal target for reconstruct_layers: one nn.Linear."""

    def __init__(self, module: nn.Linear) -> None:
        self.key = self.name = "lin"
        self.module, self.param = module, module.weight

    @staticmethod
    def rows_view(t: torch.Tensor) -> torch.Tensor:
        return t


def _linear_problem(seed: int = 0, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) + torch.linspace(-2.0, 2.0, 8)  # inputs with a mean
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 8, generator=g))
        lin.bias.copy_(torch.randn(4, generator=g))
    return x, lin


@pytest.mark.parametrize("select", ["metric", "obs"])
def test_bias_refit_keeps_the_mean_output_and_lowers_the_error(select):
    x, lin = _linear_problem()
    ref = lin(x).detach()
    mask = torch.tensor([[True, False] * 4] * 4)
    errors = {}
    for fit in (False, True):
        layer = nn.Linear(8, 4)
        layer.load_state_dict(lin.state_dict())
        masks = {"lin": mask.clone()}
        reconstruct_layers(layer, [_Target(layer)], masks, [x], select=select, bias_correction=fit, dampening=1e-6)
        out = layer(x).detach()
        assert bool((layer.weight[~masks["lin"]] == 0).all())
        if fit:  # the refitted bias gives back the dense layer's mean output exactly
            torch.testing.assert_close(out.mean(0), ref.mean(0), rtol=0, atol=1e-5)
        else:
            assert torch.equal(layer.bias, lin.bias)
        errors[fit] = float(((out - ref) ** 2).mean())
    assert errors[True] < errors[False]


def test_bias_refit_without_bias_is_the_plain_update():
    x, lin = _linear_problem()
    results = []
    mask = torch.rand(4, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    for fit in (False, True):
        layer = nn.Linear(8, 4, bias=False)
        with torch.no_grad():
            layer.weight.copy_(lin.weight)
        reconstruct_layers(layer, [_Target(layer)], {"lin": mask.clone()}, [x], bias_correction=fit)
        results.append(layer.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_variant_settings_and_overrides():
    cfg = load_pruning_config({"pruning": {"reconstruction": "sparsegpt"}})
    assert cfg.sparsegpt_variant == "artemis"
    for key, value in SPARSEGPT_VARIANT_SETTINGS["artemis"].items():
        assert getattr(cfg, key) == value
    assert (cfg.sparsegpt_mask, cfg.sparsegpt_shrinkage, cfg.sparsegpt_bias_correction) == ("obs", "ledoit_wolf", True)
    assert (cfg.sparsegpt_obs_scope, cfg.sparsegpt_target, cfg.sparsegpt_dampening) == ("row", "dense", 0.2)
    paper = load_pruning_config({"pruning": {"reconstruction": "sparsegpt", "sparsegpt_variant": "paper"}})
    assert (
        paper.sparsegpt_mask,
        paper.sparsegpt_obs_scope,
        paper.sparsegpt_target,
        paper.sparsegpt_dampening,
        paper.sparsegpt_shrinkage,
        paper.sparsegpt_bias_correction,
    ) == ("obs", "layer", "pruned", 0.01, "none", False)
    mixed = load_pruning_config(
        {"pruning": {"reconstruction": "sparsegpt", "sparsegpt_variant": "paper", "sparsegpt_bias_correction": True}}
    )
    assert mixed.sparsegpt_bias_correction is True and mixed.sparsegpt_shrinkage == "none"
    # a pattern or a metric mask: the variant's per-row scope does not apply, the layer scope does
    assert load_pruning_config({"pruning": {"reconstruction": "sparsegpt", "pattern": "2:4"}}).sparsegpt_obs_scope == (
        "layer"
    )
    metric = load_pruning_config({"pruning": {"reconstruction": "sparsegpt", "sparsegpt_mask": "metric"}})
    assert metric.sparsegpt_obs_scope == "layer"
    # the options of another method are still refused when set
    load_pruning_config({"pruning": {"method": "layer_dropout"}})
    with pytest.raises(ConfigError, match="sparsegpt_shrinkage"):
        load_pruning_config({"pruning": {"method": "layer_dropout", "sparsegpt_shrinkage": "none"}})


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"sparsegpt_variant": "exact"}, r"sparsegpt_variant 'exact'; valid: 'artemis', 'paper'"),
        ({"sparsegpt_shrinkage": "oas"}, r"sparsegpt_shrinkage 'oas'; valid: 'none', 'ledoit_wolf'"),
        ({"pattern": "2:4", "sparsegpt_obs_scope": "row"}, r"sparsegpt_obs_scope 'row' only applies"),
    ],
)
def test_variant_config_errors(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_pruning_config({"pruning": {"reconstruction": "sparsegpt", **extra}})


def test_default_and_paper_variants_on_tiny_llama():
    calib = [{"input_ids": lm_batch(seed=i, seq=16)["input_ids"]} for i in range(3)]
    dense = tiny_llama()
    errs = {}
    for variant in ("paper", "artemis"):
        model = tiny_llama()
        mgr = create_pruning_manager({"pruning": {"reconstruction": "sparsegpt", "sparsegpt_variant": variant}}, model)
        mgr.apply_pruning(0.5, calibration_data=calib)
        for t in mgr.method.targets:  # per row (artemis) or per layer (paper): exactly half of each layer
            rows = t.rows_view(mgr.masks[t.key])
            assert int(rows.sum()) == rows.numel() // 2
            if variant == "artemis":
                assert rows.sum(1).tolist() == [rows.shape[1] // 2] * rows.shape[0]
        with torch.no_grad():
            errs[variant] = sum(float(((model(**b).logits - dense(**b).logits) ** 2).mean()) for b in calib)
    assert errs["artemis"] < errs["paper"]


@pytest.mark.parametrize("shapes, blocksize", [([(64, 256)], 128), ([(256, 64)], 8), ([(32, 32), (32, 32)], 16)])
def test_artemis_settings_stay_within_the_stated_memory_bound(shapes, blocksize):
    from tests.test_advanced_pruning import _measured_reconstruction

    options = {"select": "obs", "per_row": True, "target": "dense", "bias_correction": True, "shrinkage": "ledoit_wolf"}
    peak, rec = _measured_reconstruction(shapes, blocksize, **options)
    assert rec["peak_extra_bytes"] == max(reconstruction_extra_bytes(o, i, blocksize, True, True) for o, i in shapes)
    assert peak <= rec["peak_extra_bytes"] + rec["dense_copy_bytes"]
