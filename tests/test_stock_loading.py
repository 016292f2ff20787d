"""Stock loaders on save_pruned folders: they refuse without ``import artemis`` (never random
weights) and, after it, give load_pruned's model through transformers' quantizer plugin."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import artemis
from artemis import CheckpointError, ConfigError, create_pruning_manager, load_pruned, save_pruned
from artemis.sparse.checkpoint import CONFIG_NAME, META_NAME, QUANT_METHOD
from artemis.sparse.inference import SparseLinear
from artemis.sparse.quantization import Int8Linear
from tests.fixtures import lm_batch, tiny_bert, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a pruned model still embeds sentences", "the cat sat on the mat", "zeros are cheap to store"]


def _prune(model, sparsity=0.6):
    mgr = create_pruning_manager({"pruning": {"final_sparsity": sparsity}}, model)
    mgr.apply_magnitude_pruning(sparsity)
    mgr.finalize()
    return mgr


def _run_fresh(code: str, timeout: int = 240, stderr: bool = False) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet); its stdout (and stderr)."""
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"subprocess failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc.stdout + proc.stderr if stderr else proc.stdout


def _assert_same_state(a, b):
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A bf16 and an int8 tiny Llama, a float32 tiny BERT, a dense-format Llama."""
    root = tmp_path_factory.mktemp("stock")
    llama = tiny_llama().to(torch.bfloat16)
    mgr = _prune(llama)
    save_pruned(llama, root / "llama-bf16", manager=mgr)
    save_pruned(llama, root / "llama-int8", manager=mgr, quantize="int8")
    save_pruned(llama, root / "llama-dense", manager=mgr, format="dense")
    bert = tiny_bert()
    save_pruned(bert, root / "bert", manager=_prune(bert))
    return root


@pytest.fixture(scope="module")
def minilm_folder(tmp_path_factory, minilm_dir):
    """The real all-MiniLM-L6-v2, 50% magnitude-pruned, saved with its sentence-transformers files."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(minilm_dir)).eval()
    with torch.no_grad():  # half of every encoder Linear's weights, smallest magnitudes first
        for m in model.encoder.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    out = tmp_path_factory.mktemp("minilm") / "pruned"
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    info = save_pruned(model, out, tokenizer=tok)  # the source folder is found from config._name_or_path
    assert len(info["sparse_modules"]) == 36
    assert {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/"} <= set(
        info["files"]
    )
    return out, model


# ------------------------------------------------------------- without artemis
@pytest.mark.slow
def test_stock_loaders_refuse_without_artemis(folders, minilm_folder):
    st_folder, _ = minilm_folder
    code = f"""
import json, sys, torch
from transformers import AutoModel, AutoModelForCausalLM
from sentence_transformers import SentenceTransformer
out = {{}}
cases = [
    ("llama-bf16/causal", AutoModelForCausalLM.from_pretrained, {str(folders / "llama-bf16")!r}),
    ("llama-bf16/auto", AutoModel.from_pretrained, {str(folders / "llama-bf16")!r}),
    ("llama-int8/causal", AutoModelForCausalLM.from_pretrained, {str(folders / "llama-int8")!r}),
    ("llama-int8/auto", AutoModel.from_pretrained, {str(folders / "llama-int8")!r}),
    ("bert/auto", AutoModel.from_pretrained, {str(folders / "bert")!r}),
    ("minilm/auto", AutoModel.from_pretrained, {str(st_folder)!r}),
    ("minilm/st", SentenceTransformer, {str(st_folder)!r}),
]
for name, load, path in cases:
    try:
        load(path)
        out[name] = "loaded"
    except Exception as exc:
        out[name] = type(exc).__name__ + ": " + str(exc)
dense = AutoModelForCausalLM.from_pretrained({str(folders / "llama-dense")!r})
torch.save(dense.state_dict(), {str(folders / "dense_state.pt")!r})
out["artemis imported"] = "artemis" in sys.modules
print(json.dumps(out))
"""
    result = json.loads(_run_fresh(code).strip().splitlines()[-1])
    assert result.pop("artemis imported") is False
    for name, msg in result.items():
        assert msg.startswith("ValueError: "), (name, msg)  # raised at load time, not at the first forward
        assert "ARTEMIS COMPRESSED CHECKPOINT" in msg, (name, msg)
        assert "artemis.load_pruned(folder)" in msg and "import artemis" in msg, (name, msg)
        assert f"quant_method={QUANT_METHOD!r}" in msg and "format='dense'" in msg, (name, msg)
    # the dense format is a plain folder: stock transformers reads it as saved
    stock = torch.load(folders / "dense_state.pt", weights_only=True)
    _assert_same_state(load_pruned(folders / "llama-bf16"), stock)


