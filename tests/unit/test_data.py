"""Data: the default dataset, token files from prepare_data, and the deterministic resumable loader."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, run_cli

from trainer.data import (
    BatchLoader,
    SyntheticSource,
    TokenFileSource,
    default_dataset_dir,
    train_tokenizer,
    write_token_files,
)


class RangeSource:
    """Sample i is the tokens [i, i + 1, ...]: the loader's output shows exactly which samples it chose."""

    num_samples = 50
    seq_len = 4

    def __getitem__(self, i):
        return np.full(self.seq_len + 1, i, dtype=np.int64)


def _loader(**kw):
    args = dict(global_batch=8, micro_batch=2, dp_rank=0, dp_size=1, seed=7, shuffle=True)
    return BatchLoader(RangeSource(), **{**args, **kw})


def test_loader_is_deterministic_from_the_seed():
    a, b, c = _loader(), _loader(), _loader(seed=8)
    batches_a = [a.next_batch()[1] for _ in range(10)]
    assert all(torch.equal(x, b.next_batch()[1]) for x in batches_a)
    assert not all(torch.equal(x, c.next_batch()[1]) for x in batches_a)


def test_every_epoch_is_a_permutation():
    loader = _loader(global_batch=10, micro_batch=5)
    first_epoch = torch.cat([loader.next_batch()[1].flatten() for _ in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(50))
    second = torch.cat([loader.next_batch()[1].flatten() for _ in range(5)])
    assert sorted(second.tolist()) == list(range(50)) and not torch.equal(first_epoch, second)


def test_cursor_resumes_exactly():
    full = _loader()
    expected = [full.next_batch()[1] for _ in range(9)]
    part = _loader()
    for _ in range(4):
        part.next_batch()
    state = json.loads(json.dumps(part.state_dict()))  # it survives a trip through JSON
    resumed = _loader()
    resumed.load_state_dict(state)
    assert all(torch.equal(expected[i], resumed.next_batch()[1]) for i in range(4, 9))


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_ranks_split_the_same_global_batch(dp_size):
    """Whatever the number of ranks, the union of their slices is the same global batch, in order."""
    reference = _loader(micro_batch=1)
    ranks = [_loader(dp_rank=r, dp_size=dp_size, micro_batch=2) for r in range(dp_size)]
    for _ in range(7):
        want = reference.next_batch()[1].flatten()
        got = torch.cat([r.next_batch()[1].flatten() for r in ranks])
        assert torch.equal(want, got)


def test_micro_batches_carry_their_samples():
    data, idx = _loader().next_batch()
    assert data.shape == (4, 2, 5) and idx.shape == (4, 2)
    assert torch.equal(data[..., 0], idx)


def test_seed_mismatch_is_refused():
    with pytest.raises(ValueError, match="seed 7 but this run uses 8"):
        _loader(seed=8).load_state_dict(_loader().state_dict())


def test_synthetic_source_is_reproducible_per_index():
    s = SyntheticSource(vocab_size=100, seq_len=16, seed=1, split="train")
    assert np.array_equal(s[12345], s[12345]) and not np.array_equal(s[1], s[2])
    assert s[3].max() < 100 and s[3].shape == (17,)
    assert not np.array_equal(s[3], SyntheticSource(100, 16, 1, "val")[3])


def test_token_files_round_trip(tmp_path):
    docs = [(f"doc{i}.txt", f"document number {i}: " + "hello world " * (i + 3)) for i in range(40)]
    tok = train_tokenizer((t for _, t in docs), 300)
    meta = write_token_files(docs, tok, tmp_path / "out", val_fraction=0.2, description="test")
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.get_vocab_size()
    assert meta["train_documents"] + meta["val_documents"] == 40 and meta["val_documents"] > 0
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    # decoding the token stream gives back the documents, EOS between them
    text = tok.decode(train.tolist(), skip_special_tokens=False)
    train_docs = [t for _, t in docs if t in text]
    assert len(train_docs) == meta["train_documents"]
    src = TokenFileSource(tmp_path / "out", "train", seq_len=8)
    assert src.num_samples == (len(train) - 1) // 8
    assert np.array_equal(src[1], train[8:17])  # window 1 = tokens 8..16 (inputs 8..15, targets 9..16)
    assert not list(tmp_path.glob(".out.*")), "temporary directory left behind"


def test_packed_token_files_split_each_window_at_its_eos(tmp_path):
    """data.pack on token files: a window's tokens carry their document (a document ends with its EOS), the model's
    documents are the inputs' ones, and the target after each EOS (the next document's first token) carries no loss;
    every other target is the window's next token as unpacked."""
    from models.loss import DOCUMENT_SHIFT, IGNORE_INDEX, documents_of, inputs_and_targets, trained_targets

    docs = [(f"doc{i}.txt", "hello world " * (1 + i % 4)) for i in range(40)]
    tok = train_tokenizer((t for _, t in docs), 300)
    meta = write_token_files(docs, tok, tmp_path / "out", val_fraction=0.2, description="test")
    plain, packed = (TokenFileSource(tmp_path / "out", "train", 64, pack=p) for p in (False, True))
    window, tagged = torch.from_numpy(plain[2]), torch.from_numpy(packed[2])
    assert torch.equal(tagged & ((1 << DOCUMENT_SHIFT) - 1), window)
    eos = window[:-1] == meta["eos_id"]
    assert eos.sum() >= 3  # (several documents in the window)
    assert torch.equal(documents_of(tagged[None])[0], torch.cat([torch.zeros(1, dtype=torch.long), eos.cumsum(0)[:-1]]))
    inputs, targets = inputs_and_targets(tagged[None])
    assert torch.equal(inputs[0], window[:-1])
    assert torch.equal(targets[0] == IGNORE_INDEX, eos) and torch.equal(targets[0][~eos], window[1:][~eos])
    assert trained_targets(tagged[None]) == 64 - eos.sum() and trained_targets(window[None]) == 64


def test_uint32_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)}
    vocab["<|endoftext|>"] = 70000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    meta = write_token_files(
        [("a", "w1 w69999 w5"), ("b", "w2 w3")] * 20, tok, tmp_path / "big", val_fraction=0.3, description="test"
    )
    assert meta["dtype"] == "uint32"
    assert (
        69999
        in np.fromfile(tmp_path / "big" / "train.bin", dtype=np.uint32).tolist()
        + np.fromfile(tmp_path / "big" / "val.bin", dtype=np.uint32).tolist()
    )


