"""Chat data (trainer/chat.py): the assistant mask under templates with and without generation markers, the
refusals, the file formats, the cache, the loss on assistant tokens only, and the cursor across a world-size change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from omegaconf import OmegaConf

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from models.loss import IGNORE_INDEX, UNTRAINED, inputs_and_targets, trained_targets  # noqa: E402
from trainer.chat import (  # noqa: E402
    ChatDataError,
    ChatSource,
    assistant_mask,
    has_markers,
    load_tokenizer,
    prepare,
)
from trainer.data import BatchLoader, train_tokenizer  # noqa: E402
from trainer.stdlib_chat import TEMPLATE_MARKED, TEMPLATE_PLAIN, write_tokenizer_dir  # noqa: E402

CONVERSATION = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Add two numbers."},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    {"role": "user", "content": "Now subtract them."},
    {"role": "assistant", "content": "def sub(a, b):\n    return a - b"},
    {"role": "user", "content": "And multiply."},
    {"role": "assistant", "content": "def mul(a, b):\n    return a * b"},
]
TEXT = [m["content"] for m in CONVERSATION] * 20 + ["<|user|> <|assistant|> <|system|> <|end|>"] * 20


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    """A small byte-level BPE trained here on the conversation's words (nothing downloaded)."""
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_tokenizer(TEXT, 300).save(str(path))
    return path


def _tokenizer_dir(tokenizer_json: Path, out: Path, template: str) -> Path:
    write_tokenizer_dir(tokenizer_json, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return out


def _decoded_spans(tok, ids, mask) -> list[str]:
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


def test_every_assistant_turn_is_trained_under_templates_with_and_without_generation_markers(tokenizer_json, tmp_path):
    """The markers' mask (transformers) and the prefix rule give the same mask: each of the three assistant turns'
    content and end marker, nothing of the system or user turns."""
    masks = {}
    for name, template in (("marked", TEMPLATE_MARKED), ("plain", TEMPLATE_PLAIN)):
        tok = load_tokenizer(str(_tokenizer_dir(tokenizer_json, tmp_path / name, template)))
        assert has_markers(tok) == (name == "marked")
        ids, mask = assistant_mask(tok, CONVERSATION, markers=has_markers(tok), where="test")
        want = [m["content"] + "<|end|>\n" for m in CONVERSATION if m["role"] == "assistant"]
        assert _decoded_spans(tok, ids, mask) == want, name
        masks[name] = (ids, mask)
    assert masks["marked"] == masks["plain"]


def test_a_template_marking_only_the_last_turn_and_one_without_prefixes_are_refused(tokenizer_json, tmp_path):
    only_last = (  # (the bug others shipped: the markers inside the last turn's branch only)
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}<|assistant|>\n{% generation %}"
        "{{ m['content'] }}<|end|>\n{% endgeneration %}{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
        "{% endif %}{% endfor %}"
    )
    tok = load_tokenizer(str(_tokenizer_dir(tokenizer_json, tmp_path / "last", only_last)))
    with pytest.raises(ChatDataError, match="cover 1 of its 3 assistant turns"):
        assistant_mask(tok, CONVERSATION, markers=True, where="test")
    # a template that renders the turn count first: no prefix of the conversation renders as a prefix of the whole
    counted = "{{ messages | length }}\n" + TEMPLATE_PLAIN
    tok = load_tokenizer(str(_tokenizer_dir(tokenizer_json, tmp_path / "counted", counted)))
    with pytest.raises(ChatDataError, match="does not render the conversation up to assistant turn 2 as a prefix"):
        assistant_mask(tok, CONVERSATION, markers=False, where="test")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cfg(path, tok, cache, *, val_path=None, val_fraction=0.05, **fields):
    """The data section prepare() reads (the field names at their defaults unless given)."""
    data = {"messages_field": "messages", "prompt_field": "prompt", "response_field": "response"}
    data |= {"system_prompt": None, **fields}
    data |= {"path": str(path), "val_path": val_path and str(val_path), "val_fraction": val_fraction}
    return OmegaConf.create({"data": {**data, "tokenizer": str(tok), "cache_dir": str(cache)}})


