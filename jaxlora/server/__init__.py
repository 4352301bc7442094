"""The OpenAI-compatible multi-LoRA HTTP server (FastAPI + uvicorn).

    state = ServingState(llm, ServerConfig(model_name="my-model", adapter_roots=("/adapters",)))
    app = create_app(state, warm_up=True)      # uvicorn.run(app, ...) or BackgroundServer(app)

``scripts/serve.py`` is the command-line entry point.
"""

from jaxlora.server.app import create_app
from jaxlora.server.background import BackgroundServer
from jaxlora.server.config import ServerConfig
from jaxlora.server.state import ServingState, resolve_adapter_path

__all__ = ["BackgroundServer", "ServerConfig", "ServingState", "create_app", "resolve_adapter_path"]
