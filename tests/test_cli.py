"""The `artemis` command line end to end on tiny local models (saved into tmp folders)."""

from __future__ import annotations

import json

import pytest
import torch

from artemis.cli import main, run_eval

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from artemis.data.corpus import builtin_corpus

    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["[PAD]", "[UNK]", "</s>"], show_progress=False)
    tk.train_from_iterator(builtin_corpus("train", limit=300), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def save_tiny_models(root):
    """A tiny Llama and a tiny BERT with the test tokenizer, saved under ``root``."""
    from transformers import BertConfig, BertModel

    from tests.fixtures import tiny_llama

    tok = _tokenizer()
    llama = tiny_llama(vocab_size=len(tok))
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
        )
    )
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    return root


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


FAST = [
    "--batch-size",
    "2",
    "--max-length",
    "32",
    "--eval-texts",
    "16",
    "--pruning-interval",
    "2",
    "--set",
    "evaluation.latency_repeats=2",
    "--set",
    "evaluation.latency_warmup=0",
    "-q",
    "--no-plots",
]


def _zeros_over_targets(model) -> float:
    from artemis.arch import get_adapter
    from artemis.core.targets import find_targets

    adapter = get_adapter(model)
    targets = find_targets(model, block_prefixes=adapter.block_prefixes())
    n = sum(t.param.numel() for t in targets)
    z = sum(int((t.param == 0).sum()) for t in targets)
    return z / n


def test_prune_end_to_end_causal_lm(models_dir, tmp_path, capsys):

    out = tmp_path / "run"
    argv = [
        "prune",
        "--model",
        str(models_dir / "llama"),
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--final-sparsity",
        "0.5",
        "-o",
        str(out),
    ] + [a for a in FAST if a != "--no-plots"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "50.00%" in table
    report = json.loads((out / "report.json").read_text())
    # the fields the issue asks for
    assert set(report) >= {"sparsity", "quality", "size_mb", "latency_ms", "config"}
    assert report["quality"]["metric"] == "perplexity"
    assert report["config"]["pruning"]["final_sparsity"] == 0.5 and report["config"]["training"]["steps"] == 6
    assert len(report["history"]) == 6 and report["history"][-1]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert [h["step"] for h in report["history"] if "quality" in h] == [3, 6]
    assert report["runtime"]["distillation"] is True
    for name in ("report.md", "sparsity_vs_step.png", "quality_vs_step.png", "layer_sparsity.png"):
        assert (out / name).is_file(), name
    # the saved (compressed) model loads and holds exactly the measured sparsity
    from artemis import load_pruned

    saved = load_pruned(out / "model")
    assert _zeros_over_targets(saved) == pytest.approx(report["sparsity"], abs=1e-9)
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert report["size_mb"]["compressed"] < report["size_mb"]["dense"]
    # re-evaluating the saved model from disk gives the numbers in the report
    again = run_eval(out / "model", None, num_texts=16, max_length=32, device="cpu")
    assert again["quality"]["pruned"] == pytest.approx(report["quality"]["pruned"], rel=1e-5)
    assert again["quality"]["dense"] == pytest.approx(report["quality"]["dense"], rel=1e-5)
    assert again["sparsity"] == pytest.approx(report["sparsity"], abs=1e-9)
    assert again["size_mb"]["compressed"] == pytest.approx(report["size_mb"]["compressed"], rel=1e-6)
    assert "| perplexity |" in (out / "report.md").read_text()


def test_prune_encoder_distillation_and_one_shot(models_dir, tmp_path):
    out = tmp_path / "enc"
    assert main(["prune", "--model", str(models_dir / "bert"), "--steps", "3", "-o", str(out)] + FAST) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["task"] == "encoder" and r["quality"]["metric"] == "embedding_cosine_vs_dense"
    assert r["quality"]["dense"] == 1.0 and 0.0 < r["quality"]["pruned"] <= 1.0 + 1e-6
    assert 0.0 <= r["quality"]["nn_agreement"] <= 1.0
    assert set(r["history"][-1]) >= {"loss_embedding", "loss_hidden"}
    # steps 0: one-shot pruning, no training
    out2 = tmp_path / "oneshot"
    assert main(["prune", "--model", str(models_dir / "bert"), "--steps", "0", "-o", str(out2)] + FAST) == 0
    r2 = json.loads((out2 / "report.json").read_text())
    # the default metric is activation (Wanda) with row scope: each row gets round(0.6 * columns)
    # zeros; per block of the tiny BERT: 384 rows of 64 columns (38 zeros) and 64 rows of 128
    # columns (77 zeros) out of 32768 weights
    assert r2["history"] == [] and r2["sparsity"] == pytest.approx((384 * 38 + 64 * 77) / 32768, abs=1e-9)


def test_encoder_without_distillation_is_a_clear_error(models_dir, tmp_path, capsys):
    code = main(
        ["prune", "--model", str(models_dir / "bert"), "--steps", "2", "--no-distill", "-o", str(tmp_path)] + FAST
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "training an encoder needs distillation" in err and "Traceback" not in err


def test_killed_run_resumes_with_same_masks(models_dir, tmp_path):
    from safetensors.torch import load_file

    common = ["prune", "--model", str(models_dir / "llama"), "--steps", "6", "--checkpoint-every", "2"] + FAST
    assert main(common + ["-o", str(tmp_path / "full")]) == 0
    assert main(common + ["-o", str(tmp_path / "cut"), "--stop-after", "3"]) == 0
    from artemis.train.loop import CHECKPOINT_FILE, read_checkpoint

    assert (tmp_path / "cut" / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "cut" / "report.json").exists()
    state = read_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    assert state["step"] == 3 and state["manager"]["step"] == 3 and state["manager"]["masks"]
    assert main(common + ["-o", str(tmp_path / "cut"), "--resume"]) == 0
    r = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert r["resumed_from_step"] == 3 and len(r["history"]) == 6
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), f"mask differs for {k}"
        assert torch.equal(a[k], b[k]), f"weights differ for {k}"
    # a checkpoint from another configuration is refused
    code = main(
        [
            "prune",
            "--model",
            str(models_dir / "llama"),
            "--steps",
            "7",
            "--resume",
            "-o",
            str(tmp_path / "cut"),
            "--stop-after",
            "4",
        ]
        + FAST
    )
    assert code == 2


def test_sweep(models_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "--model",
            str(models_dir / "llama"),
            "--sparsities",
            "0.3,0.7",
            "--threshold",
            "1e9",
            "-o",
            str(out),
            "--max-length",
            "32",
            "--eval-texts",
            "16",
            "--set",
            "evaluation.latency_repeats=1",
            "-q",
        ]
    )
    assert code == 0
    res = json.loads((out / "sweep.json").read_text())
    assert [r["sparsity"] for r in res["rows"]] == [0.3, 0.7]
    # the default metric (activation, row scope, calibrated once on the dense model) rounds
    # each row's count of zeros to a whole number: close to, not exactly at, each level
    assert [r["measured_sparsity"] for r in res["rows"]] == [
        pytest.approx(0.3, abs=0.005),
        pytest.approx(0.7, abs=0.005),
    ]
    assert res["rows"][0]["size_mb"] > res["rows"][1]["size_mb"]
    assert res["recommended_sparsity"] == 0.7 and (out / "sweep.png").is_file()
    assert "recommended sparsity" in capsys.readouterr().out
    assert main(["sweep", "--sparsities", "0.3,1.5", "-q"]) == 2


