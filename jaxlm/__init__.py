"""jaxlm: a JAX/XLA SPMD training stack for large language models.

One Flax NNX model, sharded over a named mesh of four axes (data, fsdp, tensor, pipeline)
through a table of logical-axis rules. See README.md and the modules' docstrings.
"""

__version__ = "0.1.0"
