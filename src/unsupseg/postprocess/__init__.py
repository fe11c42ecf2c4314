"""Post-processing of segmentation predictions: the dense CRF (see :mod:`unsupseg.postprocess.crf`)."""

from unsupseg.postprocess.crf import BACKENDS, DEFAULT_PARAMS, refine, refine_batch

__all__ = ["BACKENDS", "DEFAULT_PARAMS", "refine", "refine_batch"]
