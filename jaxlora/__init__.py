"""jaxlora: one base LLM, thousands of LoRA adapters, batched in every step (JAX + Pallas)."""

__version__ = "0.1.0"


def __getattr__(name):
    # `jaxlora.LLM` without importing JAX for every `import jaxlora.errors`.
    if name == "LLM":
        from jaxlora.llm import LLM

        return LLM
    raise AttributeError(name)
