"""`artemis prune --steps 0 --max-memory`: the model streamed block by block, never loaded whole."""

from __future__ import annotations

import json

import pytest
import torch

from artemis import load_pruned
from artemis.cli import main
from artemis.cli.main import build_parser
from artemis.core.errors import ConfigError, ModelError
from artemis.sparse import streaming
from artemis.train.run_config import load_run_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAST = [
    "--max-length",
    "32",
    "--eval-texts",
    "16",
    "--set",
    "data.calibration_texts=8",
    "--set",
    "evaluation.latency_repeats=1",
    "--set",
    "evaluation.latency_warmup=0",
    "--set",
    "evaluation.latency_rounds=1",
    "-q",
    "--no-plots",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A 4-block Llama and a 2-block BERT with the test tokenizer, saved as many shards."""
    from transformers import BertConfig, BertModel

    from tests.fixtures import tiny_llama
    from tests.test_cli import _tokenizer

    root = tmp_path_factory.mktemp("shards")
    tok = _tokenizer()
    llama = tiny_llama(layers=4, vocab_size=len(tok))
    llama.save_pretrained(root / "llama", max_shard_size="100KB")
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
    bert.save_pretrained(root / "bert", max_shard_size="60KB")
    tok.save_pretrained(root / "bert")
    for name in ("llama", "bert"):
        assert len(list((root / name).glob("*.safetensors"))) > 3
    return root


def _block_spy(monkeypatch) -> list[int]:
    """Record, after every materialisation, how many blocks have real parameters."""
    from artemis.arch import get_adapter

    seen: list[int] = []
    original = streaming.LazyCheckpoint.materialise

    def spy(self, names):
        original(self, names)
        blocks = get_adapter(self.model).blocks
        seen.append(sum(1 for b in blocks if any(p.device.type != "meta" for p in b.parameters())))

    monkeypatch.setattr(streaming.LazyCheckpoint, "materialise", spy)
    return seen


@pytest.mark.parametrize(
    "name,extra",
    [
        ("llama", ["--metric", "activation", "--scope", "row"]),
        ("llama", ["--metric", "activation", "--set", "pruning.reconstruction=sparsegpt"]),
        ("bert", ["--metric", "activation", "--scope", "row"]),
    ],
)
def test_streamed_prune_equals_in_memory(folders, tmp_path, monkeypatch, capsys, name, extra):
    base = ["prune", "--model", str(folders / name), "--steps", "0", "--final-sparsity", "0.5"] + extra + FAST
    assert main(base + ["-o", str(tmp_path / "mem")]) == 0
    capsys.readouterr()
    seen = _block_spy(monkeypatch)
    loads = []
    import artemis.train.loading as loading

    monkeypatch.setattr(loading, "load_model_and_tokenizer", lambda *a, **k: loads.append(a))
    assert main(base + ["-o", str(tmp_path / "st"), "--max-memory", "300KB"]) == 0
    printed = capsys.readouterr().out
    assert loads == []  # never loaded whole
    assert seen and max(seen) == 1  # the prune and both evaluations: one block at a time
    mem = json.loads((tmp_path / "mem" / "report.json").read_text())
    st = json.loads((tmp_path / "st" / "report.json").read_text())
    # the same pruned weights, tensor for tensor
    a, b = load_pruned(tmp_path / "mem" / "model"), load_pruned(tmp_path / "st" / "model")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # the same figures: the streamed evaluations give the in-memory ones bit for bit on CPU
    assert st["quality"] == mem["quality"]
    assert st["sparsity"] == mem["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert st["layers"] == mem["layers"]
    assert st["parameters"] == mem["parameters"]
    assert st["size_mb"]["dense"] == pytest.approx(mem["size_mb"]["dense"], rel=1e-12)
    assert st["size_mb"]["compressed"] == pytest.approx(mem["size_mb"]["compressed"], rel=1e-12)
    # peak memory stated; parameters resident at most the outer ones plus one block
    s = st["streaming"]
    assert s["max_resident_blocks"] == 1 and s["max_memory_bytes"] == 300_000
    assert max(s["peak_param_bytes"].values()) < s["whole_model_bytes"]
    assert st["memory"]["peak_parameters"] * 2**20 == max(s["peak_param_bytes"].values())
    assert st["memory"]["peak_rss"] > 0 and st["latency_ms"]["dense"] is None
    assert "parameters resident at most" in printed and "(streamed, 1 block at a time)" in printed
    assert "Peak memory (MiB): peak_rss" in (tmp_path / "st" / "report.md").read_text()
    assert "latency, ms (not measured: streamed)" in printed
    # the saved folder is what artemis prune always writes: artemis eval reads it
    assert json.loads((tmp_path / "st" / "model" / "artemis_run.json").read_text())["base_model"] == str(folders / name)


def test_low_resource_mode_streams_with_steps_zero(folders, tmp_path, monkeypatch):
    seen = _block_spy(monkeypatch)
    argv = ["prune", "--model", str(folders / "llama"), "--steps", "0", "--low-resource", "-o", str(tmp_path / "o")]
    assert main(argv + ["--metric", "magnitude"] + FAST) == 0
    st = json.loads((tmp_path / "o" / "report.json").read_text())["streaming"]
    assert st["setting"] == "efficiency.low_resource_mode: true with training.steps: 0"
    assert st["max_memory_bytes"] is None and max(seen) == 1


def test_max_memory_flag_maps_to_the_run_config_key():
    from artemis.cli.main import _load_config

    args = build_parser().parse_args(["prune", "--steps", "0", "--max-memory", "1.5GiB"])
    assert args.max_memory == "1.5GiB"
    cfg = _load_config(args)
    assert cfg.efficiency.max_memory == "1.5GiB" and cfg.training.steps == 0
    assert load_run_config({"efficiency": {"max_memory": 4096}}).efficiency.max_memory == 4096
    # sweep has no such flag
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--max-memory", "1G"])


@pytest.mark.parametrize(
    "value,pattern",
    [
        ("lots", r"efficiency\.max_memory: max_memory 'lots' is not a memory size"),
        (True, r"efficiency\.max_memory: max_memory must be a number of bytes .* got True"),
        (0, r"efficiency\.max_memory: max_memory must be a positive size, got 0"),
        ("-2GB", r"efficiency\.max_memory: max_memory '-2GB' is not a memory size"),
    ],
)
def test_bad_max_memory_names_the_field(value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_run_config({"efficiency": {"max_memory": value}})


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (
            ["--steps", "3", "--max-memory", "1G"],
            r"efficiency\.max_memory '1G' \(--max-memory\) streams a one-shot prune \(training\.steps: 0\), "
            r"but training\.steps is 3: training needs the whole model in memory",
        ),
        (
            ["--steps", "0", "--max-memory", "1G", "--metric", "gradient_sensitivity"],
            r"efficiency\.max_memory '1G' \(--max-memory\) prunes through the block-by-block pipeline, which "
            r"cannot run this pruning config: importance_metric 'gradient_sensitivity' is not supported",
        ),
        (
            ["--steps", "0", "--max-memory", "1G", "--set", "model.dtype=float32"],
            r"model\.dtype 'float32' is not applied when streaming",
        ),
        (
            ["--steps", "0", "--max-memory", "1G", "--model", "/nonexistent/folder"],
            r"model\.base_model '/nonexistent/folder': the folder '/nonexistent/folder' does not exist",
        ),
        (
            ["--steps", "0", "--max-memory", "lots"],
            r"efficiency\.max_memory: max_memory 'lots' is not a memory size",
        ),
        (
            ["--steps", "0", "--max-memory", "1KB", "--metric", "magnitude"],
            r"max_memory 1000 \(0\.0 MiB\) is below what streaming needs: the parameters outside the blocks "
            r"plus the largest block take",
        ),
    ],
)
def test_streaming_errors_are_one_line(folders, tmp_path, capsys, argv, pattern):
    import re

    if "--model" not in argv:
        argv = argv + ["--model", str(folders / "llama")]
    assert main(["prune", "-o", str(tmp_path / "o")] + argv + FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("artemis: error: ") and "\n" not in err
    assert re.search(pattern, err), err


def test_non_safetensors_folder_is_refused(folders, tmp_path):
    from artemis.cli.workflows import stream_folder
    from tests.fixtures import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "bin", safe_serialization=False)
    if not list((tmp_path / "bin").glob("*.bin")):  # this transformers writes safetensors only
        (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
        for f in (tmp_path / "bin").glob("*.safetensors"):
            f.unlink()
    with pytest.raises(ModelError, match=r"--max-memory streams the weights from safetensors files .* holds "):
        stream_folder(str(tmp_path / "bin"), "--max-memory")
    assert stream_folder(str(folders / "llama")) == folders / "llama"


def test_sweep_refuses_max_memory(folders, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  base_model: {folders / 'llama'}\nefficiency:\n  max_memory: 1GiB\n")
    assert main(["sweep", str(cfg), "--sparsities", "0.5", "-q", "--no-plots"]) == 2
    assert "efficiency.max_memory '1GiB' streams `artemis prune --steps 0`" in capsys.readouterr().err
