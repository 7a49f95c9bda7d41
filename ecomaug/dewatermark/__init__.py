"""Known marks out of images before training: the conversion hook of ``ecomaug dewatermark``.

The pool is read by :func:`ecomaug.marks.load_marks`, the loader the training overlay uses, so
one folder (``--watermark-dir``) is both what training pastes and what this removes. The hook is
handed to :func:`loaders.convert.convert_to_shards` as a callable by the command; the loaders
import nothing from here.
"""

from ecomaug.dewatermark.detections import Detection, box_iou
from ecomaug.dewatermark.fit import masked_fit, masked_ncc
from ecomaug.dewatermark.remover import DEFAULT_SCALES, DEFAULT_THRESHOLD, Dewatermarker, scale_grid
from ecomaug.dewatermark.templates import Mark, MarkPool

__all__ = ["DEFAULT_SCALES", "DEFAULT_THRESHOLD", "Detection", "Dewatermarker", "Mark", "MarkPool", "box_iou",
           "masked_fit", "masked_ncc", "scale_grid"]
