"""What the remover found: detections, box overlap, and the suppression of overlapping candidates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Detection:
    """One mark found in an image; ``box`` is ``[x0, y0, x1, y1]`` in pixels (x1, y1 exclusive)."""

    mark: str
    box: tuple[int, int, int, int]
    score: float
    scale: float

    def as_dict(self) -> dict[str, Any]:
        return {"mark": self.mark, "box": list(self.box), "score": round(self.score, 4),
                "scale": round(self.scale, 4)}


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def covered(inner: Sequence[float], outer: Sequence[float]) -> float:
    """Share of ``inner``'s area inside ``outer``."""
    width = min(inner[2], outer[2]) - max(inner[0], outer[0])
    height = min(inner[3], outer[3]) - max(inner[1], outer[1])
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / ((inner[2] - inner[0]) * (inner[3] - inner[1]))


def suppress_candidates(candidates: list[tuple], iou: float) -> list[tuple]:
    """Greedy NMS over coarse candidates (sorted best first) of the same mark.

    Marks are not suppressed by other marks here: a poorly matching mark must not hide the right
    one before refinement decides; the final NMS compares refined scores across marks.
    """
    kept: list[tuple] = []
    boxes: list[tuple[str, tuple[float, float, float, float]]] = []
    for candidate in candidates:
        _, mark, scale, x, y = candidate
        width, height = mark.size
        box = (x, y, x + width * scale, y + height * scale)
        if all(name != mark.name or box_iou(box, other) <= iou for name, other in boxes):
            kept.append(candidate)
            boxes.append((mark.name, box))
    return kept
