"""Instruction and chat data (`data.source=chat`): conversations from local files, a chat template, the loss on the
assistant's tokens only.

Reading: JSONL, Parquet or Arrow files (one file, a glob or a folder: `data.path`, and `data.val_path` or a held-out
share of the conversations) through Hugging Face `datasets`' local loaders; each record holds a list of
{role, content} messages (`data.messages_field`) or a prompt and a response (`data.prompt_field`,
`data.response_field`); `data.system_prompt` is put first where a conversation has no system message.

Tokenizing: the tokenizer and chat template of an HF directory (`data.tokenizer`: its `tokenizer.json` and the
`chat_template` of its `tokenizer_config.json`), applied through transformers. Which tokens are trained (the
assistant mask) comes from the template's `{% generation %}` markers where it has them (transformers' assistant
mask), otherwise from rendering each prefix of the conversation: an assistant turn's tokens are those between the
prefix that ends with the generation prompt and the prefix that ends with the turn, so that every assistant turn is
trained, not only the last. Refused, by name and with an example: a template whose markers leave an assistant turn
out, one whose prefixes do not render as prefixes, and a dataset whose mask is empty or covers every token.

Caching: tokenized once into `cache_dir/chat-<hash>/{train,val}`, keyed by the content of the data files, the
tokenizer files and the field settings (`tokens.bin`, `mask.bin`, `offsets.npy`, `meta.json`); several ranks
starting at once build it once (a file lock). A sample is one conversation, cut at `training.seq_len + 1` tokens and
padded; its untrained targets (prompt tokens, padding) carry the `UNTRAINED` flag in the batch (models/loss.py), so
the loss and its token count see the assistant's tokens only, and the loader's cursor stays the one number it is.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from models.args import ConfigError
from models.loss import UNTRAINED
from trainer.data import pack_documents, with_documents

FORMAT_VERSION = 1
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


class ChatDataError(ConfigError):
    """The chat data cannot train as configured (the message names the setting, the file and an example)."""


def data_files(spec: str) -> list[Path]:
    """The files `data.path` names: one file, a glob, or every JSONL/Parquet/Arrow file under a folder."""
    p = Path(spec).expanduser()
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.suffix in SUFFIXES and f.is_file()]
    elif any(c in spec for c in "*?["):
        files = [Path(f) for f in sorted(glob.glob(str(p), recursive=True)) if Path(f).is_file()]
    else:
        files = [p] if p.is_file() else []
    return files


def tokenizer_problems(d) -> list[str]:
    """data.tokenizer: an HF directory with a tokenizer.json and a chat template."""
    root = Path(str(d.tokenizer)).expanduser()
    if not (root / "tokenizer.json").is_file():
        return [f"data.tokenizer={d.tokenizer}: no tokenizer.json there; name an HF model directory"]
    try:
        config = json.loads((root / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    has_file = (root / "chat_template.jinja").is_file() or (root / "chat_template.json").is_file()
    if not config.get("chat_template") and not has_file:
        return [
            f"data.tokenizer={d.tokenizer}: its tokenizer_config.json has no chat_template (nor a chat_template.jinja "
            "beside it); add one (launch/make_chat_data.py --tokenizer-out writes one)"
        ]
    return []


def with_defaults(cfg):
    """The data section with a chat run's defaults filled in (built once into the cache where needed): without
    `data.path`, the standard library's chat set (trainer/stdlib_chat.py) and its validation split; without
    `data.tokenizer`, the default dataset's tokenizer with trainer/stdlib_chat.py's TEMPLATE_MARKED."""
    from omegaconf import OmegaConf

    d = OmegaConf.create(OmegaConf.to_container(cfg.data))
    if not d.get("path"):
        from trainer.stdlib_chat import default_chat_dir

        root = default_chat_dir(cfg)
        d.path, d.val_path = str(root / "train.jsonl"), str(root / "val.jsonl")
    if not d.get("tokenizer"):
        from trainer.stdlib_chat import default_chat_tokenizer

        d.tokenizer = str(default_chat_tokenizer(cfg))
    return OmegaConf.create({"data": d})


def config_problems(cfg) -> list[str]:
    """The chat source's settings, cheaply (the data's own problems come when it is tokenized: `prepare`; a null
    data.path or data.tokenizer is the built-in set or tokenizer, `with_defaults`)."""
    d = cfg.data
    problems = []
    for key in ("path", "val_path"):
        spec = d.get(key)
        if spec:
            files = data_files(str(spec))
            if not files:
                problems.append(f"data.{key}={spec}: no such file, and no JSONL, Parquet or Arrow file matches")
            elif bad := [f for f in files if f.suffix not in SUFFIXES]:
                problems.append(f"data.{key}={spec}: {bad[0]} is not JSONL, Parquet or Arrow ({', '.join(SUFFIXES)})")
    if d.get("tokenizer"):
        problems += tokenizer_problems(d)
    if not 0 < d.val_fraction < 1 and not d.get("val_path"):
        problems.append(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    return problems


# ----------------------------------------------------------------------------------------------
# Reading and tokenizing


def _records(files: list[Path]):
    """Every record of the files, in order, through datasets' local loaders (nothing fetched)."""
    import datasets

    datasets.disable_progress_bars()
    by_kind: dict[str, list[str]] = {}
    for f in files:
        by_kind.setdefault(SUFFIXES[f.suffix], []).append(str(f))
    for kind, paths in by_kind.items():
        yield from datasets.load_dataset(kind, data_files=paths, split="train")


