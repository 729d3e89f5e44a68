"""The PyTorch baseline: the same architecture and shapes as a jaxlm preset, trained with
torch.compile, SDPA flash attention, bf16 autocast and fused AdamW. Not part of the package.

    python benchmarks/torch_reference.py --config gpt-1.3b [--steps 20] [--warmup 3]
                                         [--no-compile] [key=value ...]

Reads the jaxlm config (the same presets and overrides as `python -m jaxlm.bench`), builds the
model from it (pre-norm blocks, RMSNorm or LayerNorm, rotary or learned positions, grouped-query
attention, SwiGLU or tanh-GeLU, tied or untied head, optional biases), trains `--steps` timed
steps on random tokens of one device's share of the batch, and prints one JSON object with
`tokens_per_s_per_device`, for `python -m jaxlm.bench --pytorch FILE`. Both run back to back on
the same GPU in benchmarks/gpu.sh.
"""

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from jaxlm import config as config_lib


class Norm(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.kind, self.eps = m.norm, m.norm_eps
        self.weight = nn.Parameter(torch.ones(m.d_model))
        self.bias = nn.Parameter(torch.zeros(m.d_model)) if m.norm == "layernorm" else None

    def forward(self, x):
        if self.kind == "layernorm":
            return F.layer_norm(x.float(), x.shape[-1:], self.weight, self.bias, self.eps).to(
                x.dtype
            )
        return F.rms_norm(x.float(), x.shape[-1:], self.weight, self.eps).to(x.dtype)


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, m):
        super().__init__()
        d, h = m.d_model, m.dim_per_head
        self.heads, self.kv_heads, self.head_dim = m.n_heads, m.kv_heads, h
        self.attn_norm, self.mlp_norm = Norm(m), Norm(m)
        self.q = nn.Linear(d, m.n_heads * h, bias=m.use_bias)
        self.k = nn.Linear(d, m.kv_heads * h, bias=m.use_bias)
        self.v = nn.Linear(d, m.kv_heads * h, bias=m.use_bias)
        self.o = nn.Linear(m.n_heads * h, d, bias=m.use_bias)
        self.swiglu = m.mlp == "swiglu"
        self.gate = nn.Linear(d, m.d_ff, bias=False) if self.swiglu else None
        self.up = nn.Linear(d, m.d_ff, bias=m.use_bias)
        self.down = nn.Linear(m.d_ff, d, bias=m.use_bias)

    def forward(self, x, rotary):
        B, L, _ = x.shape
        y = self.attn_norm(x)
        q = self.q(y).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(y).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(y).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads
        )
        x = x + self.o(out.transpose(1, 2).reshape(B, L, -1))
        y = self.mlp_norm(x)
        hidden = (
            F.silu(self.gate(y)) * self.up(y)
            if self.swiglu
            else F.gelu(self.up(y), approximate="tanh")
        )
        return x + self.down(hidden)


class Transformer(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
        self.embedding = nn.Embedding(m.vocab_size, m.d_model)
        self.positions = (
            nn.Embedding(m.max_seq_len, m.d_model) if m.positions == "learned" else None
        )
        self.layers = nn.ModuleList(Block(m) for _ in range(m.n_layers))
        self.final_norm = Norm(m)
        self.head = None if m.tie_embeddings else nn.Linear(m.d_model, m.vocab_size, bias=False)
        for module in self.modules():  # jaxlm's initialisation: N(0, init_std), zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=m.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens):
        B, L = tokens.shape
        position = torch.arange(L, device=tokens.device)
        x = self.embedding(tokens)
        rotary = None
        if self.positions is not None:
            x = x + self.positions(position)
        else:
            h = self.m.dim_per_head
            inv = self.m.rope_theta ** -(torch.arange(0, h, 2, device=tokens.device).float() / h)
            angle = position.float()[:, None] * inv
            rotary = (angle.cos(), angle.sin())
        for layer in self.layers:
            x = layer(x, rotary)
        x = self.final_norm(x)
        weight = self.embedding.weight if self.head is None else self.head.weight
        return x @ weight.t()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="the jaxlm run's data-parallel devices: this runs one device's share",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="eager mode (CPU smoke tests)")
    p.add_argument("overrides", nargs="*")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_lib.load(args.config, args.overrides)
    m, t = cfg.model, cfg.train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        m.compute_dtype
    ]
    torch.manual_seed(t.seed)
    model = Transformer(m).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.adam_eps,
        weight_decay=t.weight_decay,
        fused=device == "cuda",
    )
    micro = t.micro_batch_size or t.global_batch_size // args.devices
    accumulation = t.global_batch_size // args.devices // micro
    forward = model if args.no_compile else torch.compile(model)

    def step():
        for _ in range(accumulation):
            tokens = torch.randint(0, m.vocab_size, (micro, t.seq_len + 1), device=device)
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                logits = forward(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    print(
        json.dumps(
            {
                "framework": "pytorch",
                "torch": torch.__version__,
                "device": device,
                "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "model": args.config,
                "seq_len": t.seq_len,
                "params": params,
                "tokens_per_s_per_device": micro * accumulation * t.seq_len / seconds,
                "step_s": seconds,
                "warmup_s": compile_s,
                "compiled": not args.no_compile,
                "loss": float(loss.detach()),
                "initial_loss_bound": math.log(m.vocab_size) + 1,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
