"""Datasets and the deterministic, resumable, data-parallel batch loader.

Sources
- default: the Python standard library's own source files on this machine (text every Python install
  has, nothing downloaded, nothing third-party copied into the repo), with a byte-level BPE tokenizer
  trained on it. Built once into the cache and reused; documents are split into train/validation by a
  hash of their path, so the split does not depend on the order of files on disk.
- tokens: a directory written by `launch/prepare_data.py` (or by the default builder): `meta.json`,
  `train.bin`, `val.bin` (flat uint16 or uint32 token ids, EOS between documents), `tokenizer.json`.
- synthetic: uniformly random tokens, each sequence drawn from its own seeded generator. For benchmarks.

The loader cuts the token stream into fixed windows of seq_len + 1 tokens (inputs and shifted targets). With
`data.pack` each window's documents are numbered (a document ends with its EOS) in the batch's high bits
(models/loss.py DOCUMENT_SHIFT): the model attends within each document, its positions restarting, and the target
after an EOS (the next document's first token) carries no loss.
Its position is one number, the *global sample cursor*: step s of a run consumes samples
[cursor, cursor + global_batch_size) of a seeded permutation, and data-parallel rank r takes the r-th
contiguous slice of them. The set of samples in a global batch therefore does not depend on the number of
ranks, which is what makes resume exact under a change of strategy or world size.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from models.loss import DOCUMENT_SHIFT

DEFAULT_VOCAB_SIZE = 4096  # the default tokenizer's vocabulary (the debug flavor's vocab_size)
EOS = "<|endoftext|>"
FORMAT_VERSION = 1
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3", "turtledemo"}


# ----------------------------------------------------------------------------------------------
# Building token files


def stdlib_documents(max_bytes: int) -> Iterator[tuple[str, str]]:
    """(relative path, text) of this interpreter's standard-library .py files, sorted, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        paths += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    total = 0
    for path in sorted(paths):
        text = path.read_text(encoding="utf-8", errors="replace")
        if total + len(text) > max_bytes:
            break
        total += len(text)
        yield str(path.relative_to(root)), text


