"""The OpenAI-compatible multi-LoRA server.

    python scripts/serve.py                       # the embedded demo: tiny model + 3 adapters, CPU
    python scripts/serve.py --model=/models/llama-3-8b \\
        --lora_modules=sql=/adapters/sql,chat=/adapters/chat --lora_dirs=/adapters/more \\
        --allowed_adapter_roots=/adapters --api_key=$KEY --host=0.0.0.0 --port=8000

`model` in a request is the served model name (--served_model_name; default: the preset name or
the model directory's name) or an adapter's name. Adapters can be added and removed at runtime
(POST /v1/load_lora_adapter, /v1/unload_lora_adapter) from inside --allowed_adapter_roots only;
with --load_adapters_on_demand a request that names an adapter directory under those roots
loads it first.
Engine sizes left unset get defaults fitted to the backend (jaxlora.server.launch).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlora import launch_flags  # noqa: E402  (defines the serving flags)

FLAGS = flags.FLAGS
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
flags.DEFINE_string(
    "ssl_certfile",
    "",
    "Serve HTTPS with this PEM certificate chain (with --ssl_keyfile; vLLM's --ssl-certfile).",
)
flags.DEFINE_string("ssl_keyfile", "", "The private key of --ssl_certfile (PEM).")
flags.DEFINE_float(
    "graceful_shutdown_s",
    30.0,
    "On SIGTERM or Ctrl-C: stop accepting connections and let the requests in flight finish "
    "for up to this many seconds, then cancel the rest (a second signal stops at once).",
    lower_bound=0.0,
)
flags.DEFINE_string(
    "root_path",
    "",
    "The path prefix a reverse proxy serves this server under, e.g. /llm (vLLM's --root-path; "
    "the routes stay where they are, the OpenAPI pages link through the prefix).",
)
flags.DEFINE_enum(
    "uvicorn_log_level",
    None,
    ["critical", "error", "warning", "info", "debug", "trace"],
    "The HTTP server's (uvicorn's) log level (vLLM's --uvicorn-log-level; default: --log_level).",
)
flags.DEFINE_bool(
    "warmup",
    True,
    "Compile every step shape before serving (in the background; /health answers 503 until done).",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import uvicorn

    from jaxlora.errors import JaxloraError
    from jaxlora.heap import freeze_startup_objects
    from jaxlora.server import create_app
    from jaxlora.server.launch import banner, build_state, tls_options

    launch_flags.set_up_process()
    try:
        tls = tls_options(FLAGS.ssl_certfile, FLAGS.ssl_keyfile)
        state = build_state(launch_flags.launch_config())
    except JaxloraError as e:
        sys.exit(f"error: {e}")
    # Bound here rather than by uvicorn so that --port=0 (any free port) prints the real one.
    family = socket.AF_INET6 if ":" in FLAGS.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((FLAGS.host, FLAGS.port))
    except OSError as e:
        sys.exit(f"error: cannot listen on {FLAGS.host}:{FLAGS.port} ({e.strerror})")
    port = sock.getsockname()[1]
    shown_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(FLAGS.host, FLAGS.host)
    if ":" in shown_host and not shown_host.startswith("["):
        shown_host = f"[{shown_host}]"
    url = f"{'https' if tls else 'http'}://{shown_host}:{port}"

    def ready():
        # Warmed up: the start-up's objects no longer lengthen the garbage collections.
        logging.info("objects frozen after a %.0f ms collection", freeze_startup_objects() * 1e3)
        print(banner(state, url), flush=True)

    if FLAGS.warmup:
        print(
            f"jaxlora: listening on {url}; compiling the engine's step shapes first "
            "(generation requests wait, /health answers 503 until done; restarts reuse the "
            "compilation cache)",
            flush=True,
        )
    app_ = create_app(state, warm_up=FLAGS.warmup, background_warmup=True, on_ready=ready)
    config = uvicorn.Config(
        app_,
        log_level=FLAGS.uvicorn_log_level or FLAGS.log_level,
        root_path=FLAGS.root_path,
        timeout_graceful_shutdown=FLAGS.graceful_shutdown_s,
        **tls,
    )

    def stop(signum, frame):
        raise KeyboardInterrupt

    # uvicorn drains, then raises the signal it caught again with the handlers it found: SIGTERM
    # (a container's stop) then ends the process as Ctrl-C does, cleanly, not killed by it.
    signal.signal(signal.SIGTERM, stop)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn shut down gracefully, then re-raised the signal it caught
    print("jaxlora: stopped", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=launch_flags.parse_flags)
