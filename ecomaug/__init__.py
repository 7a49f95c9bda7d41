"""ecomaug: self-supervised image embeddings for e-commerce item matching.

The path of one sample through the project: ``loaders`` turns image folders into WebDataset
shards and shards into uint8 crops on the training device; ``ecomaug`` (this package) turns
crops into augmented views; ``train.py`` turns views into weights; ``bench`` measures each arrow.
"""

__version__ = "0.1.0"