def conversation(record: dict, d, where: str) -> list[dict]:
    """A record as messages: its `messages_field` list, or its prompt and response; the system prompt first."""
    if d.messages_field in record and record[d.messages_field] is not None:
        messages = [{"role": m["role"], "content": m["content"]} for m in record[d.messages_field]]
    elif d.prompt_field in record and d.response_field in record:
        messages = [
            {"role": "user", "content": record[d.prompt_field]},
            {"role": "assistant", "content": record[d.response_field]},
        ]
    else:
        raise ChatDataError(
            f"{where}: no '{d.messages_field}' list and no '{d.prompt_field}'/'{d.response_field}' pair (its fields: "
            f"{sorted(record)}); set data.messages_field, or data.prompt_field and data.response_field"
        )
    if d.system_prompt and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": str(d.system_prompt)}, *messages]
    return messages


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True)


def has_markers(tok) -> bool:
    return "{% generation %}" in (tok.chat_template or "").replace("{%- generation %}", "{% generation %}")


def _ids(tok, messages: list[dict], **kw) -> list[int]:
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])


def assistant_mask(tok, messages: list[dict], *, markers: bool, where: str) -> tuple[list[int], list[int]]:
    """(token ids, 1 where the token belongs to an assistant turn) of one conversation; every assistant turn must be
    covered, or the template is refused."""
    turns = sum(m["role"] == "assistant" for m in messages)
    if markers:
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [int(x) for x in out["assistant_masks"]]
        spans = sum(1 for i, x in enumerate(mask) if x and (i == 0 or not mask[i - 1]))
        if spans < turns:
            raise ChatDataError(
                f"{where}: the chat template's generation markers cover {spans} of its {turns} assistant turns (a "
                "template that marks only the last turn trains on that one alone); mark every assistant turn, or "
                "remove the markers (every turn is then found by rendering the conversation's prefixes)"
            )
        return ids, mask
    ids = _ids(tok, messages)
    mask = [0] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _ids(tok, messages[:k], add_generation_prompt=True) if k else []
        end = _ids(tok, messages[: k + 1])
        if ids[: len(start)] != start or ids[: len(end)] != end or len(end) <= len(start):
            raise ChatDataError(
                f"{where}: the chat template does not render the conversation up to assistant turn {k} as a prefix "
                "of the whole (the assistant's tokens cannot be told apart); add {% generation %} markers to the "
                "template"
            )
        for i in range(len(start), len(end)):
            mask[i] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------
# The cache


