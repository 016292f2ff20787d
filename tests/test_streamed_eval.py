"""Streamed evaluation (`artemis.evaluation.streamed`): the in-memory figures, one block resident."""

from __future__ import annotations

import pytest
import torch

import artemis
from artemis.core.errors import CheckpointError
from artemis.evaluation.quality import parameter_stats, perplexity, sentence_embeddings
from artemis.evaluation.streamed import StreamedModel, open_lazy, streamed_block_bytes
from artemis.sparse import streaming
from tests.fixtures import tiny_bert, tiny_llama, tiny_qwen2_sliding


class _Tok:
    """A stand-in tokenizer: one id per word, padded, with an attention mask."""

    def __call__(self, texts, padding=True, truncation=True, max_length=128, return_tensors="pt"):
        ids = [[(len(w) * 7 + i) % 100 + 1 for i, w in enumerate(t.split())][:max_length] for t in texts]
        width = max(map(len, ids))
        mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
        ids = [i + [0] * (width - len(i)) for i in ids]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


TEXTS = ["a bb ccc dddd", "hello world this is a test", "x", "the quick brown fox jumps over"] * 5


def _blocks() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = [{"input_ids": torch.randint(0, 128, (3, 16), generator=g)} for _ in range(3)]
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, 10:] = 0
    out[1]["attention_mask"] = mask
    out[2]["labels"] = out[2]["input_ids"].clone()
    out[2]["labels"][:, :4] = -100
    return out


@pytest.fixture
def spy(monkeypatch):
    """How many blocks have real parameters after each materialisation."""
    from artemis.arch import get_adapter

    seen: list[int] = []
    original = streaming.LazyCheckpoint.materialise

    def materialise(self, names):
        original(self, names)
        blocks = get_adapter(self.model).blocks
        seen.append(sum(1 for b in blocks if any(p.device.type != "meta" for p in b.parameters())))

    monkeypatch.setattr(streaming.LazyCheckpoint, "materialise", materialise)
    return seen


