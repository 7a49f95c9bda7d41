"""Matching: two catalogues to same-item pairs (price comparison) and gap items (supplement).

``catalogue`` reads or embeds each side; ``search`` finds neighbours (exact in chunks, or a
faiss index above a size); ``rerank`` is neighbourhood re-ranking; ``calibrate`` picks the
threshold for a precision from labelled pairs; ``match`` writes pairs.csv and gaps.csv;
``report`` the page to check the threshold by eye.
"""

from ecomaug.matching.calibrate import Calibration, choose_threshold, precision_recall
from ecomaug.matching.catalogue import Catalogue, check_compatible, load_catalogue
from ecomaug.matching.match import MatchOptions, MatchResult, clusters, match_catalogues
from ecomaug.matching.rerank import expand
from ecomaug.matching.search import SearchResult, choose_method, exact_search, search

__all__ = ["Calibration", "Catalogue", "MatchOptions", "MatchResult", "SearchResult",
           "check_compatible", "choose_method", "choose_threshold", "clusters", "exact_search",
           "expand", "load_catalogue", "match_catalogues", "precision_recall", "search"]