def _digest(paths: list[Path], h) -> None:
    for p in paths:
        h.update(str(p.resolve()).encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def cache_dir(cfg) -> Path:
    """Where this configuration's tokenized conversations live: keyed by the content of everything they come from."""
    d = cfg.data
    h = hashlib.sha256()
    settings = [FORMAT_VERSION, d.messages_field, d.prompt_field, d.response_field, d.system_prompt]
    settings += [d.val_fraction if not d.get("val_path") else None]
    h.update(json.dumps(settings).encode())
    for key in ("path", "val_path"):
        h.update(key.encode())
        if d.get(key):
            _digest(data_files(str(d[key])), h)
    tok = Path(str(d.tokenizer)).expanduser()
    _digest([f for f in sorted(tok.iterdir()) if f.is_file() and not f.name.startswith(".")], h)
    root = Path(d.cache_dir or os.environ.get("SHARDWISE_CACHE") or "~/.cache/shardwise").expanduser()
    return root / f"chat-{h.hexdigest()[:16]}"


def _example(messages: list[dict]) -> str:
    text = json.dumps(messages)
    return text if len(text) <= 300 else text[:300] + " ..."


def _write_split(tmp: Path, split: str, items: list[tuple[list[int], list[int]]], meta: dict) -> None:
    out = tmp / split
    out.mkdir()
    lengths = np.fromiter((len(ids) for ids, _ in items), dtype=np.int64, count=len(items))
    np.save(out / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    with open(out / "tokens.bin", "wb") as ft, open(out / "mask.bin", "wb") as fm:
        for ids, mask in items:
            ft.write(np.asarray(ids, dtype=np.uint32).tobytes())
            fm.write(np.asarray(mask, dtype=np.uint8).tobytes())
    tokens, trained = int(lengths.sum()), sum(sum(m) for _, m in items)
    info = {**meta, "conversations": len(items), "tokens": tokens, "trained_tokens": trained}
    (out / "meta.json").write_text(json.dumps(info, indent=2))


def _tokenize(cfg, files: list[Path], tok, markers: bool, setting: str) -> tuple[list, list[list[dict]]]:
    items, convs = [], []
    for i, record in enumerate(_records(files)):
        where = f"data.{setting} record {i} ({_example_source(files)})"
        messages = conversation(record, cfg.data, where)
        ids, mask = assistant_mask(tok, messages, markers=markers, where=where)
        items.append((ids, mask))
        convs.append(messages)
    return items, convs


def _example_source(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{len(files)} files from {files[0]}"


def _mask_problems(items, convs, setting: str, tokenizer: str) -> list[str]:
    """An empty mask trains nothing; a mask over every token trains on the prompts too (a template whose markers
    the tokenizer cannot place, or a conversation without user turns): both refused, with an example."""
    trained = sum(sum(m) for _, m in items)
    total = sum(len(m) for _, m in items)
    if total and trained == 0:
        return [
            f"data.{setting}: no token of any conversation is an assistant token under data.tokenizer={tokenizer}'s "
            f"chat template (nothing would train); e.g. {_example(convs[0])}"
        ]
    if total and trained == total:
        return [
            f"data.{setting}: every token is marked as the assistant's under data.tokenizer={tokenizer}'s chat "
            f"template (the prompts would train too); e.g. {_example(convs[0])}"
        ]
    return []


def prepare(cfg) -> Path:
    """Tokenize the chat data once (or find it tokenized) and return its cache directory; raise ChatDataError with
    every problem of the data before anything is kept. Several processes at once: one builds, the others wait."""
    cfg = with_defaults(cfg)
    d = cfg.data
    out = cache_dir(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "train" / "meta.json").is_file():
            return out
        tok = load_tokenizer(str(d.tokenizer))
        markers = has_markers(tok)
        items, convs = _tokenize(cfg, data_files(str(d.path)), tok, markers, "path")
        if d.get("val_path"):
            val_items, val_convs = _tokenize(cfg, data_files(str(d.val_path)), tok, markers, "val_path")
            train_items = items
        else:
            from trainer.data import is_validation

            held = [is_validation(json.dumps(c), d.val_fraction) for c in convs]
            train_items = [x for x, h in zip(items, held) if not h]
            val_items = [x for x, h in zip(items, held) if h]
        problems = _mask_problems(items, convs, "path", str(d.tokenizer))
        if d.get("val_path"):
            problems += _mask_problems(val_items, val_convs, "val_path", str(d.tokenizer))
        if not train_items or not val_items:
            problems.append(
                f"data.path={d.path}: {len(train_items)} training and {len(val_items)} validation conversations; "
                "give more conversations, data.val_path, or another data.val_fraction"
            )
        if problems:
            raise ChatDataError(problems)
        meta = {
            "format_version": FORMAT_VERSION,
            "vocab_size": len(tok),
            "pad_id": int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id or 0),
            "mask_from": "the template's generation markers" if markers else "the conversation's rendered prefixes",
            "source": f"{d.path} with data.tokenizer={d.tokenizer}",
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            _write_split(tmp, "train", train_items, meta)
            _write_split(tmp, "val", val_items, meta)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


# ----------------------------------------------------------------------------------------------
# The source


class ChatSource:
    """Conversation i as a window of seq_len + 1 tokens: cut there, padded after, each token that is not an
    assistant token flagged `UNTRAINED` (as a target it carries no loss). Conversations with no assistant token within
    the window are left out (counted in `dropped`). With `pack` (data.pack), a window holds as many conversations as
    fit (trainer/data.py `pack_documents`), each its own document (models/loss.py DOCUMENT_SHIFT), the padding
    after them one more."""

    def __init__(self, root: Path, split: str, seq_len: int, pack: bool = False):
        d = Path(root) / split
        self.meta = json.loads((d / "meta.json").read_text())
        self.vocab_size = self.meta["vocab_size"]
        self.tokens = np.memmap(d / "tokens.bin", dtype=np.uint32, mode="r")
        self.mask = np.memmap(d / "mask.bin", dtype=np.uint8, mode="r")
        self.offsets = np.load(d / "offsets.npy")
        self.seq_len = seq_len
        starts, ends = self.offsets[:-1], self.offsets[1:]
        trained = np.concatenate([[0], np.cumsum(self.mask, dtype=np.int64)])
        # the targets of a window are its tokens 1..seq_len
        within = trained[np.minimum(ends, starts + seq_len + 1)] - trained[np.minimum(starts + 1, ends)]
        self.index = np.flatnonzero(within > 0)
        self.dropped = len(starts) - len(self.index)
        self.truncated = int(((ends - starts) > seq_len + 1)[self.index].sum())
        if len(self.index) < 1:
            raise ValueError(f"{d}: no conversation has an assistant token within training.seq_len={seq_len}")
        self.windows = None  # data.pack: each window's conversations (positions in `index`)
        if pack:
            lengths = np.minimum(ends - starts, seq_len + 1)[self.index]
            self.windows = pack_documents(lengths, seq_len + 1)
        self.num_samples = len(self.index) if self.windows is None else len(self.windows)

    def __getitem__(self, i: int) -> np.ndarray:
        out = np.full(self.seq_len + 1, self.meta["pad_id"] + UNTRAINED, dtype=np.int64)
        documents = np.zeros(self.seq_len + 1, dtype=np.int64)
        at = 0
        for n, j in enumerate([i] if self.windows is None else self.windows[i]):
            c = int(self.index[j])
            s, e = int(self.offsets[c]), int(self.offsets[c + 1])
            e = min(e, s + self.seq_len + 1 - at)
            ids = self.tokens[s:e].astype(np.int64)
            out[at : at + e - s] = np.where(self.mask[s:e] > 0, ids, ids + UNTRAINED)
            documents[at : at + e - s] = n
            at += e - s
        if self.windows is None:
            return out
        documents[at:] = len(self.windows[i])  # (the padding: a document of its own)
        return with_documents(out, documents)

    @property
    def trained_fraction(self) -> float:
        """The share of the conversations' tokens that train (the assistant's), logged as data/trained_fraction."""
        return self.meta["trained_tokens"] / max(self.meta["tokens"], 1)

    def describe(self) -> str:
        m = self.meta
        share = self.trained_fraction
        packed = ""
        if self.windows is not None:
            used = int(np.minimum(np.diff(self.offsets), self.seq_len + 1)[self.index].sum())
            filled = used / (len(self.windows) * (self.seq_len + 1))
            packed = (
                f"; packed into {len(self.windows):,} sequences of {self.seq_len + 1} tokens "
                f"({filled:.1%} of their tokens conversations, the rest padding)"
            )
        return (
            f"{m['source']}: {m['conversations']:,} conversations, {share:.1%} of their tokens trained (assistant "
            f"turns, from {m['mask_from']}); {self.truncated:,} cut at training.seq_len, {self.dropped:,} left out "
            f"(no assistant token within it){packed}"
        )


def ready(cfg, vocab_size: int) -> Path:
    """launch/train.py, before any process group: the chat data tokenized (or found so), its problems raised as one
    ConfigError, the tokenizer's vocabulary checked against the model's."""
    try:
        root = prepare(cfg)
    except ChatDataError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as e:  # (a file datasets cannot read, a malformed record)
        raise ChatDataError([f"data.path={cfg.data.path}: {type(e).__name__}: {e}"]) from None
    vocab = json.loads((root / "train" / "meta.json").read_text())["vocab_size"]
    if vocab > vocab_size:
        raise ChatDataError(
            [
                f"data.tokenizer={cfg.data.tokenizer} has {vocab} tokens > model.vocab_size {vocab_size}; "
                f"set model.vocab_size={vocab} or larger"
            ]
        )
    return root


def open_chat_sources(cfg, seq_len: int) -> tuple[ChatSource, ChatSource, str]:
    """(train source, validation source, description) of `data.source=chat` (tokenized before the process group
    started: `ready`; found in the cache here)."""
    root, pack = prepare(cfg), bool(cfg.data.get("pack", False))
    train, val = ChatSource(root, "train", seq_len, pack), ChatSource(root, "val", seq_len, pack)
    return train, val, train.describe()


def held_out_prompts(source: ChatSource, n: int) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """The first `n` validation conversations' prompts (every token before the first assistant token) and reference
    answers (that first assistant span), and the end-of-turn tokens to stop a completion at: the longest token
    sequence every reference ends with (the template's end marker), at most 8 tokens."""
    pairs = []
    for c in source.index[: max(n, 64)]:  # (the end marker from many answers: one alone ends with its own text)
        s, e = int(source.offsets[c]), int(source.offsets[c + 1])
        ids, mask = source.tokens[s:e].astype(np.int64).tolist(), source.mask[s:e].tolist()
        first = mask.index(1)
        end = next((i for i in range(first, len(mask)) if not mask[i]), len(mask))
        pairs.append((ids[:first], ids[first:end]))
    stop: list[int] = []
    refs = [r for _, r in pairs]
    pairs = pairs[:n]
    while len(stop) < min(8, *(len(r) for r in refs)) and len({r[-len(stop) - 1] for r in refs}) == 1:
        stop.insert(0, refs[0][-len(stop) - 1])
    return pairs, stop
