"""orz_fast: a fast Open-Reasoner-Zero PPO trainer for reasoning LLMs."""

import os

import torch

# Triton picks compiled or interpreted kernels when it first sees TRITON_INTERPRET, which may be
# when another library (megatron-core, transformers) imports it, before orz_fast.kernels does.
# Without CUDA only the interpreter exists, so it is switched on as soon as orz_fast is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

__version__ = "0.1.0"
