"""Shapes that several benchmarks share."""

# The Llama-style shape on which jaxlm's CPU step is compared with compiled PyTorch
# (peer_cpu.py) and profiled (cpu_profile.py): one device, float32, no recomputation.
PEER_SHAPE = (
    "model.vocab_size=4096",
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "model.d_ff=1024",
    "train.seq_len=256",
    "train.global_batch_size=8",
    "model.compute_dtype=float32",
    "model.remat=none",
    "data.source=synthetic",
)