def test_import_artemis_does_not_import_transformers():
    """The plugin registers when transformers' quantizer registry is first imported, once."""
    out = _run_fresh(
        "import sys, artemis\n"
        "print('transformers' in sys.modules)\n"
        "from artemis.sparse.hf_quantizer import ArtemisQuantizationConfig\n"  # imports the registry now
        "from transformers.quantizers import auto\n"
        "print(auto.AUTO_QUANTIZER_MAPPING['artemis'].__name__, auto.AUTO_QUANTIZATION_CONFIG_MAPPING['artemis'].__name__)\n"
        "print(auto.AUTO_QUANTIZATION_CONFIG_MAPPING['artemis'] is ArtemisQuantizationConfig)\n",
        stderr=True,
    )
    assert out.split() == ["False", "ArtemisHfQuantizer", "ArtemisQuantizationConfig", "True"], out


# ------------------------------------------------------------------ with artemis
@pytest.mark.parametrize("folder", ["llama-bf16", "llama-int8"])
def test_from_pretrained_equals_load_pruned(folders, folder):
    from transformers import AutoModelForCausalLM

    ref = load_pruned(folders / folder)
    got = AutoModelForCausalLM.from_pretrained(str(folders / folder))
    assert type(got) is type(ref)
    _assert_same_state(ref, got)
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, got(input_ids=ids).logits)
    up = got.get_submodule("model.layers.0.mlp.up_proj")
    if folder == "llama-int8":
        assert isinstance(up, Int8Linear)
        assert got.config.quantization_config.quant_method == QUANT_METHOD  # an int8 model stays marked
    else:
        assert type(up) is nn.Linear and up.weight.dtype == torch.bfloat16
        assert getattr(got.config, "quantization_config", None) is None  # dense: a plain model
        assert not hasattr(got.config, "transformers_weights")


def test_automodel_on_causal_lm_folder_and_bert(folders):
    from transformers import AutoModel

    ref = load_pruned(folders / "llama-int8")
    base = AutoModel.from_pretrained(str(folders / "llama-int8"))  # LlamaModel: the prefix is dropped
    assert isinstance(base.layers[0].mlp.up_proj, Int8Linear)
    for k, v in base.state_dict().items():
        assert torch.equal(v, ref.state_dict()[f"model.{k}"]), k
    bert = AutoModel.from_pretrained(str(folders / "bert"))
    _assert_same_state(load_pruned(folders / "bert"), bert)


