"""Turn local text files into memory-mapped token files for `data.source=tokens`.

    python launch/prepare_data.py --tokenizer path/to/tokenizer.json --out data/mycorpus docs/ notes.txt

Any Hugging Face `tokenizer.json` works (for a Llama-3 tokenizer, the one in the model's directory);
the token dtype is uint16 when the vocabulary fits, else uint32. Each file is one document, followed by
the EOS token; documents are split into train/validation by a hash of their path. With
`--train-tokenizer N` a byte-level BPE of N tokens is trained on the same files instead; `--tokenizer default` uses
the default dataset's (the tokens a model pretrained on `data.source=default` reads: docs/finetune.md).
"""

import argparse
import sys
from pathlib import Path

from trainer.data import EOS, text_documents, train_tokenizer, write_token_files


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="text files or directories (read recursively)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokenizer", help="a Hugging Face tokenizer.json, or `default`: the default dataset's")
    src.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a byte-level BPE of this size")
    p.add_argument("--eos", default=None, help=f"the end-of-document token (default: {EOS}, or the tokenizer's)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    for path in a.inputs:
        if not Path(path).exists():
            p.error(f"input {path}: no such file or directory")
    if not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction={a.val_fraction} must be in (0, 1)")
    from tokenizers import Tokenizer

    if a.tokenizer == "default":  # the default dataset's (data.source=default): a model pretrained on it reads these
        from trainer.config import DataConfig
        from trainer.data import default_dataset_dir

        d = DataConfig()
        a.tokenizer = str(default_dataset_dir(d.cache_dir, d.default_corpus_mb, d.val_fraction) / "tokenizer.json")
    if a.tokenizer:
        if not Path(a.tokenizer).is_file():
            p.error(f"--tokenizer {a.tokenizer}: no such file")
        tok = Tokenizer.from_file(a.tokenizer)
    else:
        try:
            tok = train_tokenizer((t for _, t in text_documents(a.inputs)), a.train_tokenizer)
        except ValueError as e:
            p.error(str(e))
    eos = a.eos or next((t for t in (EOS, "</s>", "<|end_of_text|>") if tok.token_to_id(t) is not None), None)
    if eos is None or tok.token_to_id(eos) is None:
        p.error(f"the tokenizer has no end-of-document token; name one with --eos (tried {EOS}, </s>, <|end_of_text|>)")
    undecodable: list[tuple[str, int]] = []
    try:
        meta = write_token_files(
            text_documents(a.inputs, undecodable),
            tok,
            Path(a.out),
            val_fraction=a.val_fraction,
            description=f"prepare_data.py {' '.join(a.inputs)}",
            progress=not a.no_progress,
            eos=eos,
        )
    except ValueError as e:
        p.error(str(e))
    print(
        f"wrote {a.out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
        f"({meta['dtype']}, vocab {meta['vocab_size']:,})"
    )
    if undecodable:
        shown = ", ".join(f"{path} ({n} byte sequence{'s' * (n != 1)})" for path, n in undecodable[:10])
        more = f" and {len(undecodable) - 10} more" if len(undecodable) > 10 else ""
        print(
            f"note: {len(undecodable)} file(s) are not valid UTF-8; their undecodable bytes became U+FFFD: "
            f"{shown}{more}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
