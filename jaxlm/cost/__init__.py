"""What a layout costs, before and while it runs: FLOPs, bytes, seconds and joules.

    flops       model arithmetic: parameters by component, FLOPs per token, days to train
    hardware    the devices: peak FLOP/s, memory, power and links by device kind
    memory      bytes per device of the train state (exact) and the activations (estimated)
    hlo         matmul FLOPs and collective bytes read from a compiled step's HLO
    compiled    compile a step ahead of time for its memory and HLO figures; time real steps
    plan        one layout: fits or not, figures side by side, days and energy, warnings
    search      many layouts: enumerate, estimate, compile the promising ones, rank
    benchmark   one layout timed on this machine, as a results row
    accounting  MFU and energy added to every training step's metrics row
    energy      meters of device power (NVML, nvidia-smi, rocm-smi, RAPL)

The `python -m jaxlm.plan`, `tune` and `bench` commands are thin shells over these modules.
"""

# Defaults of plan and tune, here so that their commands can show them before JAX is imported.
DEFAULT_DEVICE = "h100"
DEFAULT_MFU = 0.4  # GPT-NL's measured MFU on H100 with PyTorch FSDP
