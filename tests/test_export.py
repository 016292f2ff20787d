"""save_pruned / load_pruned: bit-exact round trips, honest sizes, int8, clear errors on bad files."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from artemis import CheckpointError, ConfigError, create_pruning_manager, load_pruned, save_pruned
from artemis.core.sizing import model_compressed_bytes, model_dense_bytes
from artemis.sparse.checkpoint import META_NAME, WEIGHTS_NAME, bitmask_compress, bitmask_decompress
from artemis.sparse.quantization import Int8Linear, quantize_int8
from tests.fixtures import lm_batch, tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def _pruned(kind, dtype=torch.float32, sparsity=0.6, **kw):
    model = BUILDERS[kind](**kw).to(dtype)
    mgr = create_pruning_manager({"pruning": {"final_sparsity": sparsity}}, model)
    mgr.apply_magnitude_pruning(sparsity)
    mgr.finalize()
    return model, mgr


def _bits(t):
    t = t.detach().clone()
    if t.is_floating_point():
        t[t == 0] = 0.0  # -0.0 comes back as +0.0 (documented)
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def _assert_bit_identical(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, kind, dtype):
    model, mgr = _pruned(kind, dtype)
    info = save_pruned(model, tmp_path, manager=mgr)
    assert len(info["sparse_modules"]) == len(mgr.method.targets)
    back = load_pruned(tmp_path)
    assert type(back) is type(model)
    _assert_bit_identical(model, back)
    # outputs equal those of the stock dense round trip (save_pretrained / from_pretrained;
    # a model cast with .to(bf16) also casts its rotary buffer, a loaded one keeps it fp32)
    model.save_pretrained(tmp_path / "dense")
    stock = type(model).from_pretrained(tmp_path / "dense", dtype=dtype)
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        out_a, out_b = stock(input_ids=ids)[0], back(input_ids=ids)[0]
    assert torch.equal(out_a, out_b)
    cfg = json.loads((tmp_path / "config.json").read_text())
    sc = cfg["quantization_config"]["sparsity_config"]
    assert sc["format"] == "sparse-bitmask" and sc["sparsity_structure"] == "unstructured"
    assert sorted(sc["targets"]) == sorted(t.name for t in mgr.method.targets)
    assert sc["global_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_gpt2_tied_embeddings_stay_tied(tmp_path):
    model, mgr = _pruned("gpt2")
    save_pruned(model, tmp_path, manager=mgr)
    back = load_pruned(tmp_path)
    assert back.lm_head.weight is back.transformer.wte.weight


def test_stored_layout_is_compressed_tensors_bitmask(tmp_path):
    model, mgr = _pruned("llama")
    model.pruning_manager = mgr  # the specification attaches the manager: save_pruned finds it
    save_pruned(model, tmp_path)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / WEIGHTS_NAME))
    w = model.model.layers[1].self_attn.o_proj.weight
    p = "model.layers.1.self_attn.o_proj"
    assert f"{p}.weight" not in stored
    mask = (w != 0).numpy()
    assert torch.equal(stored[f"{p}.compressed"], w[w != 0])
    assert stored[f"{p}.bitmask"].dtype == torch.uint8
    assert np.array_equal(stored[f"{p}.bitmask"].numpy(), np.packbits(mask, axis=-1, bitorder="little"))
    assert stored[f"{p}.shape"].tolist() == [64, 64]
    counts = mask.sum(1)
    assert stored[f"{p}.row_offsets"].tolist() == (np.cumsum(counts) - counts).tolist()
    # bit 0 of byte 0 is column 0 (little bit order, as compressed-tensors' pack_bitmasks)
    d = bitmask_compress(torch.tensor([[1.0] + [0.0] * 8 + [2.0]]))
    assert d["bitmask"].tolist() == [[1, 2]]


@pytest.mark.slow
def test_compatible_with_compressed_tensors_helpers_and_config(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.config import BitmaskConfig
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.helpers import pack_bitmasks, unpack_bitmasks

    torch.manual_seed(0)
    w = torch.randn(7, 21)
    w[w.abs() < 0.8] = 0
    d = bitmask_compress(w)
    assert torch.equal(d["bitmask"], pack_bitmasks(w != 0))
    assert torch.equal(unpack_bitmasks(d["bitmask"], [7, 21]), w != 0)
    model, mgr = _pruned("llama")
    save_pruned(model, tmp_path, manager=mgr, quantize="int8")
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    BitmaskConfig.model_validate(qc["sparsity_config"])
    parsed = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "sparsity_config"})
    assert parsed.config_groups["group_0"].weights.strategy == "channel"


# (a llama cast with .to(bf16) has a bf16 rotary buffer, a loaded one fp32: outputs differ)
@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("gpt2", torch.bfloat16)])
def test_int8_export_round_trip_keeps_every_zero(tmp_path, kind, dtype):
    model, mgr = _pruned(kind, dtype, sparsity=0.5)
    zeros = {t.name: int((t.param == 0).sum()) for t in mgr.method.targets}
    info = save_pruned(model, tmp_path, manager=mgr, quantize="int8")
    assert sorted(info["int8_modules"]) == sorted(zeros)
    assert all(
        isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n in zeros
    )  # the model itself is unchanged
    back = load_pruned(tmp_path)
    ref = quantize_int8(model)  # what the export encodes, made in memory
    _assert_bit_identical(ref, back)
    for name, z in zeros.items():
        m = back.get_submodule(name)
        assert isinstance(m, Int8Linear) and int((m.weight == 0).sum()) == z
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids)[0], back(input_ids=ids)[0])
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "int-quantized"
    assert cfg["config_groups"]["group_0"]["weights"]["num_bits"] == 8


def test_already_quantized_model_saves_and_loads(tmp_path):
    model, mgr = _pruned("llama", sparsity=0.5)
    mgr.prepare_for_quantization() if not mgr.finalized else None
    quantize_int8(model, [t.name for t in mgr.method.targets])
    info = save_pruned(model, tmp_path)
    assert len(info["sparse_modules"]) == len(mgr.method.targets)
    _assert_bit_identical(model, load_pruned(tmp_path))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_disk_bytes_agree_with_summary_and_bitmask_bound(tmp_path, dtype):
    kw = dict(hidden_size=512, intermediate_size=1024, vocab_size=256, layers=1)
    model, mgr = _pruned("llama", dtype, sparsity=0.6, **kw)
    targets = [t.param for t in mgr.method.targets]
    n = sum(p.numel() for p in targets)
    for quantize in (None, "int8"):
        info = save_pruned(model, tmp_path / str(quantize), manager=mgr, quantize=quantize)
        dense = info["dense_bytes"]
        predicted = model_compressed_bytes(model, targets, quantize=quantize)
        assert abs(info["bytes_on_disk"] - predicted) < 0.01 * dense
        if quantize is None:
            summary = mgr.get_pruning_summary()["pruning_metrics"]
            disk_reduction = 1 - info["bytes_on_disk"] / dense
            assert abs(disk_reduction - summary["model_size_reduction"]) < 0.01
        # bound: kept values (1 byte each for int8) + 1 bit per pruned-layer weight + the rest dense
        vb = 1 if quantize == "int8" else model.dtype.itemsize
        rest = dense - sum(p.numel() * p.element_size() for p in targets)
        bound = 0.4 * n * vb + n / 8 + rest
        assert info["bytes_on_disk"] <= bound + 0.02 * dense, quantize


def test_structural_results_are_saved_dense_and_load_with_transformers(tmp_path):
    model, mgr = _pruned("llama")
    mgr.method.structural = True  # what a structural method declares: its model is already smaller
    info = save_pruned(model, tmp_path, manager=mgr)
    assert info["sparse_modules"] == []
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in cfg
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(stock.state_dict()[k], v), k


def test_plain_torch_module_with_shared_weights(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    net[2].weight = net[0].weight
    with torch.no_grad():
        net[0].weight[net[0].weight.abs() < 0.1] = 0
    save_pruned(net, tmp_path)
    meta = json.loads((tmp_path / META_NAME).read_text())
    assert meta["aliases"] == {"2.weight": "0.weight"} and meta["library"] == "torch"
    with pytest.raises(CheckpointError, match="saved from a plain torch module.*pass model="):
        load_pruned(tmp_path)
    fresh = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    back = load_pruned(tmp_path, model=fresh)
    _assert_bit_identical(net, back)


def test_tokenizer_is_saved(tmp_path, minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    model, mgr = _pruned("bert")
    save_pruned(model, tmp_path, manager=mgr, tokenizer=tok)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_bad_quantize_value(tmp_path, llama):
    with pytest.raises(ConfigError, match=r"quantize must be None or 'int8', got 'int4'"):
        save_pruned(llama, tmp_path, quantize="int4")
    assert not (tmp_path / WEIGHTS_NAME).exists()


# ------------------------------------------------------------------ bad files
@pytest.fixture
def saved(tmp_path):
    model, mgr = _pruned("llama")
    save_pruned(model, tmp_path, manager=mgr)
    return tmp_path


def _rewrite(path, fn):
    """Load the stored tensors, let fn change them, write them back with fresh checksums."""
    from safetensors.torch import load_file, save_file

    from artemis.sparse.checkpoint import CHECKSUM, CHECKSUMS

    tensors = load_file(str(path / WEIGHTS_NAME))
    fn(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))
    meta = json.loads((path / META_NAME).read_text())
    meta["checksums"] = {k: CHECKSUMS[CHECKSUM](v) for k, v in tensors.items()}
    (path / META_NAME).write_text(json.dumps(meta))


P = "model.layers.0.mlp.up_proj"


def test_missing_files(saved):
    (saved / WEIGHTS_NAME).rename(saved / "x")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weights file is missing"):
        load_pruned(saved)
    (saved / "x").rename(saved / WEIGHTS_NAME)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: file is missing"):
        load_pruned(saved)
    (saved / META_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"artemis_export\.json: file is missing"):
        load_pruned(saved)
    with pytest.raises(CheckpointError, match="folder does not exist"):
        load_pruned(saved / "nope")


def test_truncated_file_names_the_tensors_cut_off(saved):
    f = saved / WEIGHTS_NAME
    data = f.read_bytes()
    f.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor\(s\) .*end beyond the end"):
        load_pruned(saved)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated \(5 bytes"):
        load_pruned(saved)


def test_corrupted_byte_names_the_tensor(saved):
    f = saved / WEIGHTS_NAME
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    header = json.loads(bytes(data[8 : 8 + n]))
    start, _ = header[f"{P}.compressed"]["data_offsets"]
    data[8 + n + start + 3] ^= 0x40
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"tensor '{P}\.compressed' is corrupted \(XXH3-64"):
        load_pruned(saved)
    data[9] ^= 0xFF  # garble the header itself
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: (corrupted|truncated)"):
        load_pruned(saved)


def test_bitmask_size_mismatch_names_tensor_and_file(saved):
    _rewrite(saved, lambda t: t.__setitem__(f"{P}.bitmask", t[f"{P}.bitmask"][:, :-1].contiguous()))
    with pytest.raises(
        CheckpointError,
        match=rf"tensor '{P}\.weight' in .*model\.safetensors: bitmask .*"
        r"does not match the shape",
    ):
        load_pruned(saved)


def test_value_count_mismatch(saved):
    _rewrite(saved, lambda t: t.__setitem__(f"{P}.compressed", t[f"{P}.compressed"][:-1].contiguous()))
    with pytest.raises(CheckpointError, match=rf"'{P}\.weight'.*bitmask marks \d+ non-zero weights but .* holds"):
        load_pruned(saved)


def test_missing_tensor_and_wrong_shape(saved):
    _rewrite(saved, lambda t: t.pop(f"{P}.row_offsets"))
    with pytest.raises(CheckpointError, match=rf"'{P}\.weight'.*missing {P}\.row_offsets"):
        load_pruned(saved)


def test_missing_dense_tensor(saved):
    _rewrite(saved, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' is missing"):
        load_pruned(saved)


def test_shape_does_not_match_model(saved):
    def grow(t):
        t["model.norm.weight"] = torch.ones(65)

    _rewrite(saved, grow)
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(65,\); the model expects \(64,\)"):
        load_pruned(saved)


def test_format_version_checked(saved):
    meta = json.loads((saved / META_NAME).read_text())
    meta["format_version"] = 99
    (saved / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99; this Artemis reads versions 1, 2, 3"):
        load_pruned(saved)


def test_format_1_folders_with_crc32_still_load(saved):
    """Format 1 stored CRC-32 checksums and no "checksum" key; formats 2 and 3 write XXH3-64."""
    import zlib

    from safetensors.torch import load_file

    meta = json.loads((saved / META_NAME).read_text())
    assert meta["format_version"] == 3 and meta["checksum"] == "xxh3_64"
    expected = load_pruned(saved).state_dict()
    tensors = load_file(str(saved / WEIGHTS_NAME))
    meta["format_version"] = 1
    del meta["checksum"]
    meta["checksums"] = {k: zlib.crc32(v.contiguous().view(torch.uint8).numpy()) for k, v in tensors.items()}
    (saved / META_NAME).write_text(json.dumps(meta))
    back = load_pruned(saved).state_dict()
    assert all(torch.equal(back[k], v) for k, v in expected.items())
    meta["checksums"][f"{P}.compressed"] ^= 1
    (saved / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=rf"tensor '{P}\.compressed' is corrupted \(CRC-32 0x[0-9a-f]+, expected 0x"
    ):
        load_pruned(saved)
    meta["format_version"] = 2
    meta["checksum"] = "md5"
    (saved / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checksum 'md5' is unknown; valid: 'crc32', 'xxh3_64'"):
        load_pruned(saved)


def test_bitmask_decompress_hand_example():
    parts = {
        "compressed": torch.tensor([5.0, 6.0]),
        "bitmask": torch.tensor([[0b10000000], [0b00000001]], dtype=torch.uint8),
        "shape": torch.tensor([2, 8]),
        "row_offsets": torch.tensor([0, 1]),
    }
    dense = bitmask_decompress(parts)
    assert dense.tolist() == [[0, 0, 0, 0, 0, 0, 0, 5.0], [6.0, 0, 0, 0, 0, 0, 0, 0]]
    parts["row_offsets"] = torch.tensor([0, 0])
    with pytest.raises(CheckpointError, match="row_offsets does not match"):
        bitmask_decompress(parts, name="w", file="f.safetensors")


def test_model_dense_bytes_counts_saved_tensors_once(llama):
    assert model_dense_bytes(llama) == sum(p.numel() * 4 for p in llama.parameters())


def test_codec_without_numpy_bitwise_count(monkeypatch):
    torch.manual_seed(1)
    w = torch.randn(9, 13).to(torch.bfloat16)
    w[w.abs() < 0.7] = 0
    ref = bitmask_compress(w)
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy 1.x has no bitwise_count
    d = bitmask_compress(w)
    assert all(torch.equal(d[k], ref[k]) for k in d)
    assert torch.equal(bitmask_decompress(d), w)


@pytest.mark.parametrize("workers", [1, 3])
def test_parallel_decode_matches_serial(saved, workers):
    ref = load_pruned(saved, workers=1)
    _assert_bit_identical(ref, load_pruned(saved, workers=workers))
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        load_pruned(saved, workers=0)


def test_first_corrupted_tensor_is_reported_with_parallel_workers(saved):
    def corrupt(t):
        t[f"{P}.compressed"][0] += 1
        t["model.norm.weight"][0] += 1

    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / WEIGHTS_NAME))
    corrupt(tensors)
    save_file(tensors, str(saved / WEIGHTS_NAME))  # checksums left stale: both tensors fail
    first = next(k for k in tensors if k in (f"{P}.compressed", "model.norm.weight"))
    with pytest.raises(CheckpointError, match=rf"tensor '{first}' is corrupted"):
        load_pruned(saved, workers=4)


def test_bad_int8_checkpoint_leaves_a_passed_model_untouched(tmp_path):
    model, mgr = _pruned("llama", sparsity=0.5)
    save_pruned(model, tmp_path, manager=mgr, quantize="int8")

    def grow(t):
        t["model.norm.weight"] = torch.ones(65)

    _rewrite(tmp_path, grow)
    target = BUILDERS["llama"]()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    kinds = {n: type(m) for n, m in target.named_modules()}
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has shape \(65,\)"):
        load_pruned(tmp_path, model=target)
    assert {n: type(m) for n, m in target.named_modules()} == kinds  # no Int8Linear swapped in
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------ format 3 and dense
def test_config_json_is_covered_by_the_checksums(saved):
    meta = json.loads((saved / META_NAME).read_text())
    assert set(meta["files"]) == {"config.json"}
    cfg = json.loads((saved / "config.json").read_text())
    cfg["num_attention_heads"] = 8
    (saved / "config.json").write_text(json.dumps(cfg, indent=2))
    with pytest.raises(CheckpointError, match=r"config\.json: the file was changed after save_pruned wrote it \(XXH3"):
        load_pruned(saved)
    del meta["files"]
    (saved / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"artemis_export\.json: config\.json has no checksum"):
        load_pruned(saved)


def test_config_marker_for_stock_loaders(saved):
    from artemis.sparse.checkpoint import LOAD_HINT, QUANT_METHOD

    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == QUANT_METHOD == "artemis"
    # not a *.safetensors name: stock transformers raises with this text instead of loading
    assert cfg["transformers_weights"] == LOAD_HINT and not LOAD_HINT.endswith(".safetensors")
    assert "artemis.load_pruned" in LOAD_HINT and "import artemis" in LOAD_HINT


def _old_quantization_config(qc):
    """What format 1/2 wrote: compressed-tensors' quant_method, no transformers_weights."""
    return {**qc, "quant_method": "compressed-tensors", "version": "artemis-export-1"}


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_format_2_folders_with_compressed_tensors_config_still_load(tmp_path, quantize):
    model, mgr = _pruned("llama", sparsity=0.5)
    save_pruned(model, tmp_path, manager=mgr, quantize=quantize)
    expected = load_pruned(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = _old_quantization_config(cfg["quantization_config"])
    del cfg["transformers_weights"]
    (tmp_path / "config.json").write_text(json.dumps(cfg, indent=2))
    meta = json.loads((tmp_path / META_NAME).read_text())
    meta["format_version"] = 2
    del meta["files"]
    (tmp_path / META_NAME).write_text(json.dumps(meta))
    back = load_pruned(tmp_path)
    _assert_bit_identical(expected, back)
    assert not hasattr(back.config, "quantization_config") or back.config.quantization_config is None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dense_format_is_a_plain_hugging_face_folder(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    model, mgr = _pruned(kind, torch.bfloat16)
    info = save_pruned(model, tmp_path, manager=mgr, format="dense")
    assert info["format"] == "dense" and info["sparse_modules"] == [] and "model.safetensors" in info["files"]
    assert not (tmp_path / META_NAME).exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in cfg and "transformers_weights" not in cfg
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert not getattr(stock, "is_quantized", False)
    for k, v in model.state_dict().items():
        assert torch.equal(stock.state_dict()[k], v), k  # the zeros in place
    assert info["bytes_on_disk"] >= model_dense_bytes(model)
    with pytest.raises(CheckpointError, match="looks like a plain Hugging Face folder.*from_pretrained"):
        load_pruned(tmp_path)


def test_dense_format_plain_module_and_refusals(tmp_path):
    from safetensors.torch import load_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[0].weight[:, :8] = 0
    info = save_pruned(net, tmp_path / "plain", format="dense")
    assert info["files"] == [WEIGHTS_NAME]
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    load_model(fresh, str(tmp_path / "plain" / WEIGHTS_NAME))
    _assert_bit_identical(net, fresh)
    with pytest.raises(ConfigError, match="format must be one of 'compressed', 'dense', got 'gguf'"):
        save_pruned(net, tmp_path / "x", format="gguf")
    model, mgr = _pruned("llama", sparsity=0.5)
    with pytest.raises(ConfigError, match="quantize='int8' needs format='compressed'"):
        save_pruned(model, tmp_path / "x", manager=mgr, quantize="int8", format="dense")
    quantize_int8(model, [t.name for t in mgr.method.targets])
    with pytest.raises(ConfigError, match="is an Int8Linear"):
        save_pruned(model, tmp_path / "x", format="dense")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ atomic writes
def _siblings(dest):
    return sorted(p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}."))


class _FailingTokenizer:
    def __init__(self, exc):
        self.exc = exc

    def save_pretrained(self, path):
        (Path(path) / "tokenizer.json").write_text("{}")
        raise self.exc


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_no_orphan_and_the_old_output(tmp_path, exc):
    dest = tmp_path / "out"
    model, mgr = _pruned("llama")
    save_pruned(model, dest, manager=mgr)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(type(exc)):
        save_pruned(model, dest, manager=mgr, tokenizer=_FailingTokenizer(exc))
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert _siblings(dest) == []
    with pytest.raises(type(exc)):
        save_pruned(model, tmp_path / "new", manager=mgr, tokenizer=_FailingTokenizer(exc))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written


def test_stale_temp_of_a_killed_run_is_cleaned(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dest = tmp_path / "out"
    stale = tmp_path / f".out.artemis-tmp-{dead.pid}-0badc0de"
    stale.mkdir()
    (stale / WEIGHTS_NAME).write_bytes(b"half")
    live = tmp_path / f".out.artemis-tmp-{os.getppid()}-00000000"  # a writer still running: kept
    live.mkdir()
    other = tmp_path / ".other.artemis-tmp-1-00000000"  # another destination's: not ours to judge
    other.mkdir()
    model, mgr = _pruned("llama")
    save_pruned(model, dest, manager=mgr)
    assert not stale.exists() and live.exists() and other.exists()
    load_pruned(dest)


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_the_whole_output(tmp_path, monkeypatch, exchange):
    import artemis.sparse.checkpoint as ckpt

    if not exchange:  # the two-rename fallback (no renameat2)
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    a, mgr_a = _pruned("llama", seed=1)
    save_pruned(a, dest, manager=mgr_a)
    (dest / "artemis_run.json").write_text("{}")
    (dest / "stale-extra.bin").write_bytes(b"x")
    b, mgr_b = _pruned("gpt2")
    save_pruned(b, dest, manager=mgr_b)
    assert not (dest / "stale-extra.bin").exists() and not (dest / "artemis_run.json").exists()
    _assert_bit_identical(b, load_pruned(dest))
    assert _siblings(dest) == []


def test_refuses_to_replace_a_folder_with_other_files(tmp_path):
    model, mgr = _pruned("llama")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="the folder exists and holds other files"):
        save_pruned(model, tmp_path, manager=mgr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        save_pruned(model, tmp_path / "file", manager=mgr)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_pruned(model, empty, manager=mgr)["path"] == str(empty)
