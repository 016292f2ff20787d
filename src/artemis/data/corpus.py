"""Text for calibration, training and evaluation, with no download.

The built-in corpus is real English prose that every Python installation already
has: the docstrings of the standard library. It is split into sentences,
de-duplicated, filtered to prose-like sentences, and assigned to ``train``,
``validation`` and ``test`` by a hash of each sentence, so the splits are disjoint and
deterministic for a given Python version.

Other sources: a local ``.txt`` file (one passage per non-empty line, or per blank-line
separated paragraph), a ``.jsonl`` file (one JSON object per line with a ``text``
field), or a Hugging Face dataset (``hf:NAME[:CONFIG]``, needs ``datasets``).

Example:
    >>> from artemis.data.corpus import builtin_corpus
    >>> train = builtin_corpus("train", limit=3)
    >>> len(train), all(isinstance(s, str) and len(s) > 30 for s in train)
    (3, True)
    >>> set(builtin_corpus("train", limit=500)).isdisjoint(builtin_corpus("test", limit=500))
    True
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from artemis.core.errors import CalibrationError, ConfigError

__all__ = [
    "STDLIB_MODULES",
    "stdlib_sentences",
    "builtin_corpus",
    "load_texts",
    "tokenize_batches",
    "token_blocks",
    "concatenated_token_ids",
    "calibration_batches",
]

# A fixed list (not sys.stdlib_module_names) so the corpus does not depend on which
# optional modules happen to import on a machine; all are pure-Python and import quietly.
STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar cmd codecs collections concurrent.futures "
    "configparser contextlib copy csv dataclasses datetime decimal difflib doctest email enum "
    "multiprocessing xmlrpc.client xmlrpc.server pydoc zoneinfo tomllib sqlite3 "
    "filecmp fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac html "
    "http.client http.server imaplib importlib inspect io ipaddress itertools json logging "
    "mailbox mimetypes numbers operator optparse os pathlib pdb pickle pkgutil platform plistlib "
    "poplib pprint profile pstats queue quopri random re reprlib sched secrets selectors shelve "
    "shlex shutil smtplib socket socketserver statistics string struct subprocess tarfile "
    "tempfile textwrap threading timeit tokenize trace traceback typing unittest "
    "urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree "
    "zipfile zipimport"
).split()

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SPLITS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}


def _docstrings(module: Any) -> Iterator[str]:
    seen: set[int] = set()
    stack = [module]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        doc = inspect.getdoc(obj) if obj is not module else module.__doc__
        if doc:
            yield doc
        if inspect.ismodule(obj) or inspect.isclass(obj):
            for name, member in sorted(vars(obj).items()):
                if name.startswith("_"):
                    continue
                if inspect.isclass(member) or inspect.isfunction(member):
                    if getattr(member, "__module__", None) == module.__name__:
                        stack.append(member)


def _module_docs(module: Any) -> Iterator[str]:
    """Docstrings of ``module`` and, for a package, of its public submodules."""
    yield from _docstrings(module)
    for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", []) or []), key=lambda i: i.name):
        if info.name.startswith("_") or info.name in ("tests", "test", "__main__"):
            continue
        try:
            sub = importlib.import_module(f"{module.__name__}.{info.name}")
        except Exception:  # pragma: no cover - platform-specific submodules
            continue
        yield from _docstrings(sub)


def _is_prose(s: str) -> bool:
    if not (30 <= len(s) <= 400) or not s[0].isupper() or s[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    if letters / len(s) < 0.8 or any(tok in s for tok in (">>>", "::", "==", "__", "\t")):
        return False
    return len(s.split()) >= 6


@functools.lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """All prose sentences of the standard library's docstrings, in a fixed order."""
    out: list[str] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in STDLIB_MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # pragma: no cover - a stripped Python may lack one
                continue
            for doc in _module_docs(module):
                for para in re.split(r"\n\s*\n", doc):
                    text = " ".join(para.split())
                    for sentence in _SENTENCE_END.split(text):
                        if _is_prose(sentence) and sentence not in seen:
                            seen.add(sentence)
                            out.append(sentence)
    return tuple(out)


def _split_of(sentence: str) -> int:
    return hashlib.md5(sentence.encode("utf-8")).digest()[0] % 10


def builtin_corpus(split: str = "train", limit: Optional[int] = None) -> list[str]:
    """Sentences of the built-in corpus in ``split`` (``train``/``validation``/``test``,
    about 80/10/10 %), at most ``limit`` of them."""
    if split not in _SPLITS:
        raise ConfigError(f"data split {split!r} is unknown; valid: 'train', 'validation', 'test'")
    buckets = _SPLITS[split]
    out = [s for s in stdlib_sentences() if _split_of(s) in buckets]
    return out[:limit] if limit is not None else out


