"""Calibration text in chat form: ordinary instruction-style conversations rendered with the model's chat template.

Where the conversations come from (no safety data, nothing held out):

- The Python docs of the calibration split (``data.python_docs_files("calibration")``; the held-out
  ``library/[s-z]*`` files are never read), folders ``faq/``, ``howto/`` and ``tutorial/``: every section
  becomes one user/assistant exchange. A section whose title is a question (the FAQ's) is asked verbatim;
  any other title is turned into a question by one of :data:`QUESTION_TEMPLATES` (picked by a checksum of
  the title, so the wording is fixed). The answer is the section's text with the reStructuredText markup
  reduced to plain text (roles, links, directives), cut at a paragraph end before :data:`MAX_ANSWER_CHARS`.
- Only with ``benign_train=True``: the shipped benign *training* prompts with the answers
  ``smollm2-135m-instruct`` gave them (the self-distilled answers the demo's safety adapter was trained on).
  Off by default, because the aligned model of the demo pair was trained on exactly these exchanges.

Windows start at a seeded random conversation and continue with the following ones until ``seq_len``
tokens, so every window opens with the template's markers, as a chat does.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from importlib import resources

import torch
from transformers import PreTrainedTokenizerBase

from aaq.data.corpus import PYTHON_DOCS_FOLDER, python_docs_files, shared_data_dir
from aaq.errors import AaqError

__all__ = ["CHAT_FOLDERS", "ChatDataConfig", "Exchange", "benign_train_exchanges", "chat_token_windows", "docs_exchanges"]

CHAT_FOLDERS = ("faq", "howto", "tutorial")
QUESTION_TEMPLATES = (
    "Can you explain {topic}?",
    "What should I know about {topic} in Python?",
    "Tell me about {topic}.",
    "Could you give me an overview of {topic}?",
    "I'm learning Python. Can you walk me through {topic}?",
)
# A chat answer is a few paragraphs; whole howto sections run to pages.
MAX_ANSWER_CHARS = 1500
# Sections with less text are headings over sub-sections or index pages, not answers.
MIN_ANSWER_CHARS = 80
# The self-distilled answers of the shipped adapter (benign training prompts, answered by the instruct model).
BENIGN_ANSWERS = ("resources", "adapters", "smollm2-135m-safe", "benign_answers.jsonl")

_UNDERLINE = re.compile(r"^([=\-~*^\"'#+:.`_])\1{2,}\s*$")
_DIRECTIVE = re.compile(r"^(\s*)\.\.(?:\s+([\w:-]+)::|\s|$)")
# Directives whose indented content is text worth keeping; the content of any other directive (index
# entries, targets, toctrees, comments) is dropped with it.
_KEEP_CONTENT = frozenset(
    ["note", "warning", "tip", "hint", "important", "caution", "attention", "seealso", "admonition", "topic", "sidebar", "code-block", "sourcecode", "code", "doctest", "deprecated", "versionadded", "versionchanged"]
)
_ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`([^`]+)`")
_PLAIN_ROLES = frozenset(["ref", "doc", "term", "pep", "rfc", "dfn", "abbr", "emphasis", "strong", "menuselection", "guilabel", "title-reference"])
_QUESTION_WORDS = frozenset(["How", "What", "Why", "When", "Where", "Which", "Who", "Is", "Are", "Can", "Do", "Does", "Should", "Will"])
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}|`([^`]+)`_{1,2}")


@dataclass(frozen=True)
class Exchange:
    """One user question and the assistant's answer."""

    user: str
    assistant: str


@dataclass(frozen=True)
class ChatDataConfig:
    """Chat-form calibration windows: how many of how many tokens, the seed of their starts, and the sources."""

    n_samples: int
    seq_len: int
    seed: int = 0
    benign_train: bool = False

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.seq_len < 2:
            raise AaqError(f"need n_samples >= 1 and seq_len >= 2 (got {self.n_samples} and {self.seq_len}); pass larger values")


def _role_text(match: re.Match) -> str:
    """The visible text of an RST role: its title, or its target without the ``!``/``~`` markers."""
    role, content = match.group(1), match.group(2)
    titled = re.match(r"^(.*?)\s*<[^>]*>$", content, flags=re.DOTALL)
    text = (titled.group(1) if titled and titled.group(1) else content).lstrip("!~")
    if role in ("pep", "rfc"):
        return f"{role.upper()} {text}"
    return text if role in _PLAIN_ROLES else f"`{text}`"


def plain_text(rst: str) -> str:
    """RST text with roles, links, literal markers and directives reduced to what a reader sees."""
    text = _ROLE.sub(_role_text, _without_directives(rst))
    text = _LINK.sub(lambda m: m.group(1) or m.group(2), text)
    text = text.replace("``", "`").replace("\\ ", "").replace("\\*", "*")
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.MULTILINE)
    text = re.sub(r"^\s*::\s*$", "", text, flags=re.MULTILINE)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _without_directives(rst: str) -> str:
    """RST text without directive lines, and without the content of directives that hold no prose."""
    kept: list[str] = []
    skipping_deeper_than: int | None = None
    for line in rst.splitlines():
        indent = len(line) - len(line.lstrip())
        if skipping_deeper_than is not None:
            if not line.strip() or indent > skipping_deeper_than:
                continue
            skipping_deeper_than = None
        match = _DIRECTIVE.match(line)
        if match is None:
            kept.append(line)
        elif match.group(2) not in _KEEP_CONTENT:
            skipping_deeper_than = indent
    return "\n".join(kept)