def _train(args: list[str]):
    return run_cli("train.py", ["recipe=llama_debug", "model.vocab_size=512", "training.seq_len=64", *args])


@pytest.mark.parametrize(
    "template, records, message",
    [
        # every token inside the generation block: the prompts would train too
        (
            "{% generation %}" + TEMPLATE_PLAIN + "{% endgeneration %}",
            [{"messages": CONVERSATION[1:3]}],
            "every token is marked as the assistant's",
        ),
        # no assistant turn at all: nothing would train
        (TEMPLATE_MARKED, [{"messages": CONVERSATION[:2]}], "no token of any conversation is an assistant token"),
    ],
    ids=["all_ones", "all_zeros"],
)
def test_an_all_ones_or_all_zeros_mask_is_refused_before_anything_is_written(
    tokenizer_json, tmp_path, template, records, message
):
    tok = _tokenizer_dir(tokenizer_json, tmp_path / "tok", template)
    data = _write_jsonl(tmp_path / "train.jsonl", records * 8)
    cache, run = tmp_path / "cache", tmp_path / "run"
    common = [f"data.tokenizer={tok}", f"data.cache_dir={cache}", f"run_dir={run}"]
    proc = _train(["data.source=chat", f"data.path={data}", f"data.val_path={data}", *common])
    assert proc.returncode == 2 and "invalid config" in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr and "e.g. [{" in proc.stderr, proc.stderr  # the setting, and an example
    assert not run.exists() and not [p for p in cache.iterdir() if not p.name.startswith(".")]


def test_files_in_every_format_with_named_fields_and_a_system_prompt(tokenizer_json, tmp_path):
    """prompt/response records under other names, from JSONL, Parquet and Arrow (a folder), with the system prompt
    put first: the three formats give the same tokens, and the system prompt is not trained."""
    import datasets

    tok = _tokenizer_dir(tokenizer_json, tmp_path / "tok", TEMPLATE_MARKED)
    records = [{"q": f"Add {i} and {i + 1}.", "a": f"return {i} + {i + 1}"} for i in range(40)]
    roots = {}
    for kind in ("jsonl", "parquet", "arrow"):
        folder = tmp_path / kind
        folder.mkdir()
        ds = datasets.Dataset.from_list(records)
        if kind == "jsonl":
            _write_jsonl(folder / "part.jsonl", records)
        elif kind == "parquet":
            ds.to_parquet(str(folder / "part.parquet"))
        else:
            import pyarrow as pa

            with pa.OSFile(str(folder / "part.arrow"), "wb") as sink, pa.ipc.new_stream(sink, ds.data.schema) as w:
                w.write_table(ds.data.table)
        fields = {"prompt_field": "q", "response_field": "a", "system_prompt": "Be brief."}
        cfg = _cfg(folder, tok, tmp_path / "cache", val_fraction=0.25, **fields)
        roots[kind] = prepare(cfg)
    sources = {k: ChatSource(r, "train", 64) for k, r in roots.items()}
    first = sources["jsonl"]
    assert first.num_samples + ChatSource(roots["jsonl"], "val", 64).num_samples == 40
    for other in sources.values():
        assert np.array_equal(
            np.stack([other[i] for i in range(other.num_samples)]),
            np.stack([first[i] for i in range(first.num_samples)]),
        )
    t = load_tokenizer(str(tok))
    sample = first[0]
    ids = sample & (UNTRAINED - 1)
    text = t.decode(ids[ids != t.pad_token_id].tolist())
    assert text.startswith("<|system|>\nBe brief.<|end|>\n<|user|>\nAdd ")
    trained = t.decode(ids[sample < UNTRAINED].tolist())
    assert trained.startswith("return ") and trained.endswith("<|end|>\n") and "Be brief" not in trained


def test_the_cache_is_built_once_and_follows_the_files_content(tokenizer_json, tmp_path):
    tok = _tokenizer_dir(tokenizer_json, tmp_path / "tok", TEMPLATE_PLAIN)
    data = _write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}] * 10)
    cfg = _cfg(data, tok, tmp_path / "cache", val_path=data)
    root = prepare(cfg)
    stamp = (root / "train" / "tokens.bin").stat().st_mtime_ns
    assert prepare(cfg) == root and (root / "train" / "tokens.bin").stat().st_mtime_ns == stamp
    _write_jsonl(data, [{"messages": CONVERSATION[:3]}] * 10)
    assert prepare(cfg) != root


