"""The Res2Net architectures: blocks, nets and the registry of names."""

from .dla import DLA, DlaBottle2neck
from .registry import ALIASES, ARCHITECTURES, build_model, list_models, resolve_name
from .res2net import Bottle2neck, Res2Net

__all__ = [
    "ALIASES",
    "ARCHITECTURES",
    "DLA",
    "Bottle2neck",
    "DlaBottle2neck",
    "Res2Net",
    "build_model",
    "list_models",
    "resolve_name",
]
