"""Calibration and held-out text, as windows of token ids.

Corpora: WikiText-2 raw and C4 through the optional `datasets` library, and the Python 3.11 docs
shipped in the shared data folder (`shared_data_dir`), split as its README says: held-out = files
under ``library/`` whose name starts with s..z, calibration = every other docs file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from aaq.errors import AaqError

logger = logging.getLogger(__name__)

DATA_ENV = "AAQ_DATA_DIR"
PYTHON_DOCS_FOLDER = "python-docs-3.11"
PYTHON_DOCS_LICENSE = "LICENSE.rst.txt"
HELDOUT_INITIALS = frozenset("stuvwxyz")
DATASETS = ("auto", "python-docs", "wikitext2", "c4")
SPLITS = ("calibration", "heldout")
DOCUMENT_SEPARATOR = "\n\n"
# One C4 shard holds ~350k documents (~800 MB of text); the first few thousand give millions of
# tokens, far more than any calibration or perplexity budget, without tokenizing the whole shard.
C4_MAX_DOCUMENTS = 5000
C4_FILES = {
    "calibration": ("train", "en/c4-train.00000-of-01024.json.gz"),
    "heldout": ("validation", "en/c4-validation.00000-of-00008.json.gz"),
}
WIKITEXT_SPLITS = {"calibration": "train", "heldout": "test"}
TOKEN_CACHE_FOLDER = "tokens"


@dataclass
class TextDataConfig:
    """Which text (data set and split) and how many token windows of which length; `seed` drives calibration windows."""

    split: str
    n_samples: int
    seq_len: int
    dataset: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise AaqError(f"unknown dataset {self.dataset!r}; use one of: {', '.join(DATASETS)}")
        if self.split not in SPLITS:
            raise AaqError(f"unknown split {self.split!r}; use one of: {', '.join(SPLITS)}")
        if self.n_samples < 1 or self.seq_len < 2:
            raise AaqError(
                f"need n_samples >= 1 and seq_len >= 2 (got {self.n_samples} and {self.seq_len}); pass larger values"
            )


def _repo_root() -> Path | None:
    return next((folder for folder in Path(__file__).resolve().parents if (folder / "pyproject.toml").is_file()), None)


def shared_data_dir() -> Path:
    """Return the shared data folder: env AAQ_DATA_DIR, else ../shared/data beside the repo root or the cwd."""
    configured = os.environ.get(DATA_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise AaqError(f"{DATA_ENV}={configured} is not a folder; point it at the shared data folder")
        return path
    repo_root = _repo_root()
    candidates = ([repo_root / ".." / "shared" / "data"] if repo_root else []) + [Path.cwd() / ".." / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise AaqError(f"shared data folder not found (looked for ../shared/data); set {DATA_ENV} to its path")


def is_heldout_doc(relative: Path) -> bool:
    """Return whether a python-docs file (path relative to the docs folder) belongs to the held-out split."""
    return relative.parts[0] == "library" and relative.name[:1].lower() in HELDOUT_INITIALS


def python_docs_files(split: str) -> list[Path]:
    """Return the python-docs files of `split` ("calibration"/"heldout"), sorted; the license file is in neither."""
    root = shared_data_dir() / PYTHON_DOCS_FOLDER
    if not root.is_dir():
        raise AaqError(f"python docs corpus {root} not found; set {DATA_ENV} to the shared data folder holding it")
    relatives = sorted(
        path.relative_to(root)
        for path in root.rglob("*.rst.txt")
        if path.is_file() and path.name != PYTHON_DOCS_LICENSE
    )
    wanted_heldout = split == "heldout"
    return [root / relative for relative in relatives if is_heldout_doc(relative) == wanted_heldout]


def _python_docs_documents(split: str) -> list[str]:
    return [path.read_text(encoding="utf-8") for path in python_docs_files(split)]


def _import_datasets() -> ModuleType:
    try:
        import datasets
    except ImportError as error:
        raise AaqError(
            "this dataset needs the `datasets` library; pip install datasets, or use dataset 'python-docs'"
        ) from error
    return datasets


@contextmanager
def datasets_offline() -> Iterator[None]:
    """Within the block, the `datasets` library reads only its local cache (never the hub)."""
    # datasets has no per-call offline switch; without one an offline machine spends ~25 s in hub
    # retries before it falls back to its cache, so flip the library's own flag and restore it.
    datasets = _import_datasets()
    was_offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline


def _hf_rows(label: str, allow_network: bool, *args: str, **kwargs: object):
    """Return a `datasets` split, from the local cache first and, if allowed, from the hub."""
    datasets = _import_datasets()
    try:
        with datasets_offline():
            return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # datasets raises many unrelated types for a data set it cannot find
        if not allow_network:
            raise AaqError(f"{label} is not in the local datasets cache; use dataset 'python-docs'") from error
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # as above
        raise AaqError(f"could not load {label} ({type(error).__name__}); use dataset 'python-docs'") from error


def _wikitext2_documents(split: str, allow_network: bool = True) -> list[str]:
    rows = _hf_rows("WikiText-2", allow_network, "wikitext", "wikitext-2-raw-v1", split=WIKITEXT_SPLITS[split])
    return list(rows["text"])


def _c4_documents(split: str, allow_network: bool = True) -> list[str]:
    hf_split, data_file = C4_FILES[split]
    rows = _hf_rows("C4", allow_network, "allenai/c4", data_files={hf_split: data_file}, split=hf_split)
    return list(rows.select(range(min(C4_MAX_DOCUMENTS, len(rows))))["text"])


CORPORA: dict[str, Callable[[str], list[str]]] = {
    "python-docs": _python_docs_documents,
    "wikitext2": _wikitext2_documents,
    "c4": _c4_documents,
}


def resolve_dataset(dataset: str) -> str:
    """Return the concrete corpus name: "auto" becomes "wikitext2" when it loads without network, else "python-docs"."""
    if dataset != "auto":
        return dataset
    try:
        _wikitext2_documents("heldout", allow_network=False)
    except AaqError as error:
        logger.info("using the Python docs corpus (%s)", error)
        return "python-docs"
    return "wikitext2"


def corpus_documents(dataset: str, split: str) -> list[str]:
    """Return the documents of a corpus split ("auto" resolved); AaqError when its text is not available."""
    return CORPORA[resolve_dataset(dataset)](split)


def corpus_token_ids(tokenizer: PreTrainedTokenizerBase, dataset: str, split: str) -> torch.Tensor:
    """Return the 1-D int64 token ids of a corpus split ("auto" resolved): documents joined by blank lines.

    Tokenizing a whole corpus as one text takes seconds (minutes under load) and a few hundred MB,
    so the ids of a fast tokenizer are kept in the aaq cache per tokenizer and text
    (`token_cache_dir()`) and read back by later runs.
    """
    text = DOCUMENT_SEPARATOR.join(CORPORA[resolve_dataset(dataset)](split))
    cached = _token_cache_file(tokenizer, text)
    if cached is not None and cached.is_file():
        try:
            return torch.from_numpy(np.load(cached)).to(torch.int64)
        except (OSError, ValueError):
            logger.info("rebuilding the damaged token cache file %s", cached)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.int64)
    if cached is not None:
        from aaq.runs.records import write_atomic

        def save(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.save(handle, ids.numpy().astype(np.int32))

        write_atomic(cached, save)
    return ids


def token_cache_dir() -> Path:
    """Return the folder of cached corpus token ids under the aaq cache."""
    from aaq.models.loading import cache_root

    return cache_root() / TOKEN_CACHE_FOLDER


def _token_cache_file(tokenizer: PreTrainedTokenizerBase, text: str) -> Path | None:
    """Where the ids of `text` under `tokenizer` are cached; None for a tokenizer without a serialisable fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import tokenizers

    digest = hashlib.sha256()
    for part in (tokenizers.__version__, type(tokenizer).__name__, backend.to_str(), text):
        digest.update(part.encode())
        digest.update(b"\0")
    return token_cache_dir() / f"{digest.hexdigest()[:32]}.npy"


