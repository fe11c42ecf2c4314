"""The Python face of unsupseg: ``fit``, ``load``, ``Segmenter.predict``, ``evaluate``, ``segment``.

The CLI is a thin layer over these functions. One module per seam: ``resolve`` (run configs),
``training`` (fit, plan), ``segmenter`` (the Segmenter, load), ``scoring`` (evaluate) and ``outputs``
(segment).
"""

from __future__ import annotations

from .. import rundir
from .labelling import export, label
from .method_protocols import METHOD_PROTOCOLS, evaluate_leopart_reference
from .outputs import (
    SEGMENT_RECORD,
    OutputItem,
    SegmentResult,
    claim_output_folder,
    confidence_path,
    plan_outputs,
    segment,
    write_outputs,
)
from .resolve import (
    AUTO,
    _train_preprocess,
    build_train_dataset,
    choose_clusters,
    fit_config,
    fit_run,
    min_clusters,
    resolve_config,
    resolve_method,
    resolve_run,
)
from .scoring import (
    PROBES,
    _protocols,
    evaluate,
    evaluate_overcluster,
    linear_probe_segmenter,
    same_shape_chunks,
)
from .segmenter import (
    LONG_SIDE_FACTOR,
    PREDICT_ERRORS,
    Prediction,
    Segmenter,
    check_max_pixels,
    fit_record,
    load,
    run_labels,
    tiled_embed,
)
from .single_image import IMAGE_CLUSTERS_RANGE, segment_image
from .training import fit, plan

__all__ = [
    "Segmenter", "evaluate", "export", "fit", "fit_config", "label", "load", "plan", "resolve_config", "segment",
    "segment_image",
]