def _check_resident(sm: StreamedModel, model: torch.nn.Module, seen: list[int]) -> None:
    outer, block = streamed_block_bytes(model)
    assert max(seen) == 1 and sm.max_resident_blocks == 1
    assert sm.peak_param_bytes == outer + block  # the parameters outside the blocks plus one block
    assert sm.peak_param_bytes < sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_llama_perplexity_bit_identical_one_block_resident(tmp_path, spy, tied):
    model = tiny_llama(layers=4, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 3
    blocks = _blocks()
    with StreamedModel(tmp_path / "m") as sm:
        got = sm.perplexity(blocks)
        assert sm.block_forwards == 4 * len(blocks)
    assert got == perplexity(model, blocks)  # bit for bit
    assert sm.parameters == parameter_stats(model)
    _check_resident(sm, model, spy)
    assert sm.lazy.live_bytes == 0  # everything freed at the end
    if tied:  # the checkpoint stores lm_head once, as the embeddings; streaming ties them again
        assert sm.model.lm_head.weight is sm.model.model.embed_tokens.weight
        s = artemis.oneshot(
            tmp_path / "m",
            {"pruning": {"final_sparsity": 0.5}},
            None,
            tmp_path / "o",
            max_memory="1MB",
            progress=False,
        )
        assert s["pipeline"]["streamed"] and s["measured_sparsity"] == 0.5


def test_sliding_window_layers_keep_their_own_mask(tmp_path, spy):
    """Qwen2 with full-attention then sliding-window layers: each streamed block runs with
    the arguments the model gives it (its layer type's mask), so the perplexity is the
    model's own bit for bit."""
    model = tiny_qwen2_sliding()
    model.save_pretrained(tmp_path / "q", max_shard_size="100KB")
    blocks = _blocks()
    with StreamedModel(tmp_path / "q") as sm:
        got = sm.perplexity(blocks)
    assert got == perplexity(model, blocks)
    _check_resident(sm, model, spy)


def test_bert_embeddings_bit_identical_one_block_resident(tmp_path, spy):
    model = tiny_bert(layers=3)
    model.save_pretrained(tmp_path / "b", max_shard_size="60KB")
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 3
    with StreamedModel(tmp_path / "b") as sm:
        got = sm.sentence_embeddings(_Tok(), TEXTS, batch_size=8, max_length=5)
    want = sentence_embeddings(model, _Tok(), TEXTS, batch_size=8, max_length=5)
    assert got.shape == (len(TEXTS), 64) and torch.equal(got, want)
    _check_resident(sm, model, spy)


def test_pruned_folder_is_read_and_decompressed(tmp_path, spy):
    model = tiny_llama(layers=2, tie_word_embeddings=True)
    blocks = _blocks()
    artemis.oneshot(
        model,
        {"pruning": {"final_sparsity": 0.5, "importance_metric": "activation"}},
        blocks,
        tmp_path / "p",
        progress=False,
    )
    lazy = open_lazy(tmp_path / "p")
    assert type(lazy).__name__ == "_PrunedCheckpoint"
    lazy.close()
    with StreamedModel(tmp_path / "p") as sm:
        got = sm.perplexity(blocks)
    assert got == perplexity(model, blocks)
    assert sm.parameters == parameter_stats(model)  # the zeros counted as read: 50% of the targets
    assert sm.parameters["nonzero_parameters"] < sm.parameters["parameters"]
    assert max(spy) == 1


def test_changed_pruned_tensor_fails_its_checksum(tmp_path):
    model = tiny_llama(layers=1)
    artemis.oneshot(model, {"pruning": {"final_sparsity": 0.5}}, None, tmp_path / "p", progress=False)
    f = tmp_path / "p" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # a byte of the last tensor
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"fails its checksum"):
        with StreamedModel(tmp_path / "p") as sm:
            sm.perplexity(_blocks())


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config.json; streaming needs a Hugging Face model folder"):
        StreamedModel(tmp_path)
    model = tiny_llama(layers=1)
    model.save_pretrained(tmp_path / "m")
    with StreamedModel(tmp_path / "m") as sm:
        with pytest.raises(ValueError, match="needs at least one batch"):
            sm.run([], lambda *a: None)
        with pytest.raises(ValueError, match="texts must be a non-empty list of strings"):
            sm.sentence_embeddings(_Tok(), [])
        with pytest.raises(Exception, match="returns no last_hidden_state"):
            sm.sentence_embeddings(_Tok(), ["a b"])