@pytest.fixture(scope="module")
def chat_root(tokenizer_json, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chat")
    tok = _tokenizer_dir(tokenizer_json, tmp / "tok", TEMPLATE_MARKED)
    records = [{"messages": CONVERSATION[: 3 + 2 * (i % 3)]} for i in range(60)]
    data = _write_jsonl(tmp / "train.jsonl", records)
    return prepare(_cfg(data, tok, tmp / "cache", val_path=data))


def test_the_loss_counts_the_assistant_tokens_only(chat_root):
    """A chat batch's targets are its assistant tokens (every other target IGNORE_INDEX), and the loss over them is
    what cross-entropy on those alone gives; without the mask (every target trained) it differs."""
    src = ChatSource(chat_root, "train", 64)
    batch = torch.from_numpy(np.stack([src[i] for i in range(6)]))
    inputs, targets = inputs_and_targets(batch)
    assert inputs.max() < UNTRAINED and trained_targets(batch) == (targets != IGNORE_INDEX).sum() > 0
    mask = torch.from_numpy(np.stack([src.mask[src.offsets[c] : src.offsets[c] + 65] for c in src.index[:6]]))
    assert torch.equal(targets != IGNORE_INDEX, mask[:, 1:].bool())
    logits = torch.randn(*targets.shape, 512, generator=torch.Generator().manual_seed(0))
    got = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits[keep], targets[keep]))
    everything = inputs_and_targets(batch & (UNTRAINED - 1))[1]  # (the flags dropped: every target trained)
    assert not torch.allclose(got, torch.nn.functional.cross_entropy(logits.flatten(0, 1), everything.flatten()))


@pytest.mark.parametrize("pack", [False, True], ids=["alone", "packed"])
def test_every_conversation_is_seen_once_across_a_world_size_change(chat_root, pack):
    """The chat source under the same cursor as the token files: 1 rank for 3 steps, then its state resumed on 2
    ranks: over an epoch every conversation comes exactly once (packed: every sequence, and each conversation is in
    exactly one of them)."""
    src = ChatSource(chat_root, "train", 512, pack=pack)
    if pack:
        held = sorted(int(j) for w in src.windows for j in w)
        assert held == list(range(len(src.index))) and src.num_samples < len(src.index) / 2
    n, batch = src.num_samples, 4
    one = BatchLoader(src, global_batch=batch, micro_batch=2, dp_rank=0, dp_size=1, seed=3, shuffle=True)
    seen = [one.next_batch()[1].flatten() for _ in range(3)]
    state = one.state_dict()
    two = [
        BatchLoader(src, global_batch=batch, micro_batch=2, dp_rank=r, dp_size=2, seed=3, shuffle=True) for r in (0, 1)
    ]
    for loader in two:
        loader.load_state_dict(state)
    while sum(len(s) for s in seen) < n - n % batch:
        seen += [loader.next_batch()[1].flatten() for loader in two]
    ids = torch.cat(seen)[: n - n % batch].tolist()
    assert len(ids) == len(set(ids)) and set(ids) <= set(range(n))


def test_a_packed_sequence_holds_its_conversations_as_they_are_alone(chat_root):
    """data.pack: each conversation of a packed sequence is its own document, holding exactly the tokens (and the
    untrained flags) of the conversation alone; the padding after them is one more document, untrained; a target
    never crosses from one conversation into the next."""
    from models.loss import DOCUMENT_SHIFT, documents_of

    alone, packed = ChatSource(chat_root, "train", 512), ChatSource(chat_root, "train", 512, pack=True)
    for i in range(4):
        window = torch.from_numpy(packed[i])
        documents = window >> DOCUMENT_SHIFT
        conversations = packed.windows[i]
        assert documents.unique().tolist() == list(range(len(conversations) + 1)) and len(conversations) > 1
        assert torch.equal(documents_of(window[None])[0], documents[:-1])
        for d, j in enumerate(conversations):
            own = window[documents == d] & ((1 << DOCUMENT_SHIFT) - 1)
            assert torch.equal(own, torch.from_numpy(alone[int(j)])[: len(own)])
        assert (window[documents == len(conversations)] & ((1 << DOCUMENT_SHIFT) - 1) >= UNTRAINED).all()
        targets = inputs_and_targets(window[None])[1][0]
        starts = (documents[1:] != documents[:-1]).nonzero().flatten()
        assert (targets[starts] == IGNORE_INDEX).all()
        n_alone = sum(int(trained_targets(torch.from_numpy(alone[int(j)])[None])) for j in conversations)
        assert trained_targets(window[None]) == n_alone > 0


