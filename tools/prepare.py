#!/usr/bin/env python
"""Tokenize documents (or generations) once into a token store.

    python tools/prepare.py --input real/ --tokenizer tok/tokenizer.json --out stores/real
    python tools/prepare.py --generations --input gen/rephrase --tokenizer tok/ --out stores/rephrase
    python tools/prepare.py --verify stores/real      # every block against the checksums in its manifest

Bad input is a one-line error and exit code 2; the output directory is only created on success.
"""

from __future__ import annotations

import argparse
import sys

from megadoc_pl.data.store import TokenStore
from megadoc_pl.data.store_build import build_store, default_num_proc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--verify", metavar="DIR", help="check an existing token store's files against its manifest and exit")
    p.add_argument("--input", nargs="+", metavar="PATH", help="JSONL(.gz/.zst) / Parquet files or directories")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or a tokenizer directory")
    p.add_argument("--out", metavar="DIR", help="token store directory to write")
    p.add_argument("--text-field", default="text", help="text field of a document row (dotted for nested, e.g. meta.raw_text)")
    p.add_argument("--id-field", default="id", help="id field of a document row (missing ids are derived from the text)")
    p.add_argument("--generations", action="store_true", help="inputs are generations (generation rows or MAGACorpus rows; docs/data-ingest.md)")
    p.add_argument("--no-bos", action="store_true", help="do not prepend BOS to each document")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS to each document")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count bad rows instead of stopping")
    p.add_argument("--rebuild", action="store_true", help="rebuild an existing store whose inputs or settings differ")
    p.add_argument("--num-proc", type=int, default=default_num_proc(), help="tokenizer processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.verify is None and not (args.input and args.tokenizer and args.out):
        p.error("--input, --tokenizer and --out are required (or --verify DIR)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.verify is not None:
        return verify(args.verify)
    try:
        store = build_store(
            args.input,
            args.tokenizer,
            args.out,
            kind="generations" if args.generations else "documents",
            text_field=args.text_field,
            id_field=args.id_field,
            add_bos=not args.no_bos,
            add_eos=not args.no_eos,
            skip_bad_rows=args.skip_bad_rows,
            rebuild=args.rebuild,
            num_proc=args.num_proc,
            progress=not args.quiet,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = store.manifest
    skipped = f", skipped {m['bad_rows']} bad rows {m['bad_rows_by_kind']}" if m["bad_rows"] else ""
    print(f"{store.path}: {m['num_documents']} {m['kind']}, {m['num_tokens']} tokens ({m['dtype']}){skipped}")
    return 0


def verify(path: str) -> int:
    """``--verify DIR``: 0 when every block matches its checksum, else one line and exit code 2."""
    try:
        checked = TokenStore.open(path).verify()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: {checked} bytes match their checksums")
    return 0


if __name__ == "__main__":
    sys.exit(main())
