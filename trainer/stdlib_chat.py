"""The chat set built from this machine's own text: the Python standard library's documented functions.

Each documented top-level function becomes a conversation of one exchange: its docstring as the user's turn, its
code (without the docstring) as the assistant's. A class's documented methods become multi-turn conversations, a
method per exchange in source order (up to 4 exchanges each), so the set holds conversations of several turns.
Modules go to the validation split by a hash of their path, as the default dataset's documents do. Nothing is
downloaded: every Python install has this text. `data.source=chat` without `data.path` trains on it (built once into
the cache, with the default dataset's tokenizer and TEMPLATE_MARKED when `data.tokenizer` is null);
`launch/make_chat_data.py` writes it where asked.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from pathlib import Path

from trainer.data import default_dataset_dir, is_validation, stdlib_documents

# Templates shardwise writes into a tokenizer directory (launch/make_chat_data.py --tokenizer-out): the same format,
# with and without generation markers. Plain text role tags, which any byte-level BPE encodes.
TEMPLATE_MARKED = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ m['content'] }}<|end|>\n{% endgeneration %}"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEMPLATE_PLAIN = TEMPLATE_MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def write_tokenizer_dir(tokenizer_json: Path, out: Path, *, marked: bool = True, eos: str = "<|endoftext|>") -> Path:
    """An HF tokenizer directory (tokenizer.json and tokenizer_config.json with a chat template) around a
    `tokenizers` file, e.g. the default dataset's: what `data.tokenizer` reads."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": eos,
        "chat_template": TEMPLATE_MARKED if marked else TEMPLATE_PLAIN,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


MAX_CODE_CHARS = 1500  # functions longer than this are left out: short examples, which packing puts together
MAX_TURNS = 4  # a class's methods in conversations of at most this many exchanges


def _without_docstring(node: ast.AST, lines: list[str]) -> str | None:
    """The source of a function without its docstring, dedented to the function's own indentation."""
    body = node.body
    doc = body[0]
    if len(body) < 2:  # (a function that is only a docstring teaches nothing)
        return None
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    kept = lines[first - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    code = textwrap.dedent("\n".join(kept)).rstrip()
    return code if 0 < len(code) <= MAX_CODE_CHARS else None


def _exchange(node: ast.AST, lines: list[str]) -> tuple[str, str] | None:
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    doc = ast.get_docstring(node)
    if not doc or len(doc) < 20:
        return None
    code = _without_docstring(node, lines)
    return (doc, code) if code else None


def conversations(module: str, text: str) -> Iterator[dict]:
    """The module's conversations: one per documented function, one per class with documented methods."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            turns = [t for child in node.body if (t := _exchange(child, lines))]
            for i in range(0, len(turns), MAX_TURNS):
                messages = []
                for doc, code in turns[i : i + MAX_TURNS]:
                    messages += [{"role": "user", "content": doc}, {"role": "assistant", "content": code}]
                yield {"messages": messages, "source": f"{module}:{node.name}"}
        elif turn := _exchange(node, lines):
            yield {
                "messages": [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}],
                "source": f"{module}:{node.name}",
            }


def build(out: Path, max_mb: float, val_fraction: float) -> dict[str, int]:
    """Write OUT/train.jsonl and OUT/val.jsonl (each complete or absent); returns the conversations in each."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    files = {split: (out / f"{split}.jsonl.tmp").open("w") for split in counts}
    try:
        for path, text in stdlib_documents(int(max_mb * 2**20)):
            split = "val" if is_validation(path, val_fraction) else "train"
            module = path.removesuffix(".py").replace("/", ".")
            for conv in conversations(module, text):
                files[split].write(json.dumps(conv) + "\n")
                counts[split] += 1
    finally:
        for f in files.values():
            f.close()
    for split in counts:  # (renamed once complete: an interrupted build leaves no half file under the final name)
        (out / f"{split}.jsonl.tmp").replace(out / f"{split}.jsonl")
    return counts


def _cache(cfg) -> Path:
    return Path(cfg.data.cache_dir or os.environ.get("SHARDWISE_CACHE") or "~/.cache/shardwise").expanduser()


def default_chat_dir(cfg) -> Path:
    """The standard library's chat set for `data.source=chat` without `data.path`: built once (a file lock),
    from as much source as the default dataset reads (`data.default_corpus_mb`), split by `data.val_fraction`."""
    d = cfg.data
    key = [1, sys.version, sysconfig.get_paths()["stdlib"], d.default_corpus_mb, d.val_fraction, MAX_CODE_CHARS]
    out = _cache(cfg) / f"chat-stdlib-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "val.jsonl").is_file():
            build(out, d.default_corpus_mb, d.val_fraction)
    return out


def default_chat_tokenizer(cfg) -> Path:
    """The tokenizer directory for `data.source=chat` without `data.tokenizer`: the default dataset's tokenizer (a
    model pretrained on `data.source=default` reads it) with TEMPLATE_MARKED (generation markers)."""
    d = cfg.data
    source = default_dataset_dir(d.cache_dir, d.default_corpus_mb, d.val_fraction) / "tokenizer.json"
    out = _cache(cfg) / f"chat-tokenizer-{source.parent.name}"
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "tokenizer_config.json").is_file():
            write_tokenizer_dir(source, out)
    return out
