"""Matching: two catalogues to same-item pairs (price comparison) and gap items (supplement).

``catalogue`` reads or embeds each side; ``search`` finds neighbours (exact in chunks, or a
faiss index above a size); ``rerank`` is neighbourhood re-ranking; ``calibrate`` picks the
threshold for a precision from labelled pairs; ``normalise`` measures a cosine against the
listings' background (the uncalibrated score); ``match`` runs it all, ``outputs`` writes
pairs.csv and gaps.csv, ``report`` the page to check the threshold by eye.
"""

from ecomaug.matching.calibrate import Calibration, calibration_problem, choose_threshold, precision_recall
from ecomaug.matching.catalogue import Catalogue, check_compatible, load_catalogue
from ecomaug.matching.match import MatchOptions, MatchResult, match_catalogues
from ecomaug.matching.normalise import background_levels, normalise
from ecomaug.matching.outputs import clusters
from ecomaug.matching.rerank import expand
from ecomaug.matching.search import SearchResult, choose_method, exact_search, search

__all__ = ["Calibration", "Catalogue", "MatchOptions", "MatchResult", "SearchResult",
           "background_levels", "calibration_problem", "check_compatible", "choose_method",
           "choose_threshold", "clusters", "exact_search", "expand", "load_catalogue",
           "match_catalogues", "normalise", "precision_recall", "search"]
