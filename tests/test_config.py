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
