import pytest
from pydantic import ValidationError

from artemis import ConfigError, PruningConfig, load_pruning_config

SEED = {
    "enabled": True,
    "method": "magnitude_progressive",
    "initial_sparsity": 0.0,
    "final_sparsity": 0.6,
    "pruning_start": 0.2,
    "pruning_end": 0.8,
    "pruning_interval": 50,
    "importance_metric": "magnitude",
    "quantization_aware": True,
}


def test_plain_and_combined_forms():
    cfg = load_pruning_config({"pruning": SEED})
    assert cfg.final_sparsity == 0.6 and cfg.schedule == "cubic" and cfg.scope is None
    combined = load_pruning_config(
        {
            "model": {
                "base_model": "x",
                "pruning": {"enabled": True, "sparsity_target": 0.6, "method": "magnitude_progressive"},
            },
            "fine_tuning": {"method": "efficiency_transformer"},
        }
    )
    assert combined.final_sparsity == 0.6
    assert load_pruning_config(cfg) is cfg


def test_yaml_path(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("pruning:\n  final_sparsity: 0.4\n  schedule: linear\n")
    assert load_pruning_config(p).final_sparsity == 0.4
    with pytest.raises(ConfigError, match="does not exist"):
        load_pruning_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruning: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pruning_config(bad)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"final_sparsty": 0.5}, r"unknown key 'final_sparsty' \(did you mean 'final_sparsity'\?\)"),
        ({"final_sparsity": 1.0}, r"pruning.final_sparsity: final_sparsity must be in \[0, 1\), got 1.0"),
        ({"initial_sparsity": -0.1}, r"initial_sparsity must be in \[0, 1\), got -0.1"),
        ({"pruning_start": 0.9, "pruning_end": 0.5}, r"pruning_start \(0.9\) is after pruning_end \(0.5\)"),
        ({"pruning_interval": 0}, r"pruning_interval must be at least 1 step, got 0"),
        ({"method": "magnitude"}, r"unknown method 'magnitude'; valid: .*'magnitude_progressive'"),
        ({"importance_metric": "gradient"}, r"unknown importance_metric 'gradient'; valid: .*'magnitude'"),
        ({"schedule": "exp"}, r"unknown schedule 'exp'; valid: 'cubic', 'cubic_decay', 'linear'"),
        ({"scope": "model"}, r"unknown scope 'model'"),
        ({"layer_sparsity": {"*.mlp.*": 1.5}}, r"layer_sparsity\['\*.mlp.\*'\] must be in \[0, 1\), got 1.5"),
        ({"initial_sparsity": 0.7, "final_sparsity": 0.5}, r"initial_sparsity \(0.7\) is above final_sparsity"),
    ],
)
def test_bad_values_name_field_and_value(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_pruning_config({"pruning": {**SEED, **override}})
    assert isinstance(info.value, ValueError)


def test_direct_construction_is_validated():
    with pytest.raises(ValidationError, match="final_sparsity must be in"):
        PruningConfig(final_sparsity=2)
    cfg = PruningConfig(sparsity_target=0.3)
    assert cfg.final_sparsity == 0.3


def test_alias_twice_and_no_section():
    with pytest.raises(ConfigError, match="both 'sparsity_target' and 'final_sparsity'"):
        load_pruning_config({"pruning": {"final_sparsity": 0.5, "sparsity_target": 0.5}})
    with pytest.raises(ConfigError, match="no pruning section found"):
        load_pruning_config({"training": {}})
    with pytest.raises(ConfigError, match="model.pruning.final_sparsity"):
        load_pruning_config({"model": {"pruning": {"final_sparsity": 3}}})


def test_method_options_keep_their_flat_keys_and_defaults():
    cfg = load_pruning_config({"pruning": {"reconstruction": "sparsegpt", "sparsegpt_blocksize": 64, "owl_m": 3}})
    assert (cfg.reconstruction, cfg.sparsegpt_blocksize, cfg.owl_m, cfg.owl_lambda) == ("sparsegpt", 64, 3.0, 0.08)
    assert cfg.structured_widths == "uniform" and cfg.layer_dropout is None  # other methods' defaults
    assert cfg.needs_calibration_batches
    dumped = cfg.model_dump()
    assert dumped["sparsegpt_blocksize"] == 64 and dumped["layer_dropout"] is None
    assert load_pruning_config({"pruning": dumped}) == cfg  # the dump is a valid pruning section


def test_method_options_are_owned_by_their_method():
    from artemis.methods import METHODS
    from artemis.methods.owl import OWLOptions
    from artemis.methods.pipeline_options import OneShotOptions
    from artemis.methods.sparsegpt import SparseGPTOptions
    from artemis.methods.structured import StructuredOptions

    assert METHODS.get("magnitude_progressive").options_models == (SparseGPTOptions, OWLOptions, OneShotOptions)
    assert METHODS.get("structured_sparsity").options_models == (StructuredOptions,)
    cfg = load_pruning_config({"pruning": {"method": "structured_sparsity", "structured_units": ["mlp_neurons"]}})
    assert cfg.method_options(StructuredOptions).structured_units == ["mlp_neurons"]
    assert not cfg.needs_calibration_batches


@pytest.mark.parametrize(
    "section, pattern",
    [
        (
            {"method": "layer_dropout", "reconstruction": "sparsegpt"},
            r"reconstruction only apply to method 'magnitude_progressive' \(method is 'layer_dropout'\)",
        ),
        ({"method": "structured_sparsity", "scope": "owl"}, r"scope: owl only apply to method 'magnitude_progressive'"),
        (
            {"method": "structured_sparsity", "pattern": "2:4"},
            r"pattern '2:4' only applies to method 'magnitude_progressive'",
        ),
        ({"structured_widths": "per_layer"}, r"structured_widths only apply to method 'structured_sparsity'"),
        ({"layer_dropout": {"fade_steps": 2}}, r"the layer_dropout section is only used by method 'layer_dropout'"),
        ({"method": "layer_dropout", "layer_dropout": {"fade_step": 2}}, r"unknown key 'fade_step'"),
        ({"owl_lamda": 0.1}, r"unknown key 'owl_lamda' \(did you mean 'owl_lambda'\?\)"),
    ],
)
def test_options_of_another_method_fail(section, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_pruning_config({"pruning": section})


def test_moved_names_still_import_from_the_config_module():
    from artemis.core.config import LayerDropoutOptions, parse_nm_pattern
    from artemis.core.masks import parse_nm_pattern as masks_parse
    from artemis.methods.layer_dropout import LayerDropoutOptions as moved

    assert LayerDropoutOptions is moved and parse_nm_pattern is masks_parse
    cfg = load_pruning_config({"pruning": {"method": "layer_dropout", "layer_dropout": {"fade_steps": 3}}})
    assert isinstance(cfg.layer_dropout, LayerDropoutOptions) and cfg.layer_dropout.fade_steps == 3


def test_pattern_is_parsed_at_validation():
    cfg = load_pruning_config({"pruning": {"pattern": " 4 : 8 "}})
    assert cfg.pattern == "4:8" and cfg.nm_pattern == (4, 8) and cfg.final_sparsity == 0.5
    assert PruningConfig().nm_pattern is None


def test_a_bad_method_option_assignment_is_refused_and_undone():
    cfg = PruningConfig()
    with pytest.raises(ValidationError, match="owl_lambda must be in"):
        cfg.owl_lambda = 0.0
    assert cfg.owl_lambda == 0.08
    cfg.owl_lambda = 0.1
    assert cfg.owl_lambda == 0.1
    with pytest.raises(ValidationError, match="unknown key 'owl_lamda'"):
        cfg.owl_lamda = 0.1


@pytest.mark.parametrize(
    "section, key",
    [
        ({"final_sparsity": True}, "final_sparsity"),
        ({"sparsity_target": True}, "sparsity_target"),
        ({"pruning_interval": False}, "pruning_interval"),
        ({"owl_lambda": True}, "owl_lambda"),
    ],
)
def test_booleans_are_not_numbers(section, key):
    value = next(iter(section.values()))
    with pytest.raises(ConfigError, match=rf"pruning: {key} must be a number, got {value}"):
        load_pruning_config({"pruning": section})


def test_booleans_are_not_numbers_inside_number_mappings():
    with pytest.raises(ConfigError, match=r"pruning: layer_sparsity\['fc1'\] must be a number, got False"):
        load_pruning_config({"pruning": {"layer_sparsity": {"fc1": False}}})
    assert load_pruning_config({"pruning": {"layer_sparsity": {"fc1": 0.25}}}).layer_sparsity == {"fc1": 0.25}


def test_an_unquoted_nm_pattern_in_yaml_is_a_pattern(tmp_path):
    from artemis.core.config import load_yaml

    # PyYAML's safe_load reads 2:4 as the base-60 number 124; Artemis's reader keeps it
    assert load_yaml("pattern: 2:4\nsteps: 10\nlr: 1.5e-3\nt: 1:02:03") == {
        "pattern": "2:4",
        "steps": 10,
        "lr": 0.0015,
        "t": 3723,
    }
    path = tmp_path / "p.yaml"
    path.write_text("pruning:\n  method: magnitude_progressive\n  pattern: 2:4\n")
    cfg = load_pruning_config(path)
    assert cfg.pattern == "2:4" and cfg.nm_pattern == (2, 4) and cfg.final_sparsity == 0.5
    with pytest.raises(
        ConfigError, match=r"pattern must be a string 'N:M' such as '2:4', got the number 124.*quote it"
    ):
        load_pruning_config({"pruning": {"pattern": 124}})


def test_given_keys_and_rederived_variant_settings():
    cfg = PruningConfig(final_sparsity=0.5, reconstruction="sparsegpt")
    assert cfg.given() == {"final_sparsity": 0.5, "reconstruction": "sparsegpt"}
    assert (cfg.sparsegpt_target, cfg.sparsegpt_shrinkage) == ("dense", "ledoit_wolf")
    cfg.sparsegpt_variant = "paper"  # the keys left to the variant follow it
    assert (cfg.sparsegpt_target, cfg.sparsegpt_shrinkage, cfg.sparsegpt_bias_correction) == ("pruned", "none", False)
    assert set(cfg.given()) == {"final_sparsity", "reconstruction", "sparsegpt_variant"}
    explicit = PruningConfig(reconstruction="sparsegpt", sparsegpt_variant="paper", sparsegpt_target="dense")
    explicit.sparsegpt_variant = "artemis"  # an explicit key stays
    assert (explicit.sparsegpt_target, explicit.sparsegpt_shrinkage) == ("dense", "ledoit_wolf")


def test_overrides_rederive_what_the_config_did_not_set():
    from artemis.train.run_config import EMBEDDED_DEFAULT, RunConfig, apply_overrides

    cfg = RunConfig.model_validate(EMBEDDED_DEFAULT)
    with pytest.raises(
        ConfigError, match=r"pattern '2:4' prunes exactly 0.5 of every group, but final_sparsity is 0.6"
    ):
        apply_overrides(cfg, {"pruning.pattern": "2:4"})
    nm = apply_overrides(
        cfg,
        {
            "pruning.pattern": "2:4",
            "pruning.final_sparsity": 0.5,
            "pruning.scope": None,
            "pruning.reconstruction": "sparsegpt",
        },
    )
    # the variant's per-row OBS scope does not apply with a pattern: derived again, not carried over
    assert (nm.pruning.pattern, nm.pruning.sparsegpt_obs_scope, nm.pruning.final_sparsity) == ("2:4", "layer", 0.5)
    paper = apply_overrides(nm, {"pruning.sparsegpt_variant": "paper"})
    assert (paper.pruning.sparsegpt_target, paper.pruning.sparsegpt_shrinkage) == ("pruned", "none")


def test_command_line_set_reads_an_nm_pattern():
    from artemis.cli.main import _load_config, build_parser

    cfg = _load_config(build_parser().parse_args(["prune", "--set", "pruning.pattern=2:4"]))
    assert (cfg.pruning.pattern, cfg.pruning.nm_pattern, cfg.pruning.final_sparsity) == ("2:4", (2, 4), 0.5)
    assert cfg.pruning.scope is None and cfg.pruning.importance_metric == "activation"  # the rest of the default
    with pytest.raises(
        ConfigError, match=r"pattern '2:4' prunes exactly 0.5 of every group, but final_sparsity is 0.6"
    ):
        _load_config(build_parser().parse_args(["prune", "--final-sparsity", "0.6", "--set", "pruning.pattern=2:4"]))