def test_samples_are_the_models_greedy_completions_and_reach_every_sink(tmp_path):
    """training.samples_every: at step 0 (the seed's weights) each completion is the greedy decoding that the test
    computes itself from the same prompt with a model built from the seed; TP over 2 ranks writes the same ones; the
    samples are printed, in metrics.jsonl and in W&B's offline run as a table, read back. The share of trained tokens
    is logged at the start."""
    from helpers import read_jsonl, read_wandb_records, run_train, wandb_history

    from models.args import model_args_of
    from models.llama import build_model
    from trainer.chat import ChatSource, held_out_prompts, load_tokenizer, open_chat_sources, with_defaults
    from trainer.config import load_config

    args = ["recipe=llama_debug_chat", "training.seq_len=128", "training.steps=2", "optim.warmup_steps=1"]
    args += ["training.val_every=0", "training.val_batches=1", "training.precision=fp32", "training.samples_every=2"]
    args += ["training.sample_prompts=2", "training.sample_tokens=12", "logging.tensorboard=false"]
    runs = {}
    for nproc, extra in ((1, ["logging.wandb.mode=offline"]), (2, ["parallel.tp=2", "logging.wandb.mode=disabled"])):
        run = tmp_path / f"run{nproc}"
        proc = run_train([*args, *extra, f"run_dir={run}"], nproc=nproc)
        assert "sample 1 at step 0:" in proc.stdout and "sample 2 at step 2:" in proc.stdout
        runs[nproc] = [(r["step"], r["samples"]) for r in read_jsonl(run / "metrics.jsonl") if "samples" in r]
    assert [step for step, _ in runs[1]] == [0, 2] and runs[1] == runs[2]
    share = [
        r["data/trained_fraction"]
        for r in read_jsonl(tmp_path / "run1" / "metrics.jsonl")
        if "data/trained_fraction" in r
    ]
    assert len(share) == 1 and 0.3 < share[0] < 0.9  # (logged once, at the start: the assistant tokens' share)

    cfg = load_config(args)
    val = open_chat_sources(cfg, 128)[1]
    assert isinstance(val, ChatSource)
    (prompt, _), *_ = held_out_prompts(val, 2)[0]
    model = build_model(model_args_of(cfg), device="cpu").eval()
    model.init_weights(seed=cfg.training.seed)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    tok = load_tokenizer(with_defaults(cfg).data.tokenizer)
    assert runs[1][0][1][0]["completion"] == tok.decode(ids[len(prompt) :])
    # the comparison can fail: the next token read one position early (the off-by-one a decoder can make) differs
    early = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            early.append(int(model(torch.tensor([early]))[0, -2].argmax()))
    assert runs[1][0][1][0]["completion"] != tok.decode(early[len(prompt) :])

    (wandb_file,) = (tmp_path / "run1" / "wandb").glob("offline-run-*/run-*.wandb")
    tables = [h for h in wandb_history(read_wandb_records(wandb_file)) if "samples/_type" in h]
    assert [h["train/step"] for h in tables] == [0, 2] and tables[-1]["samples/_type"] == "table-file"
    logged = json.loads((wandb_file.parent / "files" / tables[-1]["samples/path"]).read_text())
    assert logged["columns"] == ["step", "prompt", "completion", "reference"] and len(logged["data"]) == 4
    assert [row[2] for row in logged["data"][2:]] == [s["completion"] for s in runs[1][1][1]]
