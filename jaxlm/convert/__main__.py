"""`python -m jaxlm.convert`: Hugging Face checkpoints in and out.

    python -m jaxlm.convert from-hf HF_DIR --out RUN_DIR [--mesh SPEC]
    python -m jaxlm.convert to-hf RUN_DIR --out HF_DIR [--step N] [--mesh SPEC] [--dtype D]

from-hf reads a LlamaForCausalLM or GPT2LMHeadModel directory (config.json and .safetensors)
and writes a run directory whose checkpoint restores on any mesh: generate from it with
`python -m jaxlm.generate --run RUN_DIR`, evaluate it with `python -m jaxlm.eval`, fine-tune
it with `python -m jaxlm.train checkpoint.init_from=RUN_DIR`. to-hf writes config.json, the
weights and the SentencePiece tokenizer, for `AutoModelForCausalLM.from_pretrained(HF_DIR)`.
"""

import pathlib
import sys

from jaxlm import cli
from jaxlm.domain import at_least


def parse_args(argv):
    p = cli.Parser(prog="python -m jaxlm.convert", description=__doc__.split("\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    mesh_help = (
        "where the parameters live while they are converted: a mesh spec or preset "
        "(default fsdp=-1, split over all devices)"
    )

    into = commands.add_parser("from-hf", help="a Hugging Face directory -> a jaxlm run")
    into.add_argument(
        "hf_dir",
        type=pathlib.Path,
        metavar="HF_DIR",
        help="a Hugging Face model directory: config.json and *.safetensors",
    )
    into.add_argument(
        "--out",
        type=pathlib.Path,
        required=True,
        metavar="RUN_DIR",
        help="the run directory to create (config.yaml and a checkpoint of step 0)",
    )
    into.add_argument("--mesh", default="fsdp=-1", help=mesh_help)

    out = commands.add_parser("to-hf", help="a jaxlm run -> a Hugging Face directory")
    out.add_argument(
        "run_dir", type=pathlib.Path, metavar="RUN_DIR", help="a run of python -m jaxlm.train"
    )
    out.add_argument(
        "--out",
        type=pathlib.Path,
        required=True,
        metavar="HF_DIR",
        help="the Hugging Face directory to write: config.json and model.safetensors",
    )
    out.add_argument(
        "--step",
        type=cli.in_domain(int, at_least(0)),
        help="the checkpoint to export (default: the newest)",
    )
    out.add_argument("--mesh", default="fsdp=-1", help=mesh_help)
    out.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the written weights (default float32, as trained)",
    )
    for sub in (into, out):
        cli.add_cpu_devices(sub)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        cli.check_writable(args.out, "--out", directory=True)
        cli.use_cpu_devices(args.cpu_devices)
        if args.command == "from-hf":
            from jaxlm.convert import from_hf

            from_hf.convert(args.hf_dir, args.out, args.mesh)
        else:
            from jaxlm.convert import to_hf

            to_hf.convert(
                args.run_dir, args.out, step=args.step, mesh_spec=args.mesh, dtype=args.dtype
            )

    return cli.run_command(body)


if __name__ == "__main__":
    sys.exit(main())