def rst_sections(rst: str) -> list[tuple[str, str]]:
    """The (title, body) of every section of an RST document, body up to the next title of any level."""
    lines = rst.splitlines()
    titles = [
        i
        for i in range(len(lines) - 1)
        if lines[i].strip() and not lines[i][0].isspace() and _UNDERLINE.match(lines[i + 1])
        and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip())
    ]  # fmt: skip
    sections = []
    for n, i in enumerate(titles):
        end = titles[n + 1] if n + 1 < len(titles) else len(lines)
        body = lines[i + 2 : end]
        if body and n + 1 < len(titles) and _UNDERLINE.match(body[-1]):
            body = body[:-1]  # the overline of the next title
        sections.append((lines[i].strip(), "\n".join(body)))
    return sections


def _answer(body: str) -> str:
    """A section's plain text cut at the last paragraph end before MAX_ANSWER_CHARS (mid-paragraph if none)."""
    text = plain_text(body)
    if len(text) <= MAX_ANSWER_CHARS:
        return text
    cut = text.rfind("\n\n", 0, MAX_ANSWER_CHARS)
    return text[: cut if cut > 0 else MAX_ANSWER_CHARS].rstrip()


def _question(title: str) -> str:
    """The user's question for a section title: the title itself if it asks one, else a fixed template."""
    topic = plain_text(title).strip().rstrip(":.")
    if topic.endswith("?"):
        return topic
    if topic.split(" ", 1)[0] in _QUESTION_WORDS:  # a FAQ title without its question mark
        return topic + "?"
    return QUESTION_TEMPLATES[zlib.crc32(topic.encode()) % len(QUESTION_TEMPLATES)].format(topic=topic)


def docs_exchanges() -> list[Exchange]:
    """The exchanges built from the calibration-split Python docs in :data:`CHAT_FOLDERS`, in file order."""
    root = shared_data_dir() / PYTHON_DOCS_FOLDER
    exchanges = []
    for path in python_docs_files("calibration"):
        if path.relative_to(root).parts[0] not in CHAT_FOLDERS:
            continue
        for title, body in rst_sections(path.read_text(encoding="utf-8")):
            answer = _answer(body)
            if len(answer) >= MIN_ANSWER_CHARS:
                exchanges.append(Exchange(_question(title), answer))
    if not exchanges:
        raise AaqError(f"no conversations found in {', '.join(CHAT_FOLDERS)} of the Python docs in {root}; point AAQ_DATA_DIR at the shared data")
    return exchanges


def benign_train_exchanges() -> list[Exchange]:
    """The shipped benign training prompts with the instruct model's own answers (those not flagged as refusals)."""
    text = resources.files("aaq").joinpath(*BENIGN_ANSWERS).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Exchange(row["prompt"], row["answer"]) for row in rows if not row["refusal"]]


def render_exchanges(tokenizer: PreTrainedTokenizerBase, exchanges: list[Exchange]) -> list[list[int]]:
    """The token ids of each exchange rendered as a two-turn chat by the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise AaqError("chat-form calibration needs a tokenizer with a chat template; use raw calibration text (form 'raw')")
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": e.user}, {"role": "assistant", "content": e.assistant}], tokenize=False
        )
        for e in exchanges
    ]
    # The rendered template carries its own BOS (if any); adding special tokens again would double it.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def chat_token_windows(tokenizer: PreTrainedTokenizerBase, config: ChatDataConfig) -> torch.Tensor:
    """(n_samples, seq_len) int64 windows of rendered conversations, each from a seeded random conversation start."""
    exchanges = docs_exchanges() + (benign_train_exchanges() if config.benign_train else [])
    conversations = render_exchanges(tokenizer, exchanges)
    total = sum(len(ids) for ids in conversations)
    if total < config.seq_len:
        raise AaqError(f"the chat calibration text has {total} tokens, shorter than seq_len {config.seq_len}; use seq_len <= {total}")
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, len(conversations), (config.n_samples,), generator=generator).tolist()
    return torch.stack([_window_from(conversations, start, config.seq_len) for start in starts])


def _window_from(conversations: list[list[int]], start: int, seq_len: int) -> torch.Tensor:
    """``seq_len`` tokens of the conversations from ``start`` on (wrapping around to the first)."""
    ids: list[int] = []
    index = start
    while len(ids) < seq_len:
        ids.extend(conversations[index % len(conversations)])
        index += 1
    return torch.tensor(ids[:seq_len], dtype=torch.int64)
