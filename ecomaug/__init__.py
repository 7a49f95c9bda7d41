"""ecomaug: self-supervised image embeddings for e-commerce item matching.

The path of one sample through the project: ``loaders`` turns image folders into WebDataset
shards and shards into uint8 crops on the training device; ``ecomaug`` (this package) turns
crops into augmented views; ``train.py`` turns views into weights; ``bench`` measures each arrow.
"""

__version__ = "0.1.0"

# Public entry points, imported on first use so that ``import ecomaug`` (and every CLI command) does
# not pay for importing torch and kornia.
_LAZY_EXPORTS = {"build_recipe": "ecomaug.recipes"}
__all__ = ["__version__", "build_recipe"]


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'ecomaug' has no attribute {name!r}")