def test_dense_layers_save_as_a_plain_folder(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    got = AutoModelForCausalLM.from_pretrained(str(folders / "llama-bf16"))
    got.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert "quantization_config" not in cfg and "transformers_weights" not in cfg
    _assert_same_state(got, AutoModelForCausalLM.from_pretrained(str(tmp_path)))


@pytest.mark.parametrize("how", ["env", "config"])
def test_sparse_backend_keeps_layers_compressed(folders, monkeypatch, how):
    from transformers import AutoModelForCausalLM

    from artemis.sparse.hf_quantizer import ENV_SPARSE_BACKEND, ArtemisQuantizationConfig

    path = str(folders / "llama-bf16")
    if how == "env":
        monkeypatch.setenv(ENV_SPARSE_BACKEND, "csr")
        got = AutoModelForCausalLM.from_pretrained(path)
    else:
        with pytest.warns(UserWarning, match="loading attributes"):
            got = AutoModelForCausalLM.from_pretrained(
                path, quantization_config=ArtemisQuantizationConfig(sparse_backend="csr")
            )
    ref = load_pruned(folders / "llama-bf16")
    meta = json.loads((folders / "llama-bf16" / META_NAME).read_text())
    for name in meta["sparse_modules"]:
        sp = got.get_submodule(name)
        assert isinstance(sp, SparseLinear) and sp.backend == "csr"
        assert torch.equal(sp.dense_weight(), ref.get_submodule(name).weight.float())
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits.float(), got(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=0.1, rtol=0.05)  # bf16 activations, float32 sparse products
    with pytest.raises(ValueError, match="not serializable"):
        got.save_pretrained(folders / "never")
    with pytest.raises(ConfigError, match="is a SparseLinear"):
        save_pruned(got, folders / "never")
    assert not (folders / "never").exists()


def test_bad_sparse_backend(folders, monkeypatch):
    from transformers import AutoModelForCausalLM

    from artemis.sparse.hf_quantizer import ENV_SPARSE_BACKEND, ArtemisQuantizationConfig

    with pytest.raises(ValueError, match="sparse_backend must be one of 'dense', 'csr', 'bitmask', 'auto'"):
        ArtemisQuantizationConfig(sparse_backend="cusparse")
    monkeypatch.setenv(ENV_SPARSE_BACKEND, "nope")
    with pytest.raises(ValueError, match=f"{ENV_SPARSE_BACKEND}: sparse_backend must be one of"):
        AutoModelForCausalLM.from_pretrained(str(folders / "llama-bf16"))


def test_quantization_config_on_a_plain_folder_is_refused(folders):
    from transformers import AutoModelForCausalLM

    from artemis.sparse.hf_quantizer import ArtemisQuantizationConfig

    with pytest.raises(ValueError, match="artemis does require the model to be pre-quantized"):
        AutoModelForCausalLM.from_pretrained(
            str(folders / "llama-dense"), quantization_config=ArtemisQuantizationConfig()
        )


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_plugin_checks_config_and_tensor_checksums(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    from artemis.sparse.hf_quantizer import ArtemisQuantizationConfig

    edited = _copy(folders / "llama-bf16", tmp_path / "edited")
    cfg = json.loads((edited / CONFIG_NAME).read_text())
    cfg["num_attention_heads"] = 8
    (edited / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: the file was changed after save_pruned wrote it"):
        AutoModelForCausalLM.from_pretrained(str(edited))

    bad = _copy(folders / "llama-bf16", tmp_path / "bad")
    meta = json.loads((bad / META_NAME).read_text())
    key = "model.layers.0.mlp.up_proj.compressed"
    meta["checksums"][key] ^= 1
    (bad / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is corrupted \(XXH3-64"):
        AutoModelForCausalLM.from_pretrained(str(bad))
    # verify=False skips the tensor checksums (the bytes are fine here, only the listed sum is off)
    AutoModelForCausalLM.from_pretrained(str(bad), quantization_config=ArtemisQuantizationConfig(verify=False))


# ------------------------------------------------------------ sentence-transformers
@pytest.mark.slow
def test_sentence_transformer_loads_pruned_folder(minilm_folder, minilm_dir):
    from sentence_transformers import SentenceTransformer

    out, pruned = minilm_folder
    st = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling", "Normalize"]
    # the reference: the original sentence-transformers pipeline with the pruned weights
    ref = SentenceTransformer(str(minilm_dir), device="cpu")
    ref[0].auto_model.load_state_dict(pruned.state_dict())
    a = st.encode(TEXTS, convert_to_tensor=True)
    b = ref.encode(TEXTS, convert_to_tensor=True)
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # normalised
    _assert_same_state(load_pruned(out), st[0].auto_model)


@pytest.mark.slow
def test_sentence_transformer_files_survive_load_and_save_again(minilm_folder, tmp_path):
    out, _ = minilm_folder
    again = tmp_path / "again"
    info = save_pruned(load_pruned(out), again)  # load_pruned records the folder in config._name_or_path
    assert "modules.json" in info["files"] and (again / "1_Pooling" / "config.json").is_file()
    assert (again / "sentence_bert_config.json").read_text() == (out / "sentence_bert_config.json").read_text()
    none = save_pruned(load_pruned(out), tmp_path / "none", source_dir=False)
    assert "modules.json" not in none["files"] and not (tmp_path / "none" / "modules.json").exists()
    with pytest.raises(ConfigError, match="has no modules.json"):
        save_pruned(load_pruned(out), tmp_path / "x", source_dir=tmp_path)


def test_plugin_registered_on_import():
    from transformers.quantizers import auto

    assert artemis is not None
    assert auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD].__name__ == "ArtemisHfQuantizer"
