"""Issue 9: SparseGPT reconstruction, N:M patterns, OWL layer-wise sparsity, sparse inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from artemis import create_pruning_manager
from artemis.core.config import load_pruning_config, parse_nm_pattern
from artemis.core.errors import CalibrationError, ConfigError, ModelError
from artemis.core.masks import count_to_prune
from artemis.methods.owl import allocate_counts, outlier_ratio, owl_sparsities
from artemis.methods.sparsegpt import (
    HessianAccumulator,
    dense_target_weight,
    reconstruct_layers,
    reconstruction_extra_bytes,
    sparsegpt_prune,
)
from artemis.sparse.inference import SparseLinear, sparsify_for_inference
from tests.fixtures import lm_batch, tiny_gpt2, tiny_llama


def _calib(n: int = 3, seq: int = 16) -> list[dict]:
    return [{"input_ids": lm_batch(seed=i, seq=seq)["input_ids"]} for i in range(n)]


def _one_linear(weight: torch.Tensor) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        net[0].weight.copy_(weight)
    return net


# ----------------------------------------------------------------------------- config
def test_pattern_config_sets_final_sparsity_and_normalises():
    cfg = load_pruning_config({"pruning": {"pattern": " 2 : 4 "}})
    assert cfg.pattern == "2:4" and cfg.final_sparsity == 0.5
    assert load_pruning_config({"pruning": {"pattern": "4:8", "final_sparsity": 0.5}}).final_sparsity == 0.5
    assert parse_nm_pattern("1:8") == (1, 8)


@pytest.mark.parametrize(
    "section, match",
    [
        ({"pattern": "4:2"}, r"pruning.pattern: pattern is not valid: write 'N:M'.*got '4:2'"),
        ({"pattern": "2-4"}, r"pattern is not valid.*got '2-4'"),
        ({"pattern": "2:4", "final_sparsity": 0.6}, r"prunes exactly 0.5 of every group, but final_sparsity is 0.6"),
        ({"pattern": "2:4", "scope": "row"}, r"scope 'row' does not apply with pattern '2:4'"),
        ({"pattern": "2:4", "layer_sparsity": {"*": 0.5}}, r"layer_sparsity does not apply with pattern"),
        ({"scope": "owl", "layer_sparsity": {"*": 0.5}}, r"layer_sparsity does not apply with scope 'owl'"),
        ({"scope": "owl", "owl_lambda": 0.0}, r"owl_lambda must be in \(0, 0.5\], got 0.0"),
        ({"owl_m": -1}, r"owl_m must be > 0"),
        ({"reconstruction": "obs"}, r"unknown reconstruction 'obs'; valid: 'none', 'sparsegpt'"),
        ({"sparsegpt_dampening": 0}, r"sparsegpt_dampening must be in \(0, 1\]"),
        ({"sparsegpt_blocksize": 0}, r"sparsegpt_blocksize must be at least 1"),
        ({"sparsegpt_obs_scope": "rows"}, r"unknown sparsegpt_obs_scope 'rows'; valid: 'layer', 'row'"),
        (
            {"sparsegpt_obs_scope": "row", "sparsegpt_mask": "metric"},
            r"sparsegpt_obs_scope 'row' only applies with sparsegpt_mask: obs and no pattern "
            r"\(sparsegpt_mask is 'metric'",
        ),
        (
            {"sparsegpt_obs_scope": "row", "sparsegpt_mask": "obs", "pattern": "2:4"},
            r"sparsegpt_obs_scope 'row' only applies.*pattern is '2:4'",
        ),
        ({"sparsegpt_target": "teacher"}, r"unknown sparsegpt_target 'teacher'; valid: 'pruned', 'dense'"),
        ({"scope": "owls"}, r"unknown scope 'owls'; valid: 'global', 'layer', 'row', 'owl'"),
    ],
)
def test_config_errors(section, match):
    with pytest.raises(ConfigError, match=match):
        load_pruning_config({"pruning": section})


# ----------------------------------------------------------------------------- N:M
def test_nm_2_4_hand_computed_mask():
    w = torch.tensor(
        [
            [0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -3.0, 0.0],
            [1.0, 1.0, 1.0, 1.0, -0.5, 0.6, -0.7, 0.8],
        ]
    )
    net = _one_linear(w)
    mgr = create_pruning_manager({"pruning": {"targets": ["*"], "pattern": "2:4"}}, net)
    mgr.apply_magnitude_pruning(0.5)
    expected = [[0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1]]  # ties: lower index pruned first
    assert mgr.masks["0.weight"].int().tolist() == expected
    assert torch.equal(net[0].weight, w * torch.tensor(expected, dtype=torch.float32))


def test_nm_4_8_and_intermediate_sparsity_hand_computed():
    w = torch.arange(1.0, 17.0).reshape(2, 8) * torch.tensor([1, -1, 1, -1, 1, -1, 1, -1.0])
    net = _one_linear(w.flip(1))
    mgr = create_pruning_manager({"pruning": {"targets": ["*"], "pattern": "4:8"}}, net)
    mgr.apply_magnitude_pruning(0.25)  # 2 of every 8 pruned: the two smallest |w| (last two columns)
    assert mgr.masks["0.weight"].int().tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]] * 2
    with pytest.raises(
        ConfigError, match=r"sparsity 0.3 is not reachable with pattern '4:8'.*0, 0.125, 0.25, 0.375, 0.5"
    ):
        mgr.apply_magnitude_pruning(0.3)
    mgr.apply_magnitude_pruning(0.5)
    assert mgr.masks["0.weight"].int().tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]] * 2


@pytest.mark.parametrize("metric_pattern", ["2:4", "4:8"])
def test_nm_exact_counts_on_llama_and_gpt2(metric_pattern):
    n, m = parse_nm_pattern(metric_pattern)
    for model in (tiny_llama(), tiny_gpt2()):
        mgr = create_pruning_manager({"pruning": {"pattern": metric_pattern}}, model)
        mgr.apply_magnitude_pruning(1 - n / m)
        for t in mgr.method.targets:
            rows = t.rows_view(mgr.masks[t.key])  # (out, in): groups run along the inputs
            kept = rows.reshape(rows.shape[0], -1, m).sum(-1)
            assert bool((kept == n).all()), t.key
            assert int(torch.count_nonzero(t.param)) <= rows.numel() * n // m
        assert mgr.get_pruning_summary()["pattern"] == metric_pattern


def test_nm_progressive_prunes_round_s_m_per_group():
    model = tiny_llama()
    mgr = create_pruning_manager(
        {
            "pruning": {
                "pattern": "4:8",
                "pruning_start": 0.0,
                "pruning_end": 1.0,
                "pruning_interval": 1,
                "schedule": "linear",
                "initial_sparsity": 0.0,
            }
        },
        model,
        total_steps=4,
    )
    seen = []
    for _ in range(4):
        mgr.step()
        t = mgr.method.targets[0]
        rows = t.rows_view(mgr.masks[t.key])
        pruned = (~rows).reshape(rows.shape[0], -1, 8).sum(-1)
        assert pruned.unique().numel() == 1
        seen.append(int(pruned[0, 0]))
    assert seen == [count_to_prune(8, mgr.target_sparsity_at(i)) for i in range(4)]
    assert seen[-1] == 4


def test_nm_rejects_indivisible_layer():
    net = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(
        ModelError, match=r"pattern '2:4': layer 0 has weight \(out, in\) = \(4, 6\); its in_features must divide by 4"
    ):
        create_pruning_manager({"pruning": {"targets": ["*"], "pattern": "2:4"}}, net)


# ----------------------------------------------------------------------------- SparseGPT (pure)
def _layer_problem(seed=0, out=24, inp=32, n=400):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inp, generator=g) @ torch.randn(inp, inp, generator=g)  # correlated inputs
    w = torch.randn(out, inp, generator=g)
    return x, w, 2 * x.T @ x / n


def test_hessian_accumulator_matches_formula():
    x, _, h = _layer_problem()
    acc = HessianAccumulator(x.shape[1])
    acc.add(x[:150])
    acc.add(x[150:])
    assert acc.count == x.shape[0]
    torch.testing.assert_close(acc.hessian(), h, rtol=1e-4, atol=1e-3)
    with pytest.raises(CalibrationError, match="saw no calibration tokens"):
        HessianAccumulator(3).hessian()


@pytest.mark.parametrize("blocksize", [8, 128])
def test_sparsegpt_fixed_mask_reduces_output_error(blocksize):
    x, w, h = _layer_problem()
    mask = w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values
    new_w, keep = sparsegpt_prune(w, h, mask=mask, blocksize=blocksize)
    assert torch.equal(keep, mask)
    assert bool((new_w[~mask] == 0).all())
    assert not torch.equal(new_w[mask], w[mask])  # kept weights were updated
    err = lambda v: float(((x @ (w - v).T) ** 2).mean())  # noqa: E731
    assert err(new_w) < 0.9 * err(w * mask)


def test_sparsegpt_chooses_mask_with_exact_counts_and_prior():
    x, w, h = _layer_problem(seed=1)
    new_w, keep = sparsegpt_prune(w, h, sparsity=0.6, blocksize=8)
    assert int((~keep).sum()) == count_to_prune(w.numel(), 0.6)
    assert bool((new_w[~keep] == 0).all())
    err = lambda v: float(((x @ (w - v).T) ** 2).mean())  # noqa: E731
    mag = w.abs() > w.abs().flatten().kthvalue(count_to_prune(w.numel(), 0.6)).values
    assert err(new_w) < err(w * mag)
    _, keep24 = sparsegpt_prune(w, h, pattern=(2, 4))
    assert bool((keep24.reshape(w.shape[0], -1, 4).sum(-1) == 2).all())
    prior = torch.ones_like(keep)
    prior[:, :3] = False  # pruned at an earlier event: must stay pruned
    _, keep_p = sparsegpt_prune(w, h, sparsity=0.5, prior=prior, blocksize=8)
    assert not bool(keep_p[:, :3].any())
    assert int((~keep_p).sum()) == count_to_prune(w.numel(), 0.5)


def test_sparsegpt_obs_scope_row_vs_layer_hand_computed():
    # H = I: the damped inverse is diagonal and constant, so the OBS saliency is w² and no
    # kept weight moves; the masks can be worked out by hand.
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]])
    h = torch.eye(4)
    new_w, keep = sparsegpt_prune(w, h, sparsity=0.5, per_row=True)
    assert keep.tolist() == [[False, False, True, True], [True, True, False, False]]
    torch.testing.assert_close(new_w, w * keep)
    _, keep_layer = sparsegpt_prune(w, h, sparsity=0.5)  # the paper: the 4 smallest of the layer
    assert keep_layer.tolist() == [[False, False, False, False], [True, True, True, True]]
    # blocks of 2 columns: each row prunes 1 of each block (its share), then the rest
    _, keep_b = sparsegpt_prune(w, h, sparsity=0.5, per_row=True, blocksize=2)
    assert keep_b.tolist() == [[False, True, False, True], [True, False, True, False]]
    # an earlier event's pruned weight stays pruned and counts towards the row's share
    prior = torch.ones(2, 4, dtype=torch.bool)
    prior[1, 0] = False
    _, keep_p = sparsegpt_prune(w, h, sparsity=0.5, per_row=True, prior=prior)
    assert keep_p.tolist() == [[False, False, True, True], [False, True, True, False]]


def test_sparsegpt_per_row_exact_counts_on_correlated_inputs():
    x, w, h = _layer_problem(seed=2)
    new_w, keep = sparsegpt_prune(w, h, sparsity=0.6, per_row=True, blocksize=8)
    assert (~keep).sum(1).tolist() == [count_to_prune(w.shape[1], 0.6)] * w.shape[0]
    assert bool((new_w[~keep] == 0).all())
    err = lambda v: float(((x @ (w - v).T) ** 2).mean())  # noqa: E731
    assert err(new_w) < err(w * keep)  # the kept weights were updated


def test_dense_target_weight_is_the_least_squares_fit():
    g = torch.Generator().manual_seed(3)
    x_p = torch.randn(400, 6, generator=g)
    x_d = x_p + 0.5 * torch.randn(400, 6, generator=g)  # the dense model's inputs differ
    w = torch.randn(3, 6, generator=g)
    h, c = 2 * x_p.T @ x_p / 400, 2 * x_p.T @ x_d / 400
    lstsq = torch.linalg.lstsq(x_p, x_d @ w.T).solution.T  # argmin ‖W X_d − Ŵ X_p‖
    torch.testing.assert_close(dense_target_weight(w, h, c, dampening=1e-7), lstsq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense_target_weight(w, h, h), w, rtol=1e-5, atol=1e-5)  # same inputs: W
    # the damping pulls towards W: ridge (H + λI)⁻¹ with λ = 0.5 · mean diag H
    lam = 0.5 * float(h.diagonal().mean())
    ridge = w @ (c.T + lam * torch.eye(6)) @ torch.linalg.inv(h + lam * torch.eye(6))
    torch.testing.assert_close(dense_target_weight(w, h, c, dampening=0.5), ridge, rtol=1e-4, atol=1e-4)


def test_sparsegpt_errors():
    _, w, h = _layer_problem()
    with pytest.raises(ValueError, match="give either mask= or sparsity=/pattern="):
        sparsegpt_prune(w, h)
    with pytest.raises(ValueError, match=r"Hessian has shape \(3, 3\); expected \(32, 32\)"):
        sparsegpt_prune(w, torch.eye(3), sparsity=0.5)
    with pytest.raises(ValueError, match="pattern 2:5 needs"):
        sparsegpt_prune(w, h, pattern=(2, 5))
    with pytest.raises(ValueError, match=r"per_row=True applies only when the mask is chosen here with sparsity="):
        sparsegpt_prune(w, h, mask=torch.ones_like(w, dtype=torch.bool), per_row=True)
    with pytest.raises(ValueError, match=r"per_row=True applies only when the mask is chosen here"):
        sparsegpt_prune(w, h, pattern=(2, 4), per_row=True)


# ----------------------------------------------------------------------------- SparseGPT (memory, measured)
def _peak_allocated_bytes(fn) -> int:
    """Run ``fn()`` with PyTorch's profiler recording every CPU tensor allocation and free, and
    return the highest number of bytes allocated during the call and not yet freed. This is
    what the tensors take (what ``reconstruction_extra_bytes`` counts), without the malloc
    and LAPACK overhead that a process's RSS adds. (``torch.profiler.profile`` records the
    same events but turns every op into Python objects afterwards: seconds here.)"""
    from torch._C._profiler import ProfilerActivity, _ExperimentalConfig
    from torch.autograd import ProfilerConfig, ProfilerState, _disable_profiler, _enable_profiler, _prepare_profiler

    # state, report_input_shapes, profile_memory, with_stack, with_flops, with_modules, experimental
    config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
    activities = {ProfilerActivity.CPU}
    _prepare_profiler(config, activities)
    _enable_profiler(config, activities)
    try:
        fn()
    finally:
        result = _disable_profiler()
    events = sorted((e for e in result.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocation"
    live = peak = 0
    for e in events:
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def _measured_reconstruction(shapes, blocksize, **options):
    """``reconstruct_layers`` over a chain of linear layers of ``(out, in)`` ``shapes`` (each
    layer's input is the previous one's output), half of each layer's weights pruned by
    magnitude: ``(peak allocated bytes, reconstruct_layers' result)``."""
    torch.manual_seed(0)
    layers = []
    for out_f, in_f in shapes:
        layers += [nn.Linear(in_f, out_f), nn.ReLU()]
    net = nn.Sequential(*layers[:-1])
    names = [str(2 * i) for i in range(len(shapes))]
    mgr = create_pruning_manager({"pruning": {"scope": "layer", "targets": names}}, net)
    targets = mgr.method.targets
    assert [t.name for t in targets] == names
    keep = {t.key: t.param.detach().abs() > t.param.detach().abs().median() for t in targets}
    calib = [torch.randn(2, 16, shapes[0][1]) for _ in range(2)]
    out: dict = {}
    peak = _peak_allocated_bytes(
        lambda: out.update(reconstruct_layers(net, targets, keep, calib, blocksize=blocksize, **options))
    )
    return peak, out


MODES = {
    "metric mask": {},
    "obs, per layer": {"select": "obs"},
    "obs, per row": {"select": "obs", "per_row": True},
    "obs, 2:4": {"select": "obs", "pattern": (2, 4)},
    "dense target": {"target": "dense"},
    "dense target, obs per row": {"target": "dense", "select": "obs", "per_row": True},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "shapes, blocksize",
    [([(64, 256)], 128), ([(256, 64)], 8), ([(256, 64)], 128), ([(64, 16), (16, 64)], 128), ([(32, 32), (32, 32)], 16)],
)
def test_sparsegpt_measured_memory_is_within_the_stated_bound(mode, shapes, blocksize):
    """The peak of the tensors allocated during ``reconstruct_layers`` (measured by the
    profiler) stays under the bound it reports (``reconstruction_extra_bytes`` of its largest
    layer, plus the dense copy of the weights for a dense target), and the bound is not loose
    (at least 40% of it is used)."""
    options = MODES[mode]
    peak, rec = _measured_reconstruction(shapes, blocksize, **options)
    obs = options.get("select") == "obs" and options.get("pattern") is None
    dense_target = options.get("target") == "dense"
    assert rec["peak_extra_bytes"] == max(
        reconstruction_extra_bytes(o, i, blocksize, dense_target, obs) for o, i in shapes
    )
    bound = rec["peak_extra_bytes"] + rec["dense_copy_bytes"]
    assert 0.4 * bound <= peak <= bound


# ----------------------------------------------------------------------------- SparseGPT (manager)
def _logit_err(model, ref_model, batches):
    with torch.no_grad():
        return sum(float(((model(**b).logits - ref_model(**b).logits) ** 2).mean()) for b in batches)


def test_manager_sparsegpt_keeps_masks_and_lowers_error():
    dense = tiny_llama()
    calib = _calib()
    plain = tiny_llama()
    m1 = create_pruning_manager({"pruning": {"scope": "layer"}}, plain)
    m1.apply_pruning(0.6)
    rec = tiny_llama()
    m2 = create_pruning_manager(
        {
            "pruning": {
                "scope": "layer",
                "reconstruction": "sparsegpt",
                "sparsegpt_variant": "paper",
                "sparsegpt_mask": "metric",
            }
        },
        rec,
    )
    m2.apply_pruning(0.6, calibration_data=calib)
    assert m2.last_reconstruction["layers"] == len(m2.method.targets) == 14
    assert m2.last_reconstruction["tokens"] == 3 * 2 * 16  # batches × rows × tokens
    assert m2.last_reconstruction["peak_extra_bytes"] == max(
        reconstruction_extra_bytes(128, 64), reconstruction_extra_bytes(64, 128)
    )  # the largest layer: down_proj (64 out, 128 in)
    for key in m1.masks:
        assert torch.equal(m1.masks[key], m2.masks[key])
        assert bool((m2._params[key][~m2.masks[key]] == 0).all())
    assert _logit_err(rec, dense, calib) < _logit_err(plain, dense, calib)
    assert m2.get_pruning_summary()["last_reconstruction"]["select"] == "metric"


def test_manager_sparsegpt_obs_mode_with_2_4():
    model = tiny_llama()
    mgr = create_pruning_manager(
        {"pruning": {"pattern": "2:4", "reconstruction": "sparsegpt", "sparsegpt_mask": "obs"}}, model
    )
    mgr.apply_pruning(0.5, calibration_data=_calib(2))
    for t in mgr.method.targets:
        rows = t.rows_view(mgr.masks[t.key])
        assert bool((rows.reshape(rows.shape[0], -1, 4).sum(-1) == 2).all())
        assert bool((t.param[~mgr.masks[t.key]] == 0).all())


def test_manager_sparsegpt_dense_target_and_row_scope():
    dense = tiny_llama()
    calib = _calib()
    cfg = {"scope": "layer", "reconstruction": "sparsegpt", "sparsegpt_variant": "paper"}
    runs = {}
    for name, extra in (
        ("pruned", {}),
        ("dense", {"sparsegpt_target": "dense"}),
        ("row", {"sparsegpt_obs_scope": "row"}),
    ):
        model = tiny_llama()
        mgr = create_pruning_manager({"pruning": {**cfg, **extra}}, model)
        mgr.apply_pruning(0.5, calibration_data=calib)
        runs[name] = (model, mgr)
        for t in mgr.method.targets:
            assert bool((t.param[~mgr.masks[t.key]] == 0).all())
    first = runs["pruned"][1].method.targets[0].key  # nothing before it changed: the same result
    torch.testing.assert_close(runs["dense"][1]._params[first], runs["pruned"][1]._params[first], rtol=1e-4, atol=1e-5)
    assert _logit_err(runs["dense"][0], dense, calib) < _logit_err(runs["pruned"][0], dense, calib)
    for t in runs["row"][1].method.targets:  # every row keeps exactly half
        rows = t.rows_view(runs["row"][1].masks[t.key])
        assert rows.sum(1).tolist() == [rows.shape[1] // 2] * rows.shape[0]
    rec = runs["dense"][1].last_reconstruction
    assert rec["target"] == "dense" and runs["pruned"][1].last_reconstruction["dense_copy_bytes"] == 0
    assert rec["dense_copy_bytes"] == 4 * sum(t.param.numel() for t in runs["dense"][1].method.targets)
    assert rec["peak_extra_bytes"] == reconstruction_extra_bytes(
        64, 128, dense_target=True, obs=True
    )  # down_proj, OBS choice
    with pytest.raises(ValueError, match="target must be 'pruned' or 'dense', got 'x'"):
        reconstruct_layers(dense, runs["pruned"][1].method.targets, {}, calib, target="x")
    with pytest.raises(ValueError, match="per_row=True applies only with select='obs' and no pattern"):
        reconstruct_layers(dense, runs["pruned"][1].method.targets, {}, calib, per_row=True)


@pytest.mark.parametrize("target", ["pruned", "dense"])
def test_reconstruct_layers_shares_hessians_of_same_input_layers(target):
    calib = _calib()
    results = {}
    for share in (True, False):
        model = tiny_llama()
        mgr = create_pruning_manager({"pruning": {"scope": "layer"}}, model)
        targets = mgr.method.targets
        keep = {t.key: t.param.detach().abs() > t.param.detach().abs().median() for t in targets}
        rec = reconstruct_layers(model, targets, keep, calib, target=target, share_inputs=share)
        results[share] = ({t.key: t.param.detach().clone() for t in targets}, rec)
    # per block: q/k/v share one input, gate/up another; o and down have their own
    assert results[True][1]["passes"] == 2 * 4 and results[True][1]["shared_hessians"] == 2 * 3
    assert results[False][1]["passes"] == 14 and results[False][1]["shared_hessians"] == 0
    for key, w in results[True][0].items():
        assert torch.equal(w, results[False][0][key]), key


def test_sparsegpt_needs_calibration_data():
    mgr = create_pruning_manager({"pruning": {"reconstruction": "sparsegpt"}}, tiny_llama())
    with pytest.raises(
        CalibrationError, match=r"reconstruction: sparsegpt needs calibration batches.*set_calibration_data"
    ):
        mgr.apply_pruning(0.5)
    with pytest.raises(CalibrationError, match=r"reconstruction: sparsegpt needs calibration batches"):
        mgr.apply_magnitude_pruning(0.5)
    assert not mgr.masks  # nothing changed
    mgr2 = create_pruning_manager({"pruning": {"reconstruction": "sparsegpt"}}, tiny_llama(), total_steps=10)
    with pytest.raises(CalibrationError, match="needs calibration batches at every pruning event"):
        mgr2.step()
    with pytest.raises(CalibrationError, match="calibration data is empty"):
        mgr2.set_calibration_data([])
    with pytest.raises(CalibrationError, match="calibration batch 0 is a str"):
        mgr2.set_calibration_data(["text"])


def test_sparsegpt_progressive_runs_at_each_event_and_masks_shrink():
    model = tiny_llama()
    mgr = create_pruning_manager(
        {
            "pruning": {
                "reconstruction": "sparsegpt",
                "pruning_start": 0.0,
                "pruning_end": 1.0,
                "pruning_interval": 2,
                "final_sparsity": 0.5,
                "sparsegpt_mask": "obs",
            }
        },
        model,
        total_steps=5,
    )
    mgr.set_calibration_data(_calib(2))
    prev = None
    events = 0
    for _ in range(5):
        if mgr.step():
            events += 1
            assert mgr.last_reconstruction["layers"] == 14
            cur = {k: m.clone() for k, m in mgr.masks.items()}
            if prev is not None:
                for k in cur:
                    assert not bool((cur[k] & ~prev[k]).any())  # nothing pruned earlier comes back
            prev = cur
    assert events == 3
    assert mgr.get_pruning_summary()["measured_sparsity"] == pytest.approx(0.5, abs=1e-3)


# ----------------------------------------------------------------------------- OWL
def test_owl_sparsities_weighted_mean_and_counts_exact():
    sizes = [300, 100, 700, 50]
    s = owl_sparsities([0.02, 0.10, 0.05, 0.01], sizes, target=0.7, lam=0.08)
    assert sum(v * n for v, n in zip(s, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[1] == min(s)  # most outliers -> least pruned
    counts = allocate_counts(s, sizes, count_to_prune(sum(sizes), 0.7))
    assert sum(counts) == count_to_prune(sum(sizes), 0.7)
    assert all(abs(c - v * n) < 1 for c, v, n in zip(counts, s, sizes))
    with pytest.raises(
        ValueError, match=r"OWL gives unit 0 a sparsity of 1.2000 \(target 0.8, owl_lambda 0.4\).*lower owl_lambda"
    ):
        owl_sparsities([0.0, 1.0], [1, 1], target=0.8, lam=0.4)
    assert owl_sparsities([0.3, 0.3], [5, 9], 0.6, 0.1) == [0.6, 0.6]


def test_outlier_ratio_hand_computed():
    w = torch.tensor([[1.0, 2.0], [0.5, 8.0]])
    norms = torch.tensor([4.0, 1.0])  # scores [[4, 2], [2, 8]], mean 4
    assert outlier_ratio(w, norms, 1.5) == (1, 4)
    assert outlier_ratio(w, norms, 0.9) == (2, 4)


def test_rows_count_mask_spreads_exact_count_over_rows():
    from artemis.methods.unstructured import rows_count_mask

    scores = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.4, 0.6], [1.0, 0.0, 0.7, 0.7]])
    mask = rows_count_mask(scores, 5)  # rows prune 2, 2, 1
    assert mask.int().tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 1]]
    with pytest.raises(ValueError, match="cannot prune 13 of 12 weights"):
        rows_count_mask(scores, 13)