def text_documents(paths: Iterable[str | Path], undecodable: list | None = None) -> Iterator[tuple[str, str]]:
    """(path, text) for files and (recursively) the files in directories, sorted; in a directory, binary files (a
    NUL byte in their first 8 KiB, as git decides) and `__pycache__` folders are passed over. Bytes that are not UTF-8
    become U+FFFD, and each such file is appended to `undecodable` as (path, count) for the caller to report.
    Raises ValueError when there is no file at all."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(
                q
                for q in p.rglob("*")
                if q.is_file() and "__pycache__" not in q.relative_to(p).parts and not _binary(q)
            )
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    if not files:
        raise ValueError(f"no text files in {', '.join(map(str, paths))}")
    for f in files:
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("utf-8", errors="replace")
            if undecodable is not None:
                undecodable.append((str(f), text.count("\ufffd") - data.count("\ufffd".encode())))
        yield str(f), text


def _binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization) with EOS as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def is_validation(name: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a stable hash of its name, not its position."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def write_token_files(
    docs: Iterable[tuple[str, str]],
    tokenizer,
    out_dir: Path,
    *,
    val_fraction: float,
    description: str,
    progress: bool = False,
    batch_docs: int = 64,
    eos: str = EOS,
) -> dict:
    """Tokenize documents into out_dir/{train,val}.bin + meta.json + tokenizer.json, atomically.

    Everything is written to a temporary sibling directory and renamed into place at the end, so a crash
    never leaves a half-written dataset that a later run would trust.
    """
    out_dir = Path(out_dir)
    vocab = tokenizer.get_vocab_size()
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:
        raise ValueError(f"the tokenizer has no {eos} token; name its end-of-document token")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    counts = {"train": 0, "val": 0}
    docs_in = {"train": 0, "val": 0}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="tokenizing", unit="doc", file=sys.stderr)
    try:
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            files = {"train": ftrain, "val": fval}

            def flush(batch: list[tuple[str, str]]) -> None:
                for (name, _), enc in zip(batch, tokenizer.encode_batch([t for _, t in batch])):
                    split = "val" if is_validation(name, val_fraction) else "train"
                    ids = np.asarray(enc.ids + [eos_id], dtype=dtype)
                    files[split].write(ids.tobytes())
                    counts[split] += len(ids)
                    docs_in[split] += 1
                if bar is not None:
                    bar.update(len(batch))

            batch: list[tuple[str, str]] = []
            for doc in docs:
                batch.append(doc)
                if len(batch) == batch_docs:
                    flush(batch)
                    batch = []
            if batch:
                flush(batch)
        if counts["val"] == 0 or counts["train"] == 0:
            raise ValueError(f"split left {counts}; give more documents or change val_fraction ({val_fraction})")
        tokenizer.save(str(tmp / "tokenizer.json"))
        meta = {
            "format_version": FORMAT_VERSION,
            "dtype": np.dtype(dtype).name,
            "vocab_size": vocab,
            "eos": eos,
            "eos_id": eos_id,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "train_documents": docs_in["train"],
            "val_documents": docs_in["val"],
            "val_fraction": val_fraction,
            "source": description,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return meta


def default_dataset_dir(cache_dir: str | None, corpus_mb: float, val_fraction: float) -> Path:
    """Build (once) and return the default dataset. Safe when several ranks start at once (file lock)."""
    cache = Path(cache_dir or os.environ.get("SHARDWISE_CACHE") or "~/.cache/shardwise").expanduser()
    stdlib = sysconfig.get_paths()["stdlib"]
    key = hashlib.sha256(
        json.dumps([FORMAT_VERSION, sys.version, stdlib, corpus_mb, val_fraction, DEFAULT_VOCAB_SIZE]).encode()
    ).hexdigest()[:12]
    out = cache / f"default-{key}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".default-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first process builds; the others wait, then reuse
        if not (out / "meta.json").is_file():
            max_bytes = int(corpus_mb * 2**20)
            tok = train_tokenizer((t for _, t in stdlib_documents(max_bytes)), DEFAULT_VOCAB_SIZE)
            write_token_files(
                stdlib_documents(max_bytes),
                tok,
                out,
                val_fraction=val_fraction,
                description=f"Python {sys.version.split()[0]} standard library at {stdlib}, "
                f"first {corpus_mb} MiB of .py files",
            )
    return out


# ----------------------------------------------------------------------------------------------
# Sources: index -> a window of seq_len + 1 tokens


def with_documents(window: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """A window's tokens with each one's packed document number in the high bits."""
    return window | (documents.astype(np.int64) << DOCUMENT_SHIFT)


def pack_documents(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing: the documents of `lengths` (each <= capacity) in as few windows of `capacity` tokens as
    this greedy finds, longest first, each into the fullest window it fits (or a new one); each window's documents
    in their original order. Deterministic: the same windows for any world size."""
    import bisect

    free: list[tuple[int, int]] = []  # (space left, window), sorted
    windows: list[list[int]] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            windows.append([int(i)])
            space, w = capacity - n, len(windows) - 1
        else:
            space, w = free.pop(j)
            windows[w].append(int(i))
            space -= n
        if space >= 2:  # (a document of one token has no target)
            bisect.insort(free, (space, w))
    return [np.sort(np.asarray(w, dtype=np.int64)) for w in windows]