def test_mapped_parameters_and_stored_bytes(tmp_path, monkeypatch):
    """LazyCheckpoint.mapped puts the stored values in place (counted, then back on meta);
    stored_bytes and StreamingWriter.add_stored copy a tensor piece by piece with the
    checksum of the whole tensor, for each checksum the export format knows."""
    from artemis.sparse import checkpoint

    model = tiny_llama()
    folder = tmp_path / "in"
    model.save_pretrained(str(folder), max_shard_size="100KB")
    lazy = streaming.LazyCheckpoint(folder)
    names = ["model.embed_tokens.weight", "lm_head.weight"]
    nbytes = 2 * 128 * 64 * 4
    with lazy.mapped(names):
        assert torch.equal(lazy.model.model.embed_tokens.weight, model.model.embed_tokens.weight)
        assert torch.equal(lazy.model.lm_head.weight, model.lm_head.weight)
        assert lazy.live_bytes == nbytes
    assert lazy.model.lm_head.weight.device.type == "meta" and lazy.model.model.embed_tokens.weight.is_meta
    assert lazy.live_bytes == 0 and lazy.peak_bytes == nbytes
    pieces = [bytes(v) for v in lazy.stored_bytes("lm_head.weight", chunk=1000)]
    assert len(pieces) == 33 and b"".join(pieces) == model.lm_head.weight.detach().numpy().tobytes()
    with pytest.raises(CheckpointError, match="chunk must be a positive number of bytes, got 0"):
        list(lazy.stored_bytes("lm_head.weight", chunk=0))
    monkeypatch.setattr(streaming, "COPY_CHUNK", 1000)
    for algo in ("xxh3_64", "crc32"):
        monkeypatch.setattr(checkpoint, "CHECKSUM", algo)
        writer = streaming.StreamingWriter(tmp_path / algo, lazy.model, {})
        writer.add_stored("lm_head.weight", lazy)
        assert writer.checksums["lm_head.weight"] == checkpoint.CHECKSUMS[algo](model.lm_head.weight.detach())
        assert writer._header["lm_head.weight"] == {"dtype": "F32", "shape": [128, 64], "data_offsets": [0, 32768]}
        writer.abort()
    assert lazy.live_bytes == 0 and lazy.peak_bytes == nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writer_sparse_rows_at_a_time_same_bytes(tmp_path, monkeypatch, dtype):
    """A sparse candidate written a row at a time: the bytes, header and checksums of the
    whole-matrix layout (bitmask_compress), an empty row and a dense candidate included."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 8)).to(dtype)
    with torch.no_grad():
        net[0].weight[torch.rand(16, 24) < 0.6] = 0
        net[0].weight[3] = 0  # a row with nothing kept
        net[0].weight[5, 7] = -0.0  # stored as a zero
    cand = {"0.weight": "0", "1.weight": "1"}  # the second stays dense: not smaller sparse

    def write(out):
        w = streaming.StreamingWriter(out, net, cand)
        for name, t in net.state_dict().items():
            w.add(name, t)
        return w.close()

    monkeypatch.setattr(streaming, "SPARSE_CHUNK", 1)  # one row at a time
    rows = write(tmp_path / "rows")
    monkeypatch.setattr(streaming, "_INCREMENTAL", {})  # the whole-matrix path
    whole = write(tmp_path / "whole")
    assert rows["sparse_modules"] == whole["sparse_modules"] == ["0"]
    for f in ("model.safetensors", "artemis_export.json"):
        assert (tmp_path / "rows" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
    fresh = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 8)).to(dtype)
    back = artemis.load_pruned(tmp_path / "rows", model=fresh)
    assert torch.equal(back[0].weight, net[0].weight) and torch.equal(back[1].weight, net[1].weight)


def test_on_demand_reads_the_rows_looked_up_and_the_rest_whole(tmp_path, monkeypatch):
    """LazyCheckpoint.on_demand: an embedding lookup reads the runs of rows it looks up; a
    function that takes the tensor otherwise (the head's matmul) reads it whole first; the
    results are the stored model's; afterwards everything is back on meta."""
    model = tiny_llama()
    folder = tmp_path / "in"
    model.save_pretrained(str(folder), max_shard_size="100KB")
    lazy = streaming.LazyCheckpoint(folder)
    reads = []
    original = streaming._StoredRows._read

    def spy(self, a, b):
        reads.append((self.name, a, b))
        original(self, a, b)

    monkeypatch.setattr(streaming._StoredRows, "_read", spy)
    monkeypatch.setattr(streaming, "COPY_CHUNK", 64 * 4 * 50)  # whole reads in pieces of 50 rows
    ids = torch.tensor([[9, 3, 4, 4]])
    with lazy.on_demand(["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]):
        e = lazy.model.model.embed_tokens(ids)
        assert torch.equal(e, model.model.embed_tokens(ids))
        assert reads == [("model.embed_tokens.weight", 3, 5), ("model.embed_tokens.weight", 9, 10)]
        assert torch.equal(
            lazy.model.model.embed_tokens(torch.tensor([3, 10])), model.model.embed_tokens.weight[[3, 10]]
        )
        assert reads[2:] == [("model.embed_tokens.weight", 10, 11)]  # row 3 is not read again
        assert torch.equal(lazy.model.lm_head(e), model.lm_head(e))
        assert reads[3:] == [("lm_head.weight", 0, 50), ("lm_head.weight", 50, 100), ("lm_head.weight", 100, 128)]
        assert lazy.live_bytes == 2 * 128 * 64 * 4 + 64 * 4
    assert lazy.model.lm_head.weight.is_meta and lazy.model.model.embed_tokens.weight.is_meta
    assert lazy.live_bytes == 0 and lazy.peak_bytes == 2 * 128 * 64 * 4 + 64 * 4
