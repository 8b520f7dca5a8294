"""Online inference for a finished run (FATE-Serving's job): ``fedcrypt serve RUN_DIR``."""

from fedcrypt.serving.app import create_app
from fedcrypt.serving.model import InputError, ServedModel, ServingError, load_served_model, parse_inputs

__all__ = ["InputError", "ServedModel", "ServingError", "create_app", "load_served_model", "parse_inputs"]
