"""res2net: the Res2Net family of image models in PyTorch."""

from .factory import create_model
from .hub import push_to_hub, save_to_folder
from .inference import optimize_for_inference
from .models import list_models
from .weights.loading import load_checkpoint

__all__ = [
    "create_model",
    "list_models",
    "load_checkpoint",
    "optimize_for_inference",
    "push_to_hub",
    "save_to_folder",
]
__version__ = "0.1.0"
