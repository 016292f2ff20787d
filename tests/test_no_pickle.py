"""No code runs from a file Artemis is pointed at.

Each loader of saved state gets a crafted pickle (its ``__reduce__`` calls ``exec``,
which creates a marker file) where that loader reads. The marker must not appear, and
the loader must fail with a clear :class:`CheckpointError` naming the file. The loaders:

* the training loop's ``resume`` (``--resume``): ``checkpoint/training_state.safetensors``
  and the ``checkpoint/training_state.pt`` of earlier versions, through the Python API
  and the CLI;
* ``PruningCallback`` when a ``Trainer`` resumes: ``checkpoint-N/artemis_pruning_state.safetensors``
  and the ``.pt`` of earlier versions;
* ``load_model_and_tokenizer`` (``model.base_model`` with a ``pytorch_model.bin``), the
  compressed-checkpoint loader and the structured-model loader.

``PruningManager.load_state_dict`` takes a mapping and reads no file; a static check
over ``src/`` keeps every ``torch.load`` at ``weights_only=True`` and forbids
``pickle``/``marshal``/``np.load(allow_pickle=True)``/``yaml.load`` reads, so that
stays true.
"""

from __future__ import annotations

import ast
import json
import math
import pickle
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from artemis.core.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SRC = Path(__file__).resolve().parent.parent / "src" / "artemis"
HOW = ["torch.save", "pickle.dump"]


class _Payload:
    """Unpickling this runs ``exec``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _craft(path: Path, marker: Path, how: str) -> Path:
    """Write a malicious pickle at ``path`` that looks like an Artemis state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": 1, "step": 3, "masks": {}, "payload": _Payload(marker)}
    if how == "torch.save":
        torch.save(state, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(state, fh, protocol=2)
    return path


@pytest.mark.parametrize("how", HOW)
def test_the_payload_runs_code_when_unpickled(tmp_path, how):
    """Control: the crafted file really runs code under an unrestricted unpickler."""
    marker = tmp_path / "pwned"
    path = _craft(tmp_path / "evil.pt", marker, how)
    if how == "torch.save":
        torch.load(path, weights_only=False)  # exactly what Artemis must never do
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)
    assert marker.exists()