def test_default_dataset_is_built_once_and_reused(cache_dir):
    path = default_dataset_dir(cache_dir, 8.0, 0.05)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["vocab_size"] == 4096 and meta["train_tokens"] > 1_000_000 and meta["val_tokens"] > 50_000
    stamp = (path / "train.bin").stat().st_mtime_ns
    assert default_dataset_dir(cache_dir, 8.0, 0.05) == path
    assert (path / "train.bin").stat().st_mtime_ns == stamp


def test_prepare_data_cli(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"f{i}.txt").write_text(f"line {i} " * 50)
    out = tmp_path / "tokens"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "prepare_data.py"),
            "--train-tokenizer",
            "260",
            "--out",
            str(out),
            "--val-fraction",
            "0.2",
            "--no-progress",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train and" in proc.stdout
    # the rest in-process (prepare_data.py's main; the call above ran the script as its own process)
    # and with the tokenizer it wrote, as any HF tokenizer.json would be used
    out2 = tmp_path / "tokens2"
    proc = run_cli(
        "prepare_data.py",
        [
            "--tokenizer",
            str(out / "tokenizer.json"),
            "--out",
            str(out2),
            "--val-fraction",
            "0.2",
            "--no-progress",
            str(corpus),
        ],
    )
    assert proc.returncode == 0, proc.stderr
    assert (out2 / "train.bin").read_bytes() + (out2 / "val.bin").read_bytes()
    bad = run_cli(
        "prepare_data.py",
        [
            "--tokenizer",
            "/nope.json",
            "--out",
            str(tmp_path / "x"),
            str(corpus),
        ],
    )
    assert bad.returncode == 2 and "--tokenizer /nope.json: no such file" in bad.stderr
    tiny = run_cli(
        "prepare_data.py",
        [
            "--tokenizer",
            str(out / "tokenizer.json"),
            "--out",
            str(tmp_path / "y"),
            "--no-progress",
            str(corpus / "f1.txt"),
        ],
    )
    assert tiny.returncode == 2 and "give more documents or change val_fraction" in tiny.stderr
    # files that are not UTF-8 are reported by name (their bad bytes become U+FFFD), an empty folder is named
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 20)
    mixed = run_cli(
        "prepare_data.py",
        [
            "--tokenizer",
            str(out / "tokenizer.json"),
            "--out",
            str(tmp_path / "z"),
            "--val-fraction",
            "0.2",
            "--no-progress",
            str(corpus),
        ],
    )
    assert mixed.returncode == 0, mixed.stderr
    assert "note: 1 file(s) are not valid UTF-8" in mixed.stderr and "latin1.txt (40 byte sequences)" in mixed.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    none = run_cli(
        "prepare_data.py",
        [
            "--train-tokenizer",
            "260",
            "--out",
            str(tmp_path / "e"),
            str(empty),
        ],
    )
    assert none.returncode == 2 and f"no text files in {empty}" in none.stderr and "split left" not in none.stderr


def test_checkpoint_checksum_benchmark_runs(tmp_path):
    """launch/bench_checkpoint.py (docs/checkpoints.md), shrunk to 16 MB."""
    import json

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "bench_checkpoint.py"),
            "--size-mb",
            "16",
            "--dir",
            str(tmp_path / "c"),
            "--repeats",
            "1",
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    row = json.loads((tmp_path / "r.json").read_text())[0]
    assert row["bytes"] >= 16 * 2**20 and row["seal_s"] > 0 and row["verify_s"] > 0
    assert "seal / write" in proc.stdout
