"""Evaluation: COCO metrics (``coco.py``, numpy and pycocotools only, exported here), the evaluation
pass over a detector (``evaluate.py``, torch: import it from there) and its figures (``figures.py``,
matplotlib, imported on its own). The package itself stays light: `centernet-ray config` and the
MLflow helpers read ``STAT_NAMES`` without importing torch."""

from centernet_ray.evaluation.coco import (STAT_NAMES, CocoEvaluation, check_detections, coco_evaluate,
                                           coco_evaluation, coco_from_dict, confusion_matrix, detections_to_coco,
                                           format_stats)

__all__ = ["STAT_NAMES", "CocoEvaluation", "check_detections", "coco_evaluate", "coco_evaluation", "coco_from_dict",
           "confusion_matrix", "detections_to_coco", "format_stats"]