def token_windows(tokenizer: PreTrainedTokenizerBase, config: TextDataConfig) -> torch.Tensor:
    """Return (n_samples, seq_len) int64 token windows of the config's corpus split.

    "heldout": consecutive non-overlapping windows from the start of the held-out text (no seed);
    "calibration": windows at random offsets (seeded by `config.seed`) of the calibration text.
    """
    config = replace(config, dataset=resolve_dataset(config.dataset))
    ids = corpus_token_ids(tokenizer, config.dataset, config.split)
    if config.split == "heldout":
        return _consecutive_windows(ids, config)
    return _random_windows(ids, config)


def _consecutive_windows(ids: torch.Tensor, config: TextDataConfig) -> torch.Tensor:
    available = ids.numel() // config.seq_len
    if available < config.n_samples:
        raise AaqError(
            f"held-out text of {config.dataset} has {ids.numel()} tokens: at most {available} windows of "
            f"{config.seq_len} tokens, {config.n_samples} asked; lower n_samples or seq_len"
        )
    return ids[: config.n_samples * config.seq_len].reshape(config.n_samples, config.seq_len)


def _random_windows(ids: torch.Tensor, config: TextDataConfig) -> torch.Tensor:
    if ids.numel() < config.seq_len:
        raise AaqError(
            f"calibration text of {config.dataset} has {ids.numel()} tokens, shorter than seq_len {config.seq_len}; "
            f"use seq_len <= {ids.numel()}"
        )
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seq_len + 1, (config.n_samples,), generator=generator)
    return torch.stack([ids[start : start + config.seq_len] for start in starts.tolist()])
