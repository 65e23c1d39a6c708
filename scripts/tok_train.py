"""Train the BPE tokenizer on the pretraining corpus and save it to $NANOCODE_BASE_DIR/tokenizer.

    python -m scripts.tok_train                      # 32768 tokens on up to 2 billion characters
    python -m scripts.tok_train --max-chars 50000000 --vocab-size 8192

Documents come from the training split (nanocode.dataset), each cut to --doc-cap characters so one
huge generated file cannot dominate the counts; training stops after --max-chars characters.

Why 32768 tokens by default: embedding and head hold 2 * vocab * width parameters. At depth 12
(width 768) that is 50M beside the blocks' 85M; nanochat's 65536 would make it 100M, more than the
model itself, for small models that cannot use a large vocab's rare tokens well. A power of two also
keeps the head's matmul tile-friendly.
"""

import argparse
import time

from nanocode.common import NanocodeError, get_base_dir, run_main
from nanocode.dataset import iter_documents, split_shards
from nanocode.report import log_stage
from nanocode.tokenizer import Tokenizer
from nanocode.training import posint

parser = argparse.ArgumentParser(description="train the tokenizer")
parser.add_argument("--max-chars", type=posint, default=2_000_000_000, help="stop after this many")
parser.add_argument("--doc-cap", type=posint, default=10_000, help="characters kept per document")
parser.add_argument("--vocab-size", type=int, default=32768, help="the 12 special tokens included")


def main():
    args = parser.parse_args()
    if args.vocab_size < 268:
        raise NanocodeError(
            "--vocab-size must be at least 268 (256 bytes + 12 special tokens), got "
            f"{args.vocab_size}"
        )
    try:
        split_shards("train")  # fail now, with the dataset's hint, rather than inside the trainer
    except NanocodeError as e:
        raise NanocodeError(f"no training data: {e}") from None

    stats = {"docs": 0, "chars": 0, "bytes": 0}

    def texts():
        """The train split's documents, each cut to --doc-cap characters, until --max-chars have
        been yielded (the document that crosses the limit is kept), counted into `stats` as the
        trainer reads them; surrogatepass: a lone surrogate in a document counts its bytes
        instead of raising."""
        for doc in iter_documents("train"):  # the val shard, bpb's held-out text, stays unseen
            text = doc["text"][: args.doc_cap]
            stats["docs"] += 1
            stats["chars"] += len(text)
            stats["bytes"] += len(text.encode("utf-8", errors="surrogatepass"))
            yield text
            if stats["chars"] >= args.max_chars:
                return

    t0 = time.perf_counter()
    tokenizer = Tokenizer.train(texts(), vocab_size=args.vocab_size)
    seconds = time.perf_counter() - t0
    out = tokenizer.save(get_base_dir() / "tokenizer")

    mb_per_s = stats["bytes"] / 1e6 / seconds
    print(
        f"trained on {stats['docs']:,} documents, {stats['chars']:,} characters "
        f"({stats['bytes'] / 1e6:.1f} MB) in {seconds:.1f}s: {mb_per_s:.1f} MB/s"
    )
    print(f"vocab size {tokenizer.vocab_size} (asked for {args.vocab_size}); saved to {out}")
    if tokenizer.vocab_size < args.vocab_size:
        print("note: the corpus ran out of pairs to merge before reaching the vocab size asked for")
    # code, and a 4-byte UTF-8 character that byte-level BPE may split over several tokens:
    # decode must still give back exactly the text
    sample = 'def hello(name):\n    return f"Hello, {name}!"  # 👋\n'
    ids = tokenizer.encode(sample)
    assert tokenizer.decode(ids) == sample, "round trip failed"
    pieces = [tokenizer.decode([i]) for i in ids]
    print(f"sample: {len(sample.encode())} bytes -> {len(ids)} tokens: {pieces}")
    logged = {f"train_{k}": v for k, v in stats.items()} | {"doc_cap": args.doc_cap}
    logged.update(train_seconds=round(seconds, 2), train_mb_per_s=round(mb_per_s, 2))
    log_stage("tokenizer", ["vocab_size"], vocab_size=tokenizer.vocab_size, **logged)


if __name__ == "__main__":
    run_main(main)