@pytest.mark.parametrize("sub", [[], ["prune"], ["sweep"], ["eval"], ["export"]])
def test_help_everywhere(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main(sub + ["--help"])
    assert exc.value.code == 0
    assert "usage: artemis" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["prune", "missing.yaml"], r"config file 'missing.yaml' does not exist"),
        (["prune", "--final-sparsity", "1.5"], r"pruning.final_sparsity: final_sparsity must be in \[0, 1\), got 1.5"),
        (["prune", "--method", "nope"], r"unknown method 'nope'; valid: .*'magnitude_progressive'"),
        (
            ["prune", "--model", "/nonexistent/model"],
            r"model.base_model '/nonexistent/model': the folder '/nonexistent/model' does not exist",
        ),
        (["prune", "--set", "training.stepz=3"], r"unknown key 'stepz' \(did you mean 'steps'\?\)"),
        (["prune", "--set", "fine_tuning.method=magic"], r"unknown fine_tuning.method 'magic'; valid: 'full'"),
        (
            ["prune", "--set", "model.hybrid_lora_adapter=true", "--steps", "0"],
            r"training.steps: 0 is one-shot pruning and trains nothing, but model.hybrid_lora_adapter: true needs training",
        ),
        (
            ["prune", "--set", "fine_tuning.efficiency_transformer.adaptive_layer_selection=true"],
            r"efficiency_transformer options are set but method is 'full'",
        ),
        (["prune", "--set", "model.load_in_8bit=true"], r"load_in_8bit: true needs"),
        (["eval", "/nonexistent/dir"], r"records no base model"),
    ],
)
def test_errors_are_one_line_with_status_2(argv, pattern, capsys, tmp_path):
    code = main(argv + ["-o", str(tmp_path)] if argv[0] == "prune" else argv)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("artemis: error: ") and "\n" not in err and "Traceback" not in err
    import re

    assert re.search(pattern, err), err


def test_debug_shows_the_exception(tmp_path):
    from artemis.core.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        main(["prune", str(tmp_path / "none.yaml"), "--debug"])


