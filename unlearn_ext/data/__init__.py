"""Data: question/answer examples, their encoding into training batches, benchmark data."""
from .collate import QACollator, encode_qa, format_prompt

__all__ = ["QACollator", "encode_qa", "format_prompt"]
