"""Hugging Face interop: `python -m jaxlm.convert from-hf | to-hf`.

    from_hf.py   a LlamaForCausalLM or GPT2LMHeadModel directory -> a jaxlm run directory
    to_hf.py     a jaxlm run directory -> a directory transformers' from_pretrained loads
    layouts.py   the two architectures: configs, tensor names and layouts, in one table each

Both directions stream: tensors are read and written one at a time with the safetensors NumPy
API (no torch), so the host holds about one stacked parameter, never the whole model. Parity:
logits agree with transformers to 1e-4 in float32 (tests/test_convert.py).
"""