# ----------------------------------------------------------------- the training loop
@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from artemis.data.corpus import builtin_corpus

    tk = Tokenizer(models.BPE(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["[PAD]", "[UNK]", "</s>"], show_progress=False)
    tk.train_from_iterator(builtin_corpus("train", limit=200), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")


def _run_config(steps: int = 4):
    from artemis.train.run_config import load_run_config

    return load_run_config(
        {
            "pruning": {"final_sparsity": 0.5, "pruning_start": 0.0, "pruning_end": 0.5, "pruning_interval": 1},
            "training": {
                "steps": steps,
                "batch_size": 2,
                "max_length": 32,
                "device": "cpu",
                "precision": "fp32",
                "warmup_steps": 1,
            },
            "distillation": {"enabled": False},
        }
    )


def _train(tokenizer, out: Path, **kw):
    from artemis.data.corpus import builtin_corpus
    from artemis.train.loop import train_with_pruning
    from tests.fixtures import tiny_llama

    model = tiny_llama(vocab_size=len(tokenizer))
    texts = builtin_corpus("train", limit=60)
    res = train_with_pruning(
        model, tokenizer, _run_config(), "causal_lm", train_texts=texts, output_dir=out, progress=False, **kw
    )
    return model, res


TRAINING_CASES = [
    ("checkpoint/training_state.safetensors", r"cannot read '.*training_state\.safetensors' as an Artemis"),
    ("checkpoint/training_state.pt", r"cannot read '.*training_state\.pt' safely: .*nothing in it ran"),
]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name,message", TRAINING_CASES)
def test_training_resume_refuses_a_crafted_checkpoint(tokenizer, tmp_path, name, message, how):
    from artemis.train.loop import CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE

    assert {CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE} == {c[0] for c in TRAINING_CASES}
    marker = tmp_path / "pwned"
    _craft(tmp_path / "out" / name, marker, how)
    with pytest.raises(CheckpointError, match=message + r".*restart without --resume"):
        _train(tokenizer, tmp_path / "out", resume=True)
    assert not marker.exists()


def test_read_checkpoint_refuses_crafted_json_and_foreign_files(tmp_path):
    """A well-formed safetensors file cannot smuggle objects in through its JSON either."""
    from safetensors.torch import save_file

    from artemis.train.loading import STATE_FORMAT, save_state_file
    from artemis.train.loop import read_checkpoint

    bad = tmp_path / "bad.safetensors"
    meta = {
        "format": "pt",
        "artemis_format": STATE_FORMAT,
        "artemis_kind": "training_state",
        "artemis_state": json.dumps({"step": {"$reduce": ["builtins.exec", ["open('x', 'w')"]]}}),
    }
    save_file({"0": torch.zeros(1)}, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*unknown tag '\$reduce'.*restart without --resume"):
        read_checkpoint(bad)
    save_state_file(tmp_path / "other.safetensors", {"step": 1}, "pruning_state")
    with pytest.raises(CheckpointError, match=r"other\.safetensors' is not an Artemis training_state file"):
        read_checkpoint(tmp_path / "other.safetensors")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match=r"cannot read '.*trunc\.safetensors' as an Artemis training_state"):
        read_checkpoint(tmp_path / "trunc.safetensors")


def test_cli_resume_refuses_a_crafted_checkpoint(tokenizer, tmp_path, capsys):
    from artemis.cli import main
    from tests.fixtures import tiny_llama

    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    marker = tmp_path / "pwned"
    _craft(tmp_path / "out" / "checkpoint" / "training_state.safetensors", marker, "torch.save")
    args = ["prune", "--model", str(tmp_path / "llama"), "--steps", "2", "--batch-size", "2", "--max-length", "32"]
    fast = ["--eval-texts", "8", "--set", "evaluation.latency_repeats=1", "--set", "evaluation.latency_warmup=0"]
    code = main(args + fast + ["--resume", "-o", str(tmp_path / "out"), "-q", "--no-plots"])
    assert code == 2
    err = capsys.readouterr().err
    assert "training_state.safetensors" in err and "restart without --resume" in err and "Traceback" not in err
    assert not marker.exists()


def test_legacy_pt_checkpoint_still_resumes_bit_identically(tokenizer, tmp_path):
    """A plain-data ``training_state.pt`` of an earlier version loads with weights_only=True."""
    from artemis.train.loop import CHECKPOINT_FILE, LEGACY_CHECKPOINT_FILE, read_checkpoint

    full, _ = _train(tokenizer, tmp_path / "full")
    _, cut = _train(tokenizer, tmp_path / "cut", stop_after=2)
    assert cut.stopped_early
    state = read_checkpoint(tmp_path / "cut" / CHECKPOINT_FILE)
    torch.save(state, tmp_path / "cut" / LEGACY_CHECKPOINT_FILE)  # what earlier versions wrote
    (tmp_path / "cut" / CHECKPOINT_FILE).unlink()
    resumed, res = _train(tokenizer, tmp_path / "cut", resume=True)
    assert res.resumed_from == 2 and len(res.history) == 4
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_state_file_round_trip_keeps_types_exactly(tmp_path):
    from artemis.train.loading import load_state_file, save_state_file

    od: OrderedDict = OrderedDict(w=torch.arange(6.0).view(2, 3))
    od._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    base = torch.arange(12, dtype=torch.int32).view(3, 4)
    state = {
        "sd": od,
        "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]},
        "tied": [base, base],
        "views": (base[1], base.t()),
        "plain": [None, True, 3, -0.0, 1e-300, "s", float("inf")],
        "$odd": {1.5: torch.bfloat16, (1, 2): "t", "$k": [torch.zeros(0, dtype=torch.bool)]},
    }
    save_state_file(tmp_path / "s.safetensors", state, "kind")
    back = load_state_file(tmp_path / "s.safetensors", "kind")
    assert type(back["sd"]) is OrderedDict and back["sd"]._metadata == {"": {"version": 1}}
    assert torch.equal(back["sd"]["w"], od["w"])
    assert list(back["opt"]["state"]) == [0] and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["tied"][0] is back["tied"][1] and torch.equal(back["tied"][0], base)
    assert isinstance(back["views"], tuple) and torch.equal(back["views"][1], base.t())
    assert back["plain"][:6] == [None, True, 3, -0.0, 1e-300, "s"] and math.isinf(back["plain"][6])
    assert math.copysign(1.0, back["plain"][3]) == -1.0 and type(back["plain"][2]) is int
    odd = back["$odd"]
    assert odd[1.5] is torch.bfloat16 and odd[(1, 2)] == "t" and odd["$k"][0].dtype == torch.bool


# ----------------------------------------------------------------- PruningCallback
CALLBACK_CASES = [
    ("artemis_pruning_state.safetensors", r"cannot read '.*artemis_pruning_state\.safetensors' as an Artemis"),
    ("artemis_pruning_state.pt", r"cannot read '.*artemis_pruning_state\.pt' safely: .*nothing in it ran"),
]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name,message", CALLBACK_CASES)
def test_pruning_callback_resume_refuses_a_crafted_state(tmp_path, name, message, how):
    from artemis.train.integrations import LEGACY_STATE_FILE, STATE_FILE, PruningCallback
    from tests.fixtures import tiny_llama

    assert {STATE_FILE, LEGACY_STATE_FILE} == {c[0] for c in CALLBACK_CASES}
    marker = tmp_path / "pwned"
    _craft(tmp_path / "checkpoint-3" / name, marker, how)
    cb = PruningCallback({"pruning": {"final_sparsity": 0.5, "pruning_start": 0.0, "pruning_end": 0.5}})
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3, max_steps=6)
    with pytest.raises(CheckpointError, match=message + r".*resume from another checkpoint-N"):
        cb.on_train_begin(args, state, None, model=tiny_llama())
    assert not marker.exists()


def test_pruning_callback_reads_a_plain_legacy_state(tmp_path):
    from artemis.core.config import load_pruning_config
    from artemis.core.manager import PruningManager
    from artemis.train.integrations import LEGACY_STATE_FILE, PruningCallback
    from tests.fixtures import tiny_llama

    cfg = load_pruning_config({"pruning": {"final_sparsity": 0.5, "pruning_start": 0.0, "pruning_end": 0.5}})
    mgr = PruningManager(tiny_llama(), cfg, total_steps=6)
    mgr.apply_magnitude_pruning(0.5)
    (tmp_path / "checkpoint-3").mkdir()
    torch.save(mgr.state_dict(), tmp_path / "checkpoint-3" / LEGACY_STATE_FILE)  # an earlier version's file
    cb = PruningCallback(cfg)
    cb.on_train_begin(
        SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=3, max_steps=6), None, model=tiny_llama()
    )
    for key, mask in mgr.masks.items():
        assert torch.equal(cb.manager.masks[key], mask), key


