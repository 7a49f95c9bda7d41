"""Evaluation: embeddings, item-matching retrieval metrics and the robustness report.

``embed`` loads a backbone (export, checkpoint or random init) and embeds images; ``retrieval``
ranks a gallery for each query by cosine similarity in chunks and scores recall@k / mAP by
``item_id``; ``disturbances`` and ``queries`` build disturbed query sets against a clean gallery;
``report`` puts several models side by side.
"""

from ecomaug.evaluation.disturbances import DISTURBANCES, apply_disturbance
from ecomaug.evaluation.embed import (EmbeddingModel, Embeddings, PartsReport, ReadReport,
                                      embed_data, embed_samples, embed_to_parts,
                                      load_embeddings, load_model, random_init_model)
from ecomaug.evaluation.queries import EvalSet, build_eval_set, split_gallery
from ecomaug.evaluation.report import (ModelSpec, evaluate_models, model_spec, random_init_spec,
                                       robustness_report, write_report)
from ecomaug.evaluation.retrieval import RetrievalResult, retrieval_metrics, retrieve, summarize

__all__ = ["DISTURBANCES", "EmbeddingModel", "Embeddings", "EvalSet", "ModelSpec",
           "RetrievalResult", "apply_disturbance", "build_eval_set", "embed_data",
           "embed_samples", "embed_to_parts", "evaluate_models", "PartsReport", "ReadReport", "load_embeddings", "load_model", "model_spec",
           "random_init_model", "random_init_spec", "retrieval_metrics", "retrieve",
           "robustness_report", "split_gallery", "summarize", "write_report"]