class TokenFileSource:
    """A memory-mapped token file cut into non-overlapping windows of seq_len + 1 tokens; with `pack`, each token's
    document (counted from the window's start; a document ends with its EOS) in the high bits."""

    def __init__(self, path: Path, split: str, seq_len: int, pack: bool = False):
        meta = json.loads((Path(path) / "meta.json").read_text())
        self.meta = meta
        self.eos_id = int(meta["eos_id"]) if pack else None
        self.vocab_size = meta["vocab_size"]
        self.tokens = np.memmap(Path(path) / f"{split}.bin", dtype=np.dtype(meta["dtype"]), mode="r")
        self.seq_len = seq_len
        # window i covers tokens [i*T, i*T + T + 1): consecutive windows share one token (the target of
        # the last position is the first input of the next window)
        self.num_samples = (len(self.tokens) - 1) // seq_len
        if self.num_samples < 1:
            raise ValueError(f"{path}/{split}.bin has {len(self.tokens)} tokens, fewer than seq_len+1={seq_len + 1}")

    def __getitem__(self, i: int) -> np.ndarray:
        start = i * self.seq_len
        window = np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        if self.eos_id is None:
            return window
        documents = np.zeros(len(window), dtype=np.int64)
        np.cumsum(window[:-1] == self.eos_id, out=documents[1:])  # (an EOS is its own document's last token)
        return with_documents(window, documents)


class SyntheticSource:
    """Uniform random tokens; sample i comes from its own generator, so any subset is reproducible."""

    iid = True  # samples are independent draws already: the loader need not permute them

    def __init__(self, vocab_size: int, seq_len: int, seed: int, split: str, num_samples: int = 2**40):
        self.vocab_size, self.seq_len, self.num_samples = vocab_size, seq_len, num_samples
        self.seed = (seed, 0 if split == "train" else 1)

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([*self.seed, i])
        return rng.integers(0, self.vocab_size, self.seq_len + 1, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# The loader


class BatchLoader:
    """Yields this rank's micro-batches of each global batch; its whole state is the sample cursor.

    `next_batch()` returns a (accum_steps, micro_batch, seq_len + 1) int64 tensor and the global sample
    indices it holds (the same shape without the last dimension).
    """

    def __init__(
        self, source, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int, seed: int, shuffle: bool
    ):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"global_batch({global_batch}) % (micro_batch({micro_batch}) * dp({dp_size})) != 0")
        self.source = source
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.seed = seed
        self.shuffle = shuffle and not getattr(source, "iid", False)
        self.cursor = 0  # global samples consumed so far, summed over all ranks
        self._perm_epoch, self._perm = -1, None

    def _sample_id(self, k: int) -> int:
        """The k-th sample of the (endless, epoch-by-epoch reshuffled) stream."""
        n = self.source.num_samples
        epoch, pos = divmod(k, n)
        if not self.shuffle:
            return pos
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm_epoch = epoch
        return int(self._perm[pos])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.cursor + self.dp_rank * self.per_rank  # this rank's contiguous slice
        ids = [self._sample_id(k) for k in range(first, first + self.per_rank)]
        self.cursor += self.global_batch
        data = torch.from_numpy(np.stack([self.source[i] for i in ids]))  # (per_rank, T + 1)
        idx = torch.tensor(ids, dtype=torch.int64)
        accum = self.per_rank // self.micro_batch
        return data.view(accum, self.micro_batch, -1), idx.view(accum, self.micro_batch)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data loader state has seed {state['seed']} but this run uses {self.seed}")
        self.cursor = int(state["cursor"])


def open_sources(cfg, seq_len: int, vocab_size: int) -> tuple[object, object, str]:
    """(train source, validation source, description) for the config's data.source (synthetic, default,
    tokens: compared as strings, so that this module does not import the config module that imports it; chat:
    trainer/chat.py `open_chat_sources`)."""
    d = cfg.data
    if str(d.source) == "synthetic":
        seed = cfg.training.seed
        return (
            SyntheticSource(vocab_size, seq_len, seed, "train"),
            SyntheticSource(vocab_size, seq_len, seed, "val"),
            f"synthetic uniform tokens, vocab {vocab_size}",
        )
    if str(d.source) == "default":
        path = default_dataset_dir(d.cache_dir, d.default_corpus_mb, d.val_fraction)
    else:
        path = Path(d.path).expanduser()
    pack = bool(d.get("pack", False))
    train, val = TokenFileSource(path, "train", seq_len, pack), TokenFileSource(path, "val", seq_len, pack)
    return train, val, f"{path} ({train.meta['source']})"