def test_owl_manager_exact_total_and_nonuniform_blocks():
    model = tiny_llama(layers=4)
    mgr = create_pruning_manager({"pruning": {"scope": "owl", "final_sparsity": 0.7}}, model)
    with pytest.raises(CalibrationError, match="scope: owl needs calibration batches"):
        mgr.apply_pruning(0.7)
    mgr.apply_pruning(0.7, calibration_data=_calib(2))
    m = mgr.pruning_metrics
    assert m["parameters_pruned"] == count_to_prune(m["parameters_prunable"], 0.7)
    per = mgr.get_pruning_summary()["owl_layer_sparsity"]
    by_block = {}
    for key, s in per.items():
        by_block.setdefault(key.split(".")[2], []).append(s)
    means = [sum(v) / len(v) for v in by_block.values()]
    assert max(means) - min(means) == pytest.approx(0.16, abs=2e-3)  # 2·owl_lambda spread
    for t in mgr.method.targets:  # each layer gets its allocated count exactly
        assert int((~mgr.masks[t.key]).sum()) == round(per[t.key] * t.numel)


def test_owl_lambda_scales_with_the_event_sparsity():
    """A progressive event below final_sparsity uses λ·s/final, so the small first targets
    stay valid (λ = 0.08 fixed would give a negative block sparsity at s = 0.05); a one-shot
    prune uses λ at its own target."""

    def spread(s, final):
        model = tiny_llama(layers=4)
        mgr = create_pruning_manager({"pruning": {"scope": "owl", "final_sparsity": final}}, model)
        mgr.apply_pruning(s, calibration_data=_calib(2))
        per = mgr.get_pruning_summary()["owl_layer_sparsity"]
        by_block = {}
        for key, v in per.items():
            by_block.setdefault(key.split(".")[2], []).append(v)
        means = [sum(v) / len(v) for v in by_block.values()]
        assert mgr.pruning_metrics["parameters_pruned"] == count_to_prune(mgr.pruning_metrics["parameters_prunable"], s)
        return max(means) - min(means)

    assert spread(0.7, 0.7) == pytest.approx(0.16, abs=2e-3)  # 2·λ at the final sparsity
    assert spread(0.35, 0.7) == pytest.approx(0.16, abs=2e-3)  # one-shot: its own target is final
    model = tiny_llama(layers=4)
    mgr = create_pruning_manager(
        {
            "pruning": {
                "scope": "owl",
                "final_sparsity": 0.7,
                "pruning_start": 0.0,
                "pruning_end": 1.0,
                "pruning_interval": 2,
            }
        },
        model,
        total_steps=7,
    )
    mgr.set_calibration_data(_calib(2))
    spreads = []
    for step in range(7):
        if mgr.step():  # events at 0, 2, 4, 6: the first targets are far below λ
            s = mgr.target_sparsity_at(step)
            per = mgr.get_pruning_summary()["owl_layer_sparsity"]
            by_block = {}
            for key, v in per.items():
                by_block.setdefault(key.split(".")[2], []).append(v)
            means = [sum(v) / len(v) for v in by_block.values()]
            spreads.append((s, max(means) - min(means)))
    assert mgr.pruning_metrics["parameters_pruned"] == count_to_prune(mgr.pruning_metrics["parameters_prunable"], 0.7)
    s1, d1 = next((s, d) for s, d in spreads if 0 < s < 0.7)
    assert d1 == pytest.approx(0.16 * s1 / 0.7, abs=3e-3)  # λ·s/final at an early event


