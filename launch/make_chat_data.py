"""Write the standard library's chat set (trainer/stdlib_chat.py: each documented function's docstring asks, its code
answers) as files, and an HF tokenizer directory with a chat template:

    python launch/make_chat_data.py --out data/stdlib-chat [--max-mb 8] [--val-fraction 0.05]
        [--tokenizer default|TOKENIZER_JSON --tokenizer-out DIR [--template marked|plain]]

Writes OUT/train.jsonl and OUT/val.jsonl, one {"messages": [{"role", "content"}, ...], "source": "module:name"} per
line (the format `data.source=chat` reads, docs/data.md). `--tokenizer-out DIR` writes the given tokenizer.json
(`default`: the default dataset's, which a model pretrained on `data.source=default` reads) with a
tokenizer_config.json holding trainer/stdlib_chat.py's chat template (`marked`: with generation markers; `plain`:
the same format without them). `data.source=chat` with neither `data.path` nor `data.tokenizer` trains on the same
set without this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.stdlib_chat import build, write_tokenizer_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the directory to write train.jsonl and val.jsonl into")
    p.add_argument("--max-mb", type=float, default=8.0, help="standard-library source to read (MiB, sorted by path)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of modules held out for validation")
    p.add_argument("--tokenizer", help="a tokenizer.json for --tokenizer-out, or `default`: the default dataset's")
    p.add_argument("--tokenizer-out", help="write an HF tokenizer directory with a chat template here")
    p.add_argument("--template", choices=("marked", "plain"), default="marked", help="with generation markers or not")
    a = p.parse_args(argv)
    if not 0 < a.val_fraction < 1:
        p.error(f"--val-fraction {a.val_fraction}: must be in (0, 1)")
    if a.max_mb <= 0:
        p.error(f"--max-mb {a.max_mb}: must be > 0")
    if bool(a.tokenizer) != bool(a.tokenizer_out):
        p.error("--tokenizer and --tokenizer-out go together: the tokenizer.json to use and the directory to write")
    if a.tokenizer and a.tokenizer != "default" and not Path(a.tokenizer).is_file():
        p.error(f"--tokenizer {a.tokenizer}: no such file (a tokenizer.json, or `default`)")
    counts = build(Path(a.out), a.max_mb, a.val_fraction)
    print(f"{a.out}: {counts['train']:,} training and {counts['val']:,} validation conversations")
    if a.tokenizer:
        source = Path(a.tokenizer)
        if a.tokenizer == "default":
            from trainer.config import load_config
            from trainer.data import default_dataset_dir

            d = load_config(["recipe=llama_debug"]).data
            source = default_dataset_dir(d.cache_dir, d.default_corpus_mb, d.val_fraction) / "tokenizer.json"
        write_tokenizer_dir(source, Path(a.tokenizer_out), marked=a.template == "marked")
        print(f"{a.tokenizer_out}: tokenizer.json and tokenizer_config.json ({a.template} chat template)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