# ----------------------------------------------------------------- model folders
def _model_folder(tmp_path: Path, marker: Path) -> Path:
    from tests.fixtures import tiny_llama

    folder = tmp_path / "model"
    tiny_llama().config.save_pretrained(folder)
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    return folder


def test_load_model_refuses_a_crafted_pytorch_model_bin(tmp_path):
    from artemis.train.loading import load_model_and_tokenizer
    from artemis.train.run_config import ModelSection

    marker = tmp_path / "pwned"
    folder = _model_folder(tmp_path, marker)
    with pytest.raises(CheckpointError, match=r"its weights file is a pickle that torch\.load\(weights_only=True\)"):
        load_model_and_tokenizer(ModelSection(base_model=str(folder)))
    assert not marker.exists()


def test_structured_loader_runs_no_code_from_a_crafted_pytorch_model_bin(tmp_path):
    # a plain folder goes to from_pretrained, which reads the .bin with weights_only=True
    # (the error is still transformers' own UnpicklingError)
    from artemis.methods.structured import load_pruned_model

    marker = tmp_path / "pwned"
    folder = _model_folder(tmp_path, marker)
    with pytest.raises((pickle.UnpicklingError, CheckpointError)):
        load_pruned_model(folder)
    assert not marker.exists()


def test_compressed_checkpoint_loader_refuses_a_crafted_weights_file(tmp_path):
    from artemis.sparse.checkpoint import load_pruned, save_pruned
    from tests.fixtures import tiny_llama

    save_pruned(tiny_llama(), tmp_path / "exp")
    marker = tmp_path / "pwned"
    torch.save({"w": _Payload(marker)}, tmp_path / "exp" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupted"):
        load_pruned(tmp_path / "exp")
    assert not marker.exists()


# ----------------------------------------------------------------- no unsafe reader in src/
def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


FORBIDDEN_CALLS = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "cloudpickle.load",
    "cloudpickle.loads",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "yaml.load",
    "yaml.unsafe_load",
    "yaml.full_load",
    "torch.serialization.add_safe_globals",
    "torch.serialization.safe_globals",
}


def test_src_has_no_unsafe_deserialisation():
    problems = []
    for file in sorted(SRC.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{file.relative_to(SRC)}:{node.lineno} {name}"
            kwargs = {k.arg: k.value for k in node.keywords}
            if name in FORBIDDEN_CALLS:
                problems.append(where)
            elif name in ("torch.load", "torch.serialization.load"):
                wo = kwargs.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(where + " without weights_only=True")
            elif name in ("np.load", "numpy.load"):
                ap = kwargs.get("allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    problems.append(where + " with allow_pickle")
    assert not problems, problems
