"""Evaluation: named sets (`eval.sets`) of four kinds and a classifier's own head, scored by every
rank for its share, in training and from `lvmtrain eval`."""

from lvmtrain.evaluation.evaluator import Evaluator
from lvmtrain.evaluation.labels import check_labels_cover, zero_shot_weights
from lvmtrain.evaluation.sets import EvalSet, check_set_configs, resolve_sets, set_configs

__all__ = ["EvalSet", "Evaluator", "check_labels_cover", "check_set_configs", "resolve_sets", "set_configs",
           "zero_shot_weights"]
