"""Modules that moved into the concept folders keep answering at their old paths."""

import importlib
import subprocess
import sys

import pytest

import artemis
from artemis._moved import MOVED_MODULES


@pytest.mark.parametrize("old,new", sorted(MOVED_MODULES.items()))
def test_old_path_is_the_new_module(old, new):
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}"):
        sys.modules.pop(old, None)
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)


def test_old_from_imports_keep_working():
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n"
        "    from artemis.export import save_pruned, bitmask_compress\n"
        "except DeprecationWarning as w:\n"
        "    print('warned:', w)\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "from artemis.export import save_pruned, bitmask_compress\n"
        "from artemis.config import PruningConfig, LayerDropoutOptions, parse_nm_pattern\n"
        "from artemis.evaluate import sentence_embeddings, embedding_cosine\n"
        "from artemis.eval_suite import embedding_fidelity, perplexity\n"
        "from artemis.data import load_texts, token_blocks\n"
        "from artemis.cli import main, build_parser, run_prune\n"
        "from artemis.methods.layer_dropout import BlockGate, LayerImportance\n"
        "import artemis.sparse.checkpoint as c\n"
        "assert save_pruned is c.save_pruned\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "warned: artemis.export moved to artemis.sparse.checkpoint; import it from there (the old path will be removed)",
        "ok",
    ]


def test_new_folders_hold_no_old_names():
    # every old module name is gone from the top of the package: the finder answers them
    import pathlib

    top = pathlib.Path(artemis.__file__).parent
    for old in MOVED_MODULES:
        assert not (top / (old.split(".")[1] + ".py")).exists(), old


def test_old_paths_as_attributes_and_the_real_spec_kept():
    import importlib.util
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert artemis.export.save_pruned is importlib.import_module("artemis.sparse.checkpoint").save_pruned
        importlib.import_module("artemis.export")
    assert importlib.util.find_spec("artemis.sparse.checkpoint").name == "artemis.sparse.checkpoint"
    assert artemis.core.__name__ == "artemis.core"
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        artemis.nope  # noqa: B018
