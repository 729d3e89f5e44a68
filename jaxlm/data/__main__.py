"""`python -m jaxlm.data`: train a tokenizer and prepare tokenized shards.

    python -m jaxlm.data tokenizer --input PATH... --vocab-size N --out FILE.model
    python -m jaxlm.data prepare --input PATH... --tokenizer FILE.model --out DIR [--val-fraction F]

Inputs are text files (one document each), directories (read recursively), globs, or JSONL files
(one document per line; --jsonl-field names the text field). Train on the result with
`python -m jaxlm.train data.source=DIR`.
"""

import logging
import pathlib
import sys

from jaxlm import cli
from jaxlm.data import corpus, prepare, tokenizer
from jaxlm.domain import fraction

log = logging.getLogger("jaxlm")


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.data", description=__doc__.split("\n")[0])
    commands = p.add_subparsers(dest="command", required=True)

    def inputs(sub):
        sub.add_argument(
            "--input",
            nargs="+",
            required=True,
            metavar="PATH",
            help="text files, directories, globs or .jsonl files",
        )
        sub.add_argument("--jsonl-field", default="text", help="the text field of JSONL records")

    tok = commands.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer")
    inputs(tok)
    tok.add_argument("--vocab-size", type=cli.COUNT, required=True, help="tokens in the vocabulary")
    tok.add_argument(
        "--out",
        type=pathlib.Path,
        required=True,
        metavar="FILE.model",
        help="the SentencePiece model to write (FILE.vocab goes beside it)",
    )
    tok.add_argument(
        "--max-sentences",
        type=cli.COUNT,
        default=2_000_000,
        help="train on a sample of at most this many text chunks",
    )

    prep = commands.add_parser("prepare", help="tokenize documents into shards")
    inputs(prep)
    prep.add_argument(
        "--tokenizer",
        type=pathlib.Path,
        required=True,
        metavar="FILE.model",
        help="the SentencePiece model to tokenize with (python -m jaxlm.data tokenizer)",
    )
    prep.add_argument(
        "--out",
        type=pathlib.Path,
        required=True,
        metavar="DIR",
        help="the prepared directory to write: shards, index and manifest (data.source=DIR)",
    )
    prep.add_argument(
        "--val-fraction",
        type=cli.in_domain(float, fraction(high_open=True)),
        default=0.01,
        help="share of documents held out for validation (default 0.01)",
    )
    prep.add_argument(
        "--shard-tokens",
        type=cli.COUNT,
        default=prepare.SHARD_TOKENS,
        help="tokens per shard (a shard closes at the next document end)",
    )
    prep.add_argument("--workers", type=cli.COUNT, help="tokenizing processes (default: all cores)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cli.check_writable(args.out, "--out", directory=args.command == "prepare")
        inputs = corpus.resolve_inputs(args.input, args.jsonl_field)
        if args.command == "tokenizer":
            tokenizer.train(
                inputs.documents(), args.vocab_size, args.out, max_sentences=args.max_sentences
            )
            log.info("wrote %s (%d pieces)", args.out, args.vocab_size)
        else:
            prepare.prepare(
                inputs,
                args.tokenizer,
                args.out,
                val_fraction=args.val_fraction,
                shard_tokens=args.shard_tokens,
                workers=args.workers,
            )

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