# ----------------------------------------------------------------------------- sparse inference
def test_sparse_linear_matches_dense_linear_and_conv1d():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight[torch.rand(16, 32) < 0.7] = 0
    sp = SparseLinear.from_linear(lin)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(sp(x), lin(x), rtol=1e-5, atol=1e-5)
    one = torch.randn(1, 1, 32)  # a single token takes the matrix-vector path
    torch.testing.assert_close(sp(one), lin(one), rtol=1e-5, atol=1e-5)
    assert sp.nnz == int(torch.count_nonzero(lin.weight))
    assert sp.weight.col_indices().dtype == torch.int32
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(16, 32)  # weight (in, out)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[torch.rand(32, 16) < 0.6] = 0
    torch.testing.assert_close(SparseLinear.from_linear(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_sparse_linear_errors():
    with pytest.raises(ValueError, match=r"backend 'csr' runs on CPU with float32/float64 weights; got torch.float16"):
        SparseLinear(torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="unknown sparse backend 'mkl'"):
        SparseLinear(torch.zeros(4, 4), backend="mkl")
    with pytest.raises(ValueError, match="needs a CUDA float16/bfloat16 weight"):
        SparseLinear(torch.zeros(4, 4), backend="semi_structured")
    with pytest.raises(ValueError, match="expects 4 input features"):
        SparseLinear(torch.eye(4))(torch.ones(2, 3))


def test_sparsify_for_inference_measures_swaps_and_falls_back():
    model = tiny_llama()
    mgr = create_pruning_manager({"pruning": {"scope": "layer"}}, model)
    mgr.apply_magnitude_pruning(0.7)
    mgr.finalize()
    batch = lm_batch()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"]).logits
    report = sparsify_for_inference(model, min_sparsity=0.5, min_speedup=0.0, repeats=2)
    swapped = [n for n, e in report.items() if e["choice"] == "sparse"]
    assert len(swapped) == 14 and all(isinstance(model.get_submodule(n), SparseLinear) for n in swapped)
    assert report["lm_head"]["choice"] == "dense (sparsity below 0.5)"
    assert all(e["dense_us"] > 0 and e["sparse_us"] > 0 for n, e in report.items() if n in swapped)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, ref, rtol=1e-4, atol=1e-4)
    other = tiny_llama()
    create_pruning_manager({"pruning": {"scope": "layer"}}, other).apply_magnitude_pruning(0.7)
    report2 = sparsify_for_inference(other, min_speedup=1e9, repeats=2)
    assert not any(isinstance(m, SparseLinear) for m in other.modules())
    assert {e["choice"] for n, e in report2.items() if n != "lm_head"} == {"dense"}
    with pytest.raises(ValueError, match="unknown sparse backend"):
        sparsify_for_inference(other, backend="x")
    with pytest.raises(ValueError, match="unknown clock 'gpu'; valid: 'wall', 'cpu'"):
        sparsify_for_inference(other, clock="gpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="to_sparse_semi_structured (2:4) needs a CUDA GPU; none here")
def test_semi_structured_cuda_matches_dense():  # pragma: no cover - needs a GPU
    torch.manual_seed(0)
    lin = nn.Linear(128, 128).half().cuda()
    net = _one_linear(lin.weight.detach().float().cpu())
    mgr = create_pruning_manager({"pruning": {"targets": ["*"], "pattern": "2:4"}}, net)
    mgr.apply_magnitude_pruning(0.5)
    with torch.no_grad():
        lin.weight.copy_(net[0].weight.half().cuda())
    sp = SparseLinear.from_linear(lin, backend="semi_structured")
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    torch.testing.assert_close(sp(x), lin(x), rtol=1e-2, atol=1e-2)


def test_hessian_is_not_shared_when_the_input_changes_in_place_between_layers():
    class InPlace(nn.Module):
        """``b`` sees the same tensor object as ``a`` but changed in place: not the same input."""

        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            x = x.clone()
            ya = self.a(x)
            x.mul_(3.0).add_(1.0)
            return ya + self.b(x)

    torch.manual_seed(0)
    calib = [torch.randn(16, 8) for _ in range(3)]
    results = {}
    for share in (True, False):
        torch.manual_seed(1)
        model = InPlace()
        mgr = create_pruning_manager({"pruning": {"scope": "layer", "targets": ["a", "b"]}}, model)
        targets = mgr.method.targets
        keep = {t.key: t.param.detach().abs() > t.param.detach().abs().median() for t in targets}
        rec = reconstruct_layers(model, targets, keep, calib, share_inputs=share)
        results[share] = ({t.key: t.param.detach().clone() for t in targets}, rec)
    assert results[True][1]["shared_hessians"] == 0  # the version counter moved: no sharing
    for key, w in results[True][0].items():
        assert torch.equal(w, results[False][0][key]), key


def test_apply_pruning_takes_its_sparsity_from_the_pattern():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4))
    mgr = create_pruning_manager({"pruning": {"pattern": "2:4", "targets": ["*"]}}, net)
    mgr.apply_pruning()  # no sparsity: the pattern's 0.5
    w = net[0].weight.detach().reshape(4, 2, 4)
    assert ((w == 0).sum(-1) == 2).all()
    with pytest.raises(ConfigError, match=r"sparsity 0\.6 is not reachable with pattern '2:4'.*are 0, 0\.25, 0\.5"):
        mgr.apply_pruning(0.6)
    mgr.apply_pruning(0.5)  # the same value is accepted
    plain = create_pruning_manager({"pruning": {"targets": ["*"]}}, nn.Sequential(nn.Linear(8, 4)))
    with pytest.raises(ConfigError, match=r"apply_pruning needs a sparsity .* only an N:M pattern"):
        plain.apply_pruning()
