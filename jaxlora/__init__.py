"""jaxlora: one base LLM, thousands of LoRA adapters, batched in every step (JAX + Pallas)."""

__version__ = "0.1.0"


def __getattr__(name):
    # `jaxlora.LLM` and `jaxlora.LoRARequest` (vLLM's) without importing JAX for every
    # `import jaxlora.errors`.
    if name in ("LLM", "LoRARequest"):
        from jaxlora import llm

        return getattr(llm, name)
    raise AttributeError(name)
