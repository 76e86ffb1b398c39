"""res2net: the Res2Net family of image models in PyTorch."""

from .models import list_models

__all__ = ["list_models"]
__version__ = "0.1.0"
