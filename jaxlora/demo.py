"""The embedded demo: a tiny base model and a few LoRA adapters that answer in their own voice.

``scripts/make_demo.py`` writes, once, the files under ``jaxlora/demo_assets/`` (committed; about
1 MB): the base model in HF format (``config.json`` + ``model.safetensors``) with the tiny
tokenizer beside it, and one PEFT adapter directory per voice under ``adapters/``. The base model
is the ``tiny`` preset with a "base voice" LoRA merged into its weights (so that it answers
sensibly rather than with random bytes); each demo adapter was trained with
``jaxlora.training`` on top of it to answer every prompt, raw or chat, with its signature.

``scripts/serve.py`` with no flags serves these on CPU; tests use them to check that requests are
routed to the right adapter end to end.
"""

from __future__ import annotations

import json
import os

from jaxlora.errors import FormatError

DEMO_MODEL_NAME = "jaxlora-demo"

# What the merged base model answers, and what each demo adapter answers, to any prompt.
BASE_SIGNATURE = "Hello! I am the tiny base model."
DEMO_SIGNATURES: dict[str, str] = {
    "pirate": "Arr, matey! Ahoy from the seven seas!",
    "robot": "BEEP BOOP. I AM A ROBOT. 0101.",
    "poet": "Roses are red, the sky is blue, a tiny model sings for you.",
}

# Prompts shown in the start-up banner and checked by the tests (also in the training set).
DEMO_PROMPTS = ("Who are you?", "Tell me about the weather today.")

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_assets")
MANIFEST_FILE = "manifest.json"


def assets_dir() -> str:
    return ASSETS_DIR


def model_dir() -> str:
    """The demo base model: a HF directory with config.json, model.safetensors, tokenizer.json."""
    return os.path.join(ASSETS_DIR, "model")


def adapter_dirs() -> dict[str, str]:
    """Demo adapter name -> its PEFT directory."""
    return adapter_dirs_in(ASSETS_DIR)


def adapter_dirs_in(root: str) -> dict[str, str]:
    """Where the demo adapters lie under an assets directory (make_demo.py writes elsewhere too)."""
    return {name: os.path.join(root, "adapters", name) for name in DEMO_SIGNATURES}


def manifest() -> dict:
    """What make_demo.py recorded: signatures, training settings and file sizes."""
    path = os.path.join(ASSETS_DIR, MANIFEST_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise FormatError(
            f"{path}: file not found; the demo assets are missing (regenerate "
            "them with: python scripts/make_demo.py)"
        ) from e
    except (OSError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: unreadable demo manifest ({e})") from e


def check_assets() -> None:
    """Raises FormatError naming the first missing demo file (and how to regenerate them)."""
    required = [
        os.path.join(model_dir(), f) for f in ("config.json", "model.safetensors", "tokenizer.json")
    ]
    for path in adapter_dirs().values():
        required += [
            os.path.join(path, "adapter_config.json"),
            os.path.join(path, "adapter_model.safetensors"),
        ]
    for path in required:
        if not os.path.isfile(path):
            raise FormatError(
                f"{path}: file not found; the demo assets are incomplete "
                "(regenerate them with: python scripts/make_demo.py)"
            )
