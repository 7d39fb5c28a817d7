"""`neox-data`: make training data. Subcommands: tokenize (Ray), train-tokenizer, stats."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neox-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenize", help="raw text / JSONL -> memory-mapped token shards (Ray Data)")
    tok.add_argument("inputs", nargs="+", help="files or directories (.jsonl: one document per line)")
    tok.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer.json")
    tok.add_argument("--output", required=True, help="shard directory to write")
    tok.add_argument("--shards", type=int, default=8, help="number of shards (= parallel tasks)")
    tok.add_argument("--text-key", default="text", help="JSONL field holding the text")
    tok.add_argument("--glob", default="**/*", help="which files of an input directory to read")
    tok.add_argument("--address", default=None, help="Ray cluster address (default: local Ray)")
    tok.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    tok.add_argument("--no-progress", action="store_true")

    train = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json on local files")
    train.add_argument("inputs", nargs="+")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True)
    train.add_argument("--glob", default="**/*")
    train.add_argument("--text-key", default="text")

    stats = sub.add_parser("stats", help="tokens, documents and unigram entropy of a shard directory")
    stats.add_argument("directory")

    args = parser.parse_args(argv)
    try:
        if args.command == "tokenize":
            from neox_runtime.data.preprocess import preprocess

            r = preprocess(args.inputs, args.tokenizer, args.output, num_shards=args.shards, text_key=args.text_key,
                           glob=args.glob, address=args.address, num_cpus=args.num_cpus,
                           progress=not args.no_progress)
            print(f"wrote {r.shards} shards, {r.documents} documents, {r.tokens:,} tokens to {r.output} "
                  f"in {r.seconds:.1f}s ({r.tokens_per_sec:,.0f} tokens/s)")
        elif args.command == "train-tokenizer":
            from neox_runtime.data.preprocess import train_tokenizer

            print(f"wrote {train_tokenizer(args.inputs, args.vocab_size, args.output, args.glob, args.text_key)}")
        else:
            from neox_runtime.data.shards import TokenShards

            shards = TokenShards(args.directory)
            documents = sum(s["documents"] for s in shards.manifest["shards"])
            print(json.dumps({"tokens": shards.total_tokens, "documents": documents,
                              "vocab_size": shards.vocab_size, "unigram_entropy": shards.unigram_entropy()}))
    except ValueError as e:
        print(f"neox-data: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
