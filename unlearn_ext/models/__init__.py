"""Models the benchmark and the demo use: a tiny Llama built from a config, SmolLM2 from its GGUF file."""
