"""``segment_image``: one photo partitioned from its own features, training-free."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .._progress import console
from ..backbones import build_backbone
from ..data import load_image
from ..data.images import DEFAULT_MAX_PIXELS
from ..engine import init_distributed
from ..errors import ConfigError, OutputError
from .outputs import segment
from .resolve import AUTO, resolve_config
from .segmenter import Segmenter, check_max_pixels

# K searched by ``segment_image(clusters="auto")``: one photo holds a handful of parts, not 40
IMAGE_CLUSTERS_RANGE = (2, 12)


def segment_image(
    photo: str | os.PathLike,
    out: str | os.PathLike,
    *,
    clusters: int | str = "auto",
    backbone: str = "efficientnet_lite0",
    backbone_weights: str = "auto",
    resolution: int = 320,
    crf: bool = True,
    flip: bool = True,
    seed: int = 0,
    overwrite: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    log: Callable[[str], None] | None = None,
) -> Segmenter:
    """Partition one photo from its own features, training-free, into ``out``: the mask and overlay
    that ``segment`` writes (``unsupseg.reporting.build_report(seg, ..., images=photo)`` adds the report).

    The photo's tokens (flip-averaged, as the Segmenter embeds them) are clustered by cosine k-means
    into ``clusters`` parts ("auto": estimated from the photo, see ``features.partition``); pixels
    then take the part of highest cosine score, refined by the dense CRF (``crf``, on by default).
    Returns the in-memory Segmenter of this one photo (it segments other photos with the same parts).
    """
    from ..features.partition import partition_tokens
    from ..methods.kmeans import KMeansPredictor

    log = log or (lambda msg: console.print(msg))
    check_max_pixels(max_pixels)
    if clusters != AUTO and (isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1):
        raise ConfigError(f"clusters must be a positive number or 'auto', got {clusters!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; give a folder for the mask, overlay and report")
    pil = load_image(photo, max_pixels=max_pixels)
    config = resolve_config("kmeans", preset="default", overrides=[f"seed={seed}", f"data.resolution={resolution}",
                            f"test.crf={json.dumps(crf)}", f"test.flip={json.dumps(flip)}"],
                            **{"backbone.name": backbone, "backbone.weights": backbone_weights,
                               "data.images": str(Path(photo).absolute()), "clusters": 1})
    device = init_distributed(config.device).device
    net = build_backbone(config.backbone.name, config.backbone.weights, device=device, **config.backbone.options)
    # the Segmenter's own path to the tokens (preprocess, stride padding, flip averaging): the parts are
    # fitted on exactly the embedding they are scored on
    probe = Segmenter(config, net, KMeansPredictor(torch.zeros(1, net.dim)), device)
    image = probe.model_input(pil, str(photo))[None].to(device)
    s = net.stride
    batch = F.pad(image, (0, -image.shape[-1] % s, 0, -image.shape[-2] % s), mode="replicate")
    with torch.no_grad():
        emb = probe._embed(net(batch))
        if flip:
            emb = (emb + probe._embed(net(batch.flip(-1))).flip(-1)) / 2
    tic = time.perf_counter()
    try:
        centroids, count = partition_tokens(emb[0].cpu(), None if clusters == AUTO else clusters,
                                            torch.Generator().manual_seed(seed), k_range=IMAGE_CLUSTERS_RANGE)
    except ValueError as err:
        raise ConfigError(f"{photo}: {err}") from None
    k = len(centroids)
    how = f"chosen by modularity in {IMAGE_CLUSTERS_RANGE[0]}..{IMAGE_CLUSTERS_RANGE[1]}" if count else "given"
    log(f"{photo}: {k} parts ({how}) from {emb.shape[-2]}x{emb.shape[-1]} tokens, {time.perf_counter() - tic:.1f} s")
    config.clusters = k
    seg = Segmenter(config, net, KMeansPredictor(centroids), device)
    segment(seg, [photo], out, crf=crf, overwrite=overwrite, strict=True, max_pixels=max_pixels)
    return seg
