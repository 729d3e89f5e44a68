"""What a compiled step does, read from XLA's optimised HLO: matmul FLOPs and collective bytes.

XLA's own `cost_analysis()` counts the body of a while loop once, however many times it runs,
and jaxlm's steps are loops (layers, gradient accumulation, pipeline ticks): its FLOPs for a
24-layer model are barely those of one layer. Here every computation is weighted by how often
it runs: a while body by the trip count XLA proved (`known_trip_count`), fusions and calls by
their callers. Counted per device (the HLO is the partitioned, per-device program):

- FLOPs of `dot` instructions: 2 x output elements x contracted size (elementwise work is small
  next to the matmuls and left out);
- bytes of collectives as each device sends them, roughly: all-reduce 2x its result (a ring
  reduce-scatter then all-gather), all-gather its result, reduce-scatter its operand,
  collective-permute and all-to-all their result.
"""

import collections
import dataclasses
import math
import re

_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_CALLEES = re.compile(r"\b(calls|body|to_apply|true_computation|false_computation)=%([^,\s)]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([0-9,]*)\}")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


@dataclasses.dataclass
class HloCounts:
    flops: float  # matmul FLOPs per device per step
    collective_bytes: dict[str, float]  # per device per step, by collective
    unknown_loops: int  # while loops without a proven trip count (counted once)


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (dt, tuple(int(d) for d in dims.split(",") if d))
        for dt, dims in _ARRAY.findall(type_text)
        if dt in _BYTES
    ]


def _nbytes(type_text: str) -> int:
    return sum(_BYTES[dt] * math.prod(dims) for dt, dims in _arrays(type_text))


def _split_instruction(rest: str) -> tuple[str, str, str]:
    """'TYPE op(operands), attributes' -> (TYPE, op, operands and attributes)."""
    if rest.startswith("("):  # a tuple type: up to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                type_text, rest = rest[: i + 1], rest[i + 2 :]
                break
    else:
        type_text, _, rest = rest.partition(" ")
    op, _, tail = rest.partition("(")
    return type_text, op, tail


def analyse(hlo_text: str) -> HloCounts:
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), [])
            if line.startswith("ENTRY"):
                entry = header.group(1)
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction and current is not None:
            current.append((instruction.group(1), *_split_instruction(line[instruction.end() :])))

    # How often each computation runs: callers' counts times the trip count for while bodies.
    runs: dict[str, float] = collections.defaultdict(float)
    unknown_loops = 0

    def visit(name: str, times: float) -> None:
        nonlocal unknown_loops
        runs[name] += times
        for _, _, op, tail in computations.get(name, ()):
            trips = 1
            if op == "while":
                found = _TRIP_COUNT.search(tail)
                trips = int(found.group(1)) if found else 1
                unknown_loops += not found
            for kind, callee in _CALLEES.findall(tail):
                if kind == "to_apply" and op != "call":
                    continue  # the scalar reducer of a reduce, scatter or sort
                visit(callee, times * (trips if kind == "body" else 1))
            for branches in _BRANCHES.findall(tail):
                for callee in re.findall(r"%([^,\s]+)", branches):
                    visit(callee, times)

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    visit(entry, 1.0)

    flops, moved = 0.0, collections.defaultdict(float)
    for name, times in runs.items():
        shapes = {n: t for n, t, _, _ in computations[name]}
        for _, type_text, op, tail in computations[name]:
            if op == "dot":
                out = _arrays(type_text)[0][1]
                lhs = _arrays(shapes.get(re.match(r"\s*%(\S+?)[,)]", tail).group(1), ""))
                dims = _CONTRACTING.search(tail)
                contracted = (
                    math.prod(lhs[0][1][int(d)] for d in dims.group(1).split(",") if d)
                    if lhs and dims
                    else 1
                )
                flops += times * 2 * math.prod(out) * contracted
            base = op.removesuffix("-start")
            if base in COLLECTIVES and not op.endswith("-done"):
                if base == "reduce-scatter":
                    operand = re.match(r"\s*%(\S+?)[,)]", tail).group(1)
                    size = _nbytes(shapes.get(operand, ""))
                else:
                    arrays = _arrays(type_text)
                    size = max((_BYTES[dt] * math.prod(d) for dt, d in arrays), default=0)
                moved[base] += times * size * (2 if base == "all-reduce" else 1)
    return HloCounts(flops, dict(moved), unknown_loops)
