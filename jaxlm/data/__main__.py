"""`python -m jaxlm.data`: train a tokenizer, prepare tokenized data, look into a source.

    python -m jaxlm.data tokenizer --input PATH... --vocab-size N --out FILE.model
    python -m jaxlm.data prepare --input PATH... --tokenizer FILE.model --out DIR [--val-fraction F]
    python -m jaxlm.data prepare --format megatron --input PATH... --tokenizer FILE --out PREFIX
    python -m jaxlm.data prepare --format chat --input CHATS.jsonl --tokenizer FILE --out DIR
        [--chat-template FILE]
    python -m jaxlm.data inspect SOURCE
    python -m jaxlm.data samples --source SOURCE --seq-len L --seed S --count N [--order megatron]
        [--split STR] --out FILE.npy

Inputs are text files (one document each), directories (read recursively), globs, or JSONL files
(one document per line; --jsonl-field names the text field). Train on the result with
`python -m jaxlm.train data.source=DIR` (or `data.source=megatron:PREFIX`; chat data with
`data.format=chat`: JSONL rows of {"messages": [{"role", "content"}, ...]}, rendered by a chat
template, only the assistant's tokens trained, jaxlm/data/chat.py). `samples` writes the
first N training samples, int32 [N, L + 1], as training would cut them, without JAX.
"""

import json
import logging
import pathlib
import sys

import numpy as np

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm.config import DataConfig
from jaxlm.data import chat, corpus, orders, prepare, sources, tokenizer
from jaxlm.domain import fraction
from jaxlm.errors import UsageError

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
        sub.add_argument(
            "--jsonl-field",
            default=None,
            help="the field of JSONL records (default: text; messages with --format chat)",
        )

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
    prep.add_argument(
        "--format",
        choices=("jaxlm", "megatron", "chat"),
        default="jaxlm",
        help="jaxlm: shards in DIR with a validation split; megatron: Megatron-LM's PREFIX.bin "
        "and PREFIX.idx (split at training time by data.split); chat: conversations rendered by "
        "a chat template, shards as jaxlm's with the untrained tokens marked (data.format=chat)",
    )
    prep.add_argument(
        "--chat-template",
        metavar="FILE",
        help="with --format chat: a Jinja template, or a Hugging Face tokenizer_config.json "
        "holding one (default: the built-in template, jaxlm/data/chat.py)",
    )

    look = commands.add_parser("inspect", help="documents, tokens, dtype and tokenizer of a source")
    look.add_argument("source", help="a prepared directory, megatron:PREFIX, or a blend")
    look.add_argument("--split", default=None, help="Megatron split string (data.split)")

    samp = commands.add_parser("samples", help="write the first N training samples as .npy")
    samp.add_argument("--source", required=True, help="as data.source (a blend in quotes)")
    samp.add_argument("--seq-len", type=cli.COUNT, required=True, help="as train.seq_len")
    samp.add_argument("--seed", type=int, default=0, help="as train.seed")
    samp.add_argument(
        "--count",
        type=cli.COUNT,
        required=True,
        help="samples to write; also the run's sample count, which Megatron's order depends on",
    )
    samp.add_argument(
        "--order",
        choices=("jaxlm", "megatron"),
        default="jaxlm",
        help="as data.order: jaxlm's packing, or Megatron GPTDataset's samples (default jaxlm)",
    )
    samp.add_argument("--split", default=None, help="Megatron split string (data.split)")
    samp.add_argument("--cache-dir", default=None, help="as data.cache_dir")
    samp.add_argument(
        "--out",
        type=pathlib.Path,
        required=True,
        metavar="FILE.npy",
        help="int32 [count, seq_len + 1]: each sample's inputs and, shifted by one, its targets "
        "(chat data: the ids of untrained tokens have bit 31 set, as stored)",
    )
    return p.parse_args(argv)


def data_config(args) -> DataConfig:
    """The `data` settings the arguments name, checked against their domains."""
    overrides = [f"data.source={args.source}"]
    for key in ("order", "split", "cache_dir"):
        if getattr(args, key, None) is not None:
            overrides.append(f"data.{key}={getattr(args, key)}")
    return config_lib.validate(config_lib.apply_overrides(config_lib.Config(), overrides)).data


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        if args.command == "inspect":
            for row in sources.describe(data_config(args)):
                print(json.dumps(row))
            return
        if args.command == "samples":
            cli.check_writable(args.out, "--out")
            data = data_config(args)
            found = sources.resolve(data, None, check_format=False)
            if found is None:
                raise UsageError("synthetic batches are made on the devices: name a real source")
            order = orders.make_order(
                found, "train", data, seq_len=args.seq_len, seed=args.seed, num_samples=args.count
            )
            if len(order) < args.count:
                raise UsageError(f"the source has {len(order):,} samples, fewer than --count")
            samples = np.stack([np.concatenate(order.window(i)) for i in range(args.count)])
            np.save(args.out, samples.astype(np.int32))
            log.info("wrote %d samples of %d tokens to %s", *samples.shape, args.out)
            return
        megatron = args.command == "prepare" and args.format == "megatron"
        cli.check_writable(args.out, "--out", directory=args.command == "prepare" and not megatron)
        chat_data = args.command == "prepare" and args.format == "chat"
        if args.command == "prepare" and args.chat_template and not chat_data:
            raise UsageError("--chat-template needs --format chat")
        field = args.jsonl_field or ("messages" if chat_data else "text")
        inputs = corpus.resolve_inputs(args.input, field)
        if megatron:
            prepare.prepare_megatron(inputs, args.tokenizer, args.out, workers=args.workers)
        elif args.command == "tokenizer":
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
                chat_template=chat.load_template(args.chat_template) if chat_data else None,
            )

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
