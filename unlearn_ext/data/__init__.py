"""Data: question/answer examples, their encoding into training batches, benchmark data."""
from .collate import QACollator, encode_qa, format_prompt
from .synthetic import generate_benchmark, write_benchmark
from .tofu import load_split, load_tofu

__all__ = ["QACollator", "encode_qa", "format_prompt", "generate_benchmark", "write_benchmark", "load_split",
           "load_tofu"]
