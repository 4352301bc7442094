"""Model and serving presets as frozen dataclasses."""

from configs.models import MODEL_PRESETS, get_model_preset

__all__ = ["MODEL_PRESETS", "get_model_preset"]
