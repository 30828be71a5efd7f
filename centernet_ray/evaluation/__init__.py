"""Evaluation: COCO metrics (``coco.py``), the evaluation pass over a detector (``evaluate.py``) and
its figures (``figures.py``, matplotlib, imported on its own)."""

from centernet_ray.evaluation.coco import (STAT_NAMES, CocoEvaluation, coco_evaluate, coco_evaluation, coco_from_dict,
                                           confusion_matrix, detections_to_coco, format_stats)
from centernet_ray.evaluation.evaluate import EVAL_TOP_K, EvaluationResult, KeptImage, evaluate

__all__ = ["EVAL_TOP_K", "STAT_NAMES", "CocoEvaluation", "EvaluationResult", "KeptImage", "coco_evaluate",
           "coco_evaluation", "coco_from_dict", "confusion_matrix", "detections_to_coco", "evaluate", "format_stats"]
