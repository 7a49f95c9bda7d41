"""Matching: two catalogues to same-item pairs (price comparison) and gap items (supplement).

``catalogue`` reads or embeds each side; ``search`` finds neighbours (exact in chunks, or a
faiss index above a size; ``index`` the one a memory budget allows); ``rerank`` is neighbourhood
re-ranking; ``calibrate`` picks the threshold for a precision from labelled pairs; ``normalise``
measures a cosine against the listings' background (the uncalibrated score); ``match`` runs it
all, ``outputs`` writes pairs.csv and gaps.csv, ``report`` the page to check the threshold by
eye; ``regions`` searches B's bundle listings by their item regions (``--query-regions``).
"""

from ecomaug.matching.calibrate import Calibration, calibration_problem, choose_threshold, precision_recall
from ecomaug.matching.catalogue import Catalogue, check_compatible, load_catalogue
from ecomaug.matching.index import IndexPlan, plan_index
from ecomaug.matching.match import MatchOptions, MatchResult, match_catalogues
from ecomaug.matching.normalise import background_levels, normalise
from ecomaug.matching.outputs import clusters
from ecomaug.matching.regions import ListingRegions, collapse, embed_listing_regions
from ecomaug.matching.rerank import expand
from ecomaug.matching.search import SearchResult, choose_method, exact_search, search

__all__ = ["Calibration", "Catalogue", "IndexPlan", "ListingRegions", "MatchOptions", "MatchResult", "SearchResult",
           "background_levels", "calibration_problem", "check_compatible", "choose_method",
           "choose_threshold", "clusters", "collapse", "embed_listing_regions", "exact_search", "expand",
           "load_catalogue", "match_catalogues", "normalise", "plan_index", "precision_recall", "search"]
