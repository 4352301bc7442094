"""jaxlora: one base LLM, thousands of LoRA adapters, batched in every step (JAX + Pallas)."""

__version__ = "0.1.0"