def config_problems(cfg, args) -> list[str]:
    """The data section's rules: the source exists and fits the model (trainer/validate.py::validate collects
    every subsystem's)."""
    t = cfg.training
    problems: list[str] = []
    d = cfg.data
    if str(d.source) == "tokens":
        if not d.path:
            problems.append("data.source=tokens needs data.path: a directory made by launch/prepare_data.py")
        else:
            root = Path(d.path).expanduser()
            if not root.is_dir():
                problems.append(
                    f"data.path={d.path}: no such directory; make one with "
                    f"`python launch/prepare_data.py --tokenizer tokenizer.json --out {d.path} FILES...`"
                )
            else:
                missing = [f for f in ("meta.json", "train.bin", "val.bin") if not (root / f).is_file()]
                if missing:
                    problems.append(
                        f"data.path={d.path}: missing {', '.join(missing)}; rebuild it with launch/prepare_data.py"
                    )
                else:
                    try:
                        meta = json.loads((root / "meta.json").read_text())
                        itemsize = np.dtype(meta["dtype"]).itemsize
                    except (ValueError, KeyError, TypeError) as e:
                        meta, itemsize = {}, 0
                        problems.append(
                            f"data.path={d.path}: meta.json is unreadable ({type(e).__name__}: {e}); "
                            f"rebuild it with launch/prepare_data.py"
                        )
                    for split in ("train", "val") if itemsize else ():
                        n = (root / f"{split}.bin").stat().st_size // itemsize
                        if n < t.seq_len + 1:
                            problems.append(
                                f"data.path={d.path}: {split}.bin has {n} tokens, fewer than one sequence "
                                f"of training.seq_len + 1 = {t.seq_len + 1}; lower training.seq_len or "
                                f"give launch/prepare_data.py more text"
                            )
                    vocab = meta.get("vocab_size", 0)
                    if vocab > args.vocab_size:
                        problems.append(
                            f"the tokenizer of data.path has vocab_size {vocab} > model vocab_size "
                            f"{args.vocab_size}; set model.vocab_size={vocab} or larger"
                        )
    elif str(d.source) == "chat":
        return []  # (trainer/chat.py's own rules: trainer/validate.py asks them)
    elif str(d.source) == "default":
        if args.vocab_size < DEFAULT_VOCAB_SIZE:
            problems.append(
                f"the default dataset's tokenizer has {DEFAULT_VOCAB_SIZE} tokens > model vocab_size "
                f"{args.vocab_size}; set model.vocab_size={DEFAULT_VOCAB_SIZE} or larger"
            )
        if d.default_corpus_mb <= 0:
            problems.append(f"data.default_corpus_mb={d.default_corpus_mb} must be > 0")
    if not 0 < d.val_fraction < 1:
        problems.append(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    if d.get("pack", False):
        problems += _pack_problems(cfg)
    return problems


def _pack_problems(cfg) -> list[str]:
    """data.pack's rules: documents to pack, and the layouts its attention is built for."""
    d, p, problems = cfg.data, cfg.parallel, []
    if str(d.source) == "synthetic":
        problems.append(
            "data.pack=true: data.source=synthetic has no documents to pack (uniform tokens, no EOS); use "
            "data.source=default, tokens or chat, or data.pack=false"
        )
    if int(p.cp) > 1:
        problems.append(
            f"data.pack=true with parallel.cp={p.cp}: packed documents under context parallelism are not built (each "
            "rank would need the documents' mask against the whole sequence's keys); set parallel.cp=1 or "
            "data.pack=false"
        )
    if str(cfg.model.get("attention", "auto")) != "auto":
        problems.append(
            f"data.pack=true with model.attention={cfg.model.attention}: packed documents choose their own kernel "
            "(FlexAttention on CUDA, SDPA with one additive mask on the CPU); set model.attention=auto"
        )
    if p.get("activation_offload", False):
        problems.append(
            "data.pack=true with parallel.activation_offload=true: not built (every block saves the documents' mask, "
            "and each block would send its own copy to the host); set one of them to false"
        )
    return problems