def _read_txt(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if "\n\n" in text:
        parts = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    else:
        parts = [line.strip() for line in text.splitlines()]
    return [p for p in parts if p]


def _read_jsonl(path: Path, field: str) -> list[str]:
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ConfigError(f"{path}:{lineno}: expected an object with a string field {field!r}")
        out.append(obj[field])
    return out


def load_texts(
    source: Union[str, os.PathLike, Sequence[str]] = "builtin",
    *,
    split: str = "train",
    limit: Optional[int] = None,
    text_field: str = "text",
) -> list[str]:
    """Load texts from ``source``.

    Args:
        source: ``"builtin"`` (the standard-library corpus), a path to ``.txt``/``.jsonl``,
            ``"hf:NAME"`` or ``"hf:NAME:CONFIG"`` (a Hugging Face dataset; needs the
            ``datasets`` package), or a list of strings (returned as is).
        split: the split to read (for ``builtin`` and ``hf:`` sources).
        limit: keep at most this many texts.
        text_field: the field holding the text in ``.jsonl`` and HF datasets.

    Raises:
        ConfigError: the file is missing or malformed, the package is missing, or no text.
    """
    if not isinstance(source, (str, os.PathLike)):
        texts = list(source)
        if not all(isinstance(t, str) for t in texts):
            raise ConfigError("a list of texts must hold only strings")
    elif str(source) == "builtin":
        texts = builtin_corpus(split, limit)
    elif str(source).startswith("hf:"):
        parts = str(source)[3:].split(":")
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"data source {str(source)!r} needs the 'datasets' package: pip install datasets"
            ) from None
        ds = datasets.load_dataset(parts[0], parts[1] if len(parts) > 1 else None, split=split)
        if text_field not in ds.column_names:
            raise ConfigError(f"dataset {parts[0]!r} has no column {text_field!r}; columns: {ds.column_names}")
        texts = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"data file {str(path)!r} does not exist")
        if path.suffix == ".jsonl":
            texts = _read_jsonl(path, text_field)
        elif path.suffix in (".txt", ".md", ""):
            texts = _read_txt(path)
        else:
            raise ConfigError(f"data file {str(path)!r}: unsupported extension {path.suffix!r}; use .txt or .jsonl")
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise ConfigError(f"data source {str(source)!r} holds no text")
    return texts


def tokenize_batches(
    texts: Sequence[str], tokenizer: Any, *, batch_size: int = 16, max_length: int = 128
) -> list[dict]:
    """Tokenize ``texts`` into padded batches of dicts (``input_ids``, ``attention_mask``, ...)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batches.append(dict(enc))
    if not batches:
        raise CalibrationError("no texts to tokenize")
    return batches


def concatenated_token_ids(texts: Sequence[str], tokenizer: Any) -> list[int]:
    """The token ids of ``texts`` one after the other (no special tokens), each text
    followed by the tokenizer's end-of-sequence id when it has one."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return ids


def token_blocks(texts: Sequence[str], tokenizer: Any, *, block_size: int = 128, batch_size: int = 8) -> list[dict]:
    """Concatenate tokenized ``texts`` and cut them into causal-LM blocks of ``block_size``
    tokens, batched as dicts with ``input_ids`` and ``labels``."""
    ids = concatenated_token_ids(texts, tokenizer)
    n = len(ids) // block_size
    if n == 0:
        raise CalibrationError(f"the texts hold {len(ids)} tokens, fewer than one block of {block_size}")
    blocks = torch.tensor(ids[: n * block_size]).view(n, block_size)
    return [
        {"input_ids": blocks[i : i + batch_size], "labels": blocks[i : i + batch_size].clone()}
        for i in range(0, n, batch_size)
    ]


def calibration_batches(
    task: str, tokenizer: Any, texts: Sequence[str], *, max_length: int = 128, n: int = 128
) -> list[dict]:
    """``n`` calibration sequences from ``texts`` (metric statistics, SparseGPT, OWL).

    ``task="encoder"``: the first ``n`` texts, one sequence each (batches of 16, padded, with
    an attention mask). Otherwise (causal LM): ``n`` blocks of ``max_length`` tokens of the
    concatenated texts (batches of 8), as SparseGPT calibrates; fewer when the first
    ``4·n`` texts hold fewer tokens.

    Example:
        >>> class Tok:  # a stand-in tokenizer: one id per word
        ...     def __call__(self, texts, **kw):
        ...         import torch
        ...         ids = [[len(w) for w in t.split()] for t in texts]
        ...         if kw.get("padding"):
        ...             width = max(map(len, ids))
        ...             mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
        ...             ids = [i + [0] * (width - len(i)) for i in ids]
        ...             return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
        ...         return {"input_ids": ids}
        >>> [b["input_ids"].shape[0] for b in calibration_batches("encoder", Tok(), ["a b", "c"] * 20, n=20)]
        [16, 4]
    """
    if n < 1:
        raise ValueError(f"calibration needs at least 1 sequence, got n={n}")
    if task == "encoder":
        return tokenize_batches(list(texts[:n]), tokenizer, batch_size=16, max_length=max_length)
    blocks = token_blocks(list(texts[: n * 4]), tokenizer, block_size=max_length, batch_size=8)
    out, left = [], n
    for b in blocks:
        if left <= 0:
            break
        ids = b["input_ids"][:left]
        out.append({"input_ids": ids})
        left -= ids.shape[0]
    return out
