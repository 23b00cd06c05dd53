"""Model helpers."""