def test_bad_yaml_file_names_the_file(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("training:\n  steps: [1\n")
    assert main(["prune", str(p)]) == 2
    assert f"config file '{p}' is not valid YAML" in capsys.readouterr().err


def test_export_needs_or_uses_the_exporter(models_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", str(models_dir / "llama"), "--steps", "0", "-o", str(out)] + FAST) == 0
    try:
        import artemis.sparse.checkpoint  # noqa: F401
    except ImportError:
        assert main(["export", str(out / "model"), "-o", str(tmp_path / "exp")]) == 2
        assert "needs the compressed exporter" in capsys.readouterr().err
        return
    assert main(["export", str(out / "model"), "-o", str(tmp_path / "exp")]) == 0
    again = run_eval(tmp_path / "exp", str(models_dir / "llama"), num_texts=16, max_length=32, device="cpu")
    first = json.loads((out / "report.json").read_text())
    assert again["sparsity"] == pytest.approx(first["sparsity"], abs=1e-9)


def test_low_resource_mode_runs_with_checkpointing_and_no_teacher(models_dir, tmp_path):
    out = tmp_path / "low"
    assert (
        main(["prune", "--model", str(models_dir / "llama"), "--steps", "2", "--low-resource", "-o", str(out)] + FAST)
        == 0
    )
    r = json.loads((out / "report.json").read_text())["runtime"]
    assert r["gradient_checkpointing"] is True and r["distillation"] is False
    assert (r["batch_size"], r["gradient_accumulation_steps"]) == (1, 2)


def test_bad_flag_value_is_a_one_line_error(capsys):
    assert main(["eval", "/nonexistent", "--reference", "x", "--eval-texts", "1"]) == 2
    err = capsys.readouterr().err
    assert "eval.num_texts: Input should be greater than or equal to 2" in err and "Traceback" not in err


def test_prune_runs_the_seed_combined_config(tmp_path):
    """The specification's combined form (pruning + Hybrid LoRA-Adapter + Efficiency-Transformer) end to end
    on a 4-block tiny Llama (``load_in_8bit: false``: no 8-bit backend on a CPU machine)."""
    import yaml

    from artemis import load_pruned
    from tests.fixtures import tiny_llama

    tok = _tokenizer()
    model_path = tmp_path / "llama4"
    tiny_llama(layers=4, vocab_size=len(tok)).save_pretrained(model_path)
    tok.save_pretrained(model_path)
    cfg = {
        "model": {
            "base_model": str(model_path),
            "tokenizer": str(model_path),
            "load_in_8bit": False,
            "hybrid_lora_adapter": True,
            "pruning": {"enabled": True, "sparsity_target": 0.6, "method": "magnitude_progressive"},
        },
        "fine_tuning": {
            "method": "efficiency_transformer",
            "efficiency_transformer": {"adaptive_layer_selection": True, "cross_layer_parameter_sharing": True},
        },
    }
    path = tmp_path / "combined.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["prune", str(path), "--steps", "4", "-o", str(out)] + FAST + ["--pruning-interval", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert report["history"][-1]["sparsity"] == pytest.approx(0.6, abs=1e-3)
    ft = report["fine_tuning"]
    assert ft["hybrid_lora"] is True and ft["method"] == "efficiency_transformer"
    assert len(ft["shared_pairs"]) == 1 and len(ft["trainable_layers"]) == 2
    assert 0 < ft["trainable"] < ft["total"] // 10  # only adapters train
    merge = report["lora_merge"]
    assert merge["layers_merged"] > 0 and merge["masked_layers"] == merge["layers_merged"]
    assert merge["sparsity_after"] >= merge["sparsity_before"] - 1e-9  # the merge never fills pruned weights
    assert merge["output_cosine"] is not None and merge["loss_merged"] is not None
    # the saved model is plain (no peft wrappers), every block has its own storage, and it keeps the sparsity
    saved = load_pruned(out / "model")
    names = [n for n, _ in saved.named_parameters()]
    assert not any("lora_" in n or "base_layer" in n for n in names)
    i, j = ft["shared_pairs"][0]
    wi = saved.model.layers[i].mlp.up_proj.weight
    wj = saved.model.layers[j].mlp.up_proj.weight
    assert wi.data_ptr() != wj.data_ptr() and torch.equal(wi, wj)
    assert _zeros_over_targets(saved) == pytest.approx(0.6, abs=1e-2)


def test_multi_process_sweep_is_refused_before_any_work(models_dir, tmp_path, capsys, monkeypatch):
    # `artemis prune` runs under torchrun (tests/test_cli_trust.py); a sweep stays single-process
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun / accelerate launch set for 2 processes
    out = tmp_path / "out"
    code = main(["sweep", "--model", str(models_dir / "llama"), "-o", str(out), "-q", "--sparsities", "0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "artemis sweep runs in a single process" in err and "WORLD_SIZE=2" in err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "extra",
    [
        ["--set", "pruning.reconstruction=sparsegpt"],
        ["--set", "pruning.scope=owl", "--set", "pruning.importance_metric=activation"],
    ],
)
def test_prune_with_sparsegpt_or_owl_gets_calibration_batches(models_dir, tmp_path, extra):
    # one-shot and progressive: both need batches at every pruning event, which the
    # command builds from data.calibration_texts training texts
    for steps in ("0", "4"):
        out = tmp_path / f"run{steps}"
        argv = (
            [
                "prune",
                "--model",
                str(models_dir / "llama"),
                "--steps",
                steps,
                "-o",
                str(out),
                "--set",
                "data.calibration_texts=16",
            ]
            + FAST
            + extra
        )
        assert main(argv) == 0, steps
        r = json.loads((out / "report.json").read_text())
        # the embedded default's activation metric prunes round(0.6 · columns) per row: 0.5955 here
        assert r["sparsity"] == pytest.approx(0.6, abs=0.005), steps


def test_sweep_with_sparsegpt(models_dir, tmp_path, monkeypatch):
    import math

    from transformers import AutoModelForCausalLM

    from artemis.arch import get_adapter
    from artemis.cli import workflows
    from artemis.core.targets import find_targets

    def target_weights(model):
        adapter = get_adapter(model)
        return {t.name: t.param.detach().clone() for t in find_targets(model, block_prefixes=adapter.block_prefixes())}

    dense = target_weights(AutoModelForCausalLM.from_pretrained(models_dir / "llama"))
    evaluated = []  # (model, its target weights) at each evaluation of a pruned level
    measure = workflows._Evaluator.measure

    def spy(self, model, *args, **kwargs):
        evaluated.append((model, target_weights(model)))
        return measure(self, model, *args, **kwargs)

    monkeypatch.setattr(workflows._Evaluator, "measure", spy)
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            "--model",
            str(models_dir / "llama"),
            "--sparsities",
            "0.5",
            "-o",
            str(out),
            "--max-length",
            "32",
            "--eval-texts",
            "16",
            "--set",
            "evaluation.latency_repeats=1",
            "-q",
            "--set",
            "pruning.reconstruction=sparsegpt",
            "--set",
            "data.calibration_texts=16",
        ]
    )
    assert code == 0
    res = json.loads((out / "sweep.json").read_text())
    assert res["config"]["pruning"]["reconstruction"] == "sparsegpt"
    (row,) = res["rows"]
    assert row["sparsity"] == 0.5
    assert row["measured_sparsity"] == pytest.approx(0.5, abs=0.005)
    assert res["metric"] == "perplexity" and math.isfinite(row["quality"]) and row["quality"] > 1.0
    assert row["quality"] != res["dense"]["quality"]
    assert math.isfinite(row["latency_ms"]) and row["latency_ms"] > 0
    assert res["recommended_sparsity"] in (None, 0.5)
    # the weights the 0.5 level was evaluated with
    ((model, pruned),) = evaluated
    assert set(pruned) == set(dense) and len(dense) == 14
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    assert zeros / sum(w.numel() for w in pruned.values()) == pytest.approx(row["measured_sparsity"], abs=1e-4)
    for name, w in pruned.items():
        kept = w != 0
        assert float(kept.float().mean()) == pytest.approx(0.5, abs=0.02), name
        # plain pruning would keep these weights as they were; SparseGPT's OBS update moved them
        moved = (w[kept] - dense[name][kept]).abs()
        assert float(moved.max()) > 1e-3 and float((moved > 0).float().mean()) > 0.5, name
    # and the sweep restored the dense weights bit for bit afterwards
    for name, w in target_weights(model).items():
        assert torch.equal(w, dense[name]), name


def test_calibration_texts_must_be_positive(models_dir, tmp_path, capsys):
    code = main(
        ["prune", "--model", str(models_dir / "llama"), "-o", str(tmp_path / "x"), "--set", "data.calibration_texts=0"]
        + FAST
    )
    assert code == 2
    assert "data.calibration_texts" in capsys.readouterr().err


def test_calibration_batches_count_exactly_n_sequences():
    from artemis.data.corpus import calibration_batches

    tok = _tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog " * 8] * 200
    for n in (1, 5, 8, 20):
        batches = calibration_batches("causal_lm", tok, texts, max_length=16, n=n)
        assert sum(b["input_ids"].shape[0] for b in batches) == n
        assert all(b["input_ids"].shape[1] == 16 for b in batches)
    enc = calibration_batches("encoder", tok, texts, max_length=16, n=20)
    assert [b["input_ids"].shape[0] for b in enc] == [16, 4]
