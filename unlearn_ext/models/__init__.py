"""Models: the LM-head inputs of any Hugging Face causal LM for the fused-linear losses
(lm_head.py), and the models the benchmark and the demo use: a tiny Llama built from a
config, SmolLM2 from its GGUF file."""
from .lm_head import lm_head_inputs, verify_lm_head

__all__ = ["lm_head_inputs", "verify_lm_head"]
