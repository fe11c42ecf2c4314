"""Command-line interface: ``unsupseg fit | segment | evaluate | backbones | prepare-crops | ...``.

Every error is one line on stderr, without a traceback: our own (UnsupsegError) and a mistyped command
line exit 2, an operating-system error (a name too long, a full disk) 1, Ctrl-C 130 with where a rerun
resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import __version__
from .cli_text import (
    _clusters,
    _error,
    _os_message,
    _seeds,
    _show_warning,
    _usage_message,
    out,
    print_fit_record,
    print_scores,
    print_seed_scores,
)
from .errors import UnsupsegError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Unsupervised semantic segmentation.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"unsupseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Discover semantic categories in unlabelled photos and paint every pixel with one."""


@app.command()
def fit(
    run: Optional[Path] = typer.Option(
        None, "--out", help="Run directory to write (resumes an interrupted fit); not needed with --plan."
    ),
    method: Optional[str] = typer.Option(
        None, help="kmeans, cause-mlp, cause-tr, stego, leopart (default: the --config file's method, else kmeans)."
    ),
    backbone: Optional[str] = typer.Option(None, help="Backbone name (see `unsupseg backbones`)."),
    backbone_weights: Optional[str] = typer.Option(None, help="Weights file for the backbone, or 'random'."),
    images: Optional[Path] = typer.Option(None, help="Folder of unlabelled images to train on."),
    dataset: Optional[str] = typer.Option(None, help="Benchmark dataset name (camvid, cocostuff27, ...)."),
    root: Optional[Path] = typer.Option(None, help="Folder holding the dataset."),
    split: Optional[str] = typer.Option(None, help="Split to train on (default train)."),
    clusters: Optional[str] = typer.Option(
        None,
        help="Number of clusters (classes to discover), or 'auto' to "
        "estimate it from the training features (range: --set clusters_range=2,40).",
    ),
    preset: Optional[str] = typer.Option(None, help="Preset name or YAML file (default: the dataset's)."),
    config: Optional[Path] = typer.Option(None, help="A YAML run config to start from."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set params.lr=0.001"),
    overwrite: bool = typer.Option(
        False,
        help="Replace the run in --out (its own files only; a folder that is not a run directory is never touched).",
    ),
    plan: bool = typer.Option(
        False,
        "--plan",
        help="Print what the fit would do (items, feature source and "
        "size, steps, memory) and exit: no training, nothing written, no weights needed.",
    ),
    throughput: Optional[float] = typer.Option(
        None, help="With --plan: training items per second measured on the target machine, for a time estimate."
    ),
) -> None:
    """Fit a method and write a run directory."""
    from .api import fit as api_fit
    from .errors import ConfigError

    if throughput is not None and not plan:
        raise ConfigError("--throughput goes with --plan (a time estimate of the plan); leave it out to fit")
    if plan:
        from .api import fit_config
        from .api import plan as api_plan

        config = fit_config(method, backbone=backbone, backbone_weights=backbone_weights, images=images,
                            dataset=dataset, root=root, split=split, clusters=_clusters(clusters), preset=preset,
                            config_file=config, overrides=set_)
        for line in api_plan(config, throughput=throughput):
            out.print(line, highlight=False, soft_wrap=True)
        return
    if run is None:
        raise ConfigError("fit needs --out RUN, the run directory to write (only --plan goes without)")
    api_fit(
        method, out=run, backbone=backbone, backbone_weights=backbone_weights, images=images,
        dataset=dataset, root=root, split=split, clusters=_clusters(clusters), preset=preset, config_file=config,
        overrides=set_, overwrite=overwrite, log=out.print,
    )


@app.command()
def segment(
    run: Path = typer.Argument(..., help="A finished run directory."),
    inputs: list[Path] = typer.Argument(..., help="Images or folders of images."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for <name>.png and <name>_overlay.jpg."),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="Dense CRF refinement (default: the run's)."),
    overwrite: bool = typer.Option(False, help="Redo images whose outputs exist (also when another run wrote them)."),
    strict: bool = typer.Option(False, help="Stop at the first unreadable image instead of skipping it."),
    max_pixels: int = typer.Option(40_000_000, help="Downscale (with a warning) photos larger than this."),
    batch_size: Optional[int] = typer.Option(
        None, help="Same-size photos per forward pass (default: the run's batch_size on a GPU, 1 on CPU)."
    ),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA), bf16 or fp32 (default: the run's)."),
    confidence: bool = typer.Option(False, help="Also write <name>_confidence.png (max probability per pixel)."),
    export_format: Optional[str] = typer.Option(None, "--export", help="Then export the masks (coco, cvat, "
                                                "label-studio or png) to the folder <--out>-<format>."),
) -> None:
    """Segment photos with a fitted run (under torchrun, each process takes its share of the photos)."""
    from .api import segment as api_segment

    if export_format is not None:
        from .exporters import check_format

        check_format(export_format)
    result = api_segment(run, inputs, out_dir, crf=crf, overwrite=overwrite, strict=strict, max_pixels=max_pixels,
                         batch_size=batch_size, precision=precision, confidence=confidence)
    message = f"wrote {len(result)} masks and overlays to {out_dir}"
    if result.skipped:
        message += f"; skipped {len(result.skipped)} images whose outputs were already there (--overwrite redoes them)"
    if result.failed:
        message += f"; {len(result.failed)} files could not be segmented (see the warnings)"
    out.print(message)
    if export_format is not None:
        target = out_dir.with_name(f"{out_dir.name}-{export_format}")
        _export(run, out_dir, export_format, target, None, None, overwrite)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="A finished run directory."),
    dataset: str = typer.Option(..., help="Benchmark dataset name."),
    root: Path = typer.Option(..., help="Folder holding the dataset."),
    split: str = typer.Option("val", help="Split to score."),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="Dense CRF refinement (default: the run's)."),
    flip: Optional[bool] = typer.Option(None, "--flip/--no-flip", help="Flip averaging (default: the run's)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the scores as JSON here."),
    matching: list[str] = typer.Option(
        [],
        help="Protocol: dataset (one Hungarian matching over the split, the "
        "default), per-image (a Hungarian matching per image, as DiffCut), "
        "many-to-one, or all (repeatable; one pass scores them all).",
    ),
    overcluster: list[int] = typer.Option(
        [],
        help="Over-clustering protocol instead: k-means with K clusters "
        "on the split's backbone features, many-to-one matching (repeatable).",
    ),
    seeds: Optional[str] = typer.Option(
        None, help="Over-clustering: the k-means seeds averaged, comma-separated (default 0,1,2,3,4)."
    ),
    probe: Optional[str] = typer.Option(
        None,
        help="clusters (the unsupervised prediction, the default), or linear: "
        "the run's supervised linear probe (STEGO, CAUSE), identity mapping.",
    ),
    batch_size: Optional[int] = typer.Option(
        None, help="Same-size images per forward pass (default: the run's batch_size on a GPU, 1 on CPU)."
    ),
    precision: Optional[str] = typer.Option(None, help="auto (bf16 on CUDA), bf16 or fp32 (default: the run's)."),
) -> None:
    """Score a run on a labelled split (Hungarian matching over the split, or --matching), or over-cluster its features.

    A Leopart run fitted with params.protocol=reference is scored by the reference's protocol
    (mean and std over its Infomap seeds)."""
    from .errors import ConfigError

    if overcluster:
        from .api import evaluate_overcluster

        # the over-clustering protocol scores the backbone features alone: these would change nothing
        ignored = [name for name, value in (("--matching", matching), ("--probe", probe), ("--crf/--no-crf", crf),
                                            ("--flip/--no-flip", flip), ("--batch-size", batch_size),
                                            ("--precision", precision)) if value not in (None, [])]
        if ignored:
            raise ConfigError(f"--overcluster scores the backbone features alone: {', '.join(ignored)} would be "
                              "ignored; leave them out")
        report = evaluate_overcluster(run, dataset=dataset, root=root, split=split, ks=overcluster,
                                      seeds=_seeds(seeds), json_path=json_path)
        table = Table(title=f"over-clustering of {run} features on {dataset}/{split}")
        for col in ("K", "mIoU % (mean ± std)", "pixel acc. % (mean ± std)", "seeds"):
            table.add_column(col)
        for k, r in report["results"].items():
            table.add_row(str(k), f"{r['miou']:.1f} ± {r['miou_std']:.1f}",
                          f"{r['pixel_accuracy']:.1f} ± {r['pixel_accuracy_std']:.1f}", str(len(r["per_seed"])))
        out.print(table)
        return
    if seeds is not None:
        raise ConfigError("--seeds goes with --overcluster (its k-means seeds); leave it out")
    from .api import evaluate as api_evaluate

    report = api_evaluate(run, dataset=dataset, root=root, split=split, crf=crf, flip=flip, probe=probe or "clusters",
                          matching=matching or None, json_path=json_path, batch_size=batch_size, precision=precision)
    if report.get("protocol") == "leopart-reference":
        print_seed_scores(report, f"{run} on {dataset}/{split}, Leopart reference protocol")
    else:
        print_scores(report, f"{run} on {dataset}/{split}" + (" (linear probe)" if probe == "linear" else ""))
    print_fit_record(report)


@app.command()
def report(
    run: Path = typer.Argument(..., help="A finished run directory."),
    out_file: Path = typer.Option(Path("report.html"), "--out", help="HTML file to write."),
    images: Optional[Path] = typer.Option(None, help="Images to show (default: the run's training data)."),
    dataset: Optional[str] = typer.Option(None, help="Labelled dataset: adds metrics, IoU chart, confusion matrix."),
    root: Optional[Path] = typer.Option(None, help="Folder holding the dataset."),
    split: str = typer.Option("val", help="Split of the labelled dataset."),
    max_images: int = typer.Option(24, help="Images shown as overlays."),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="Dense CRF refinement (default: the run's)."),
    matching: list[str] = typer.Option([], help="Protocols scored in the metrics section: dataset, per-image, "
                                       "many-to-one or all (repeatable; default dataset)."),
) -> None:
    """Write a self-contained HTML report: overlays, cluster gallery, metrics where labels exist."""
    from .reporting import build_report

    build_report(run, out_file, images=images, dataset=dataset, root=root, split=split,
                 max_images=max_images, crf=crf, matching=matching or None, log=out.print)


@app.command("finetune-leopart")
def finetune_leopart(
    backbone: str = typer.Option(..., help="ViT backbone to fine-tune (e.g. dino_vits16)."),
    images: Path = typer.Option(..., help="Folder of unlabelled training images."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the fine-tuned weights and checkpoints."),
    backbone_weights: str = typer.Option("auto", help="Starting weights: auto, random or a file."),
    epochs: int = typer.Option(50, help="Epochs over the images."),
    batch_size: Optional[int] = typer.Option(None, help="Images per step over all processes (torchrun: global). "
                                             "Default: the reference's 2 GPUs x 32 = 64 (dino_vitb8: 2 x 16 = 32)."),
    steps: Optional[int] = typer.Option(None, help="Exact number of steps instead of epochs."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    set_: list[str] = typer.Option([], "--set", help="Override a fine-tuning parameter: --set num_prototypes=100"),
    overwrite: bool = typer.Option(False, help="Start again instead of resuming."),
) -> None:
    """Leopart dense self-supervised fine-tuning of a ViT; the result is a backbone weights file."""
    from .config import apply_overrides
    from .methods.leopart.finetune import finetune

    params = apply_overrides({}, set_)
    path = finetune(
        backbone,
        images,
        out_dir,
        weights=backbone_weights,
        epochs=epochs,
        batch_size=batch_size,
        steps=steps,
        device=device,
        overwrite=overwrite,
        log=out.print,
        **params,
    )
    out.print(f"fine-tuned backbone: {path}  (use it with --backbone {backbone} --backbone-weights {path})")


@app.command("import-checkpoint")
def import_checkpoint(
    method: str = typer.Argument(..., help="cause-mlp, cause-tr or stego (the method names of fit)."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory to create."),
    segment_file: Optional[Path] = typer.Option(None, "--segment", help="CAUSE: segment_{mlp|tr}.pth."),
    cluster_file: Optional[Path] = typer.Option(None, "--cluster", help="CAUSE: cluster_{mlp|tr}.pth."),
    modular: Optional[Path] = typer.Option(None, help="CAUSE: modular.npy (optional; the codebook is in --cluster)."),
    backbone: Optional[str] = typer.Option(None, help="CAUSE: backbone name (e.g. dino_vitb8)."),
    backbone_weights: Optional[str] = typer.Option(None, help="Backbone weights file (CAUSE; STEGO carries its own)."),
    ckpt: Optional[Path] = typer.Option(None, help="STEGO: the published Lightning .ckpt file."),
) -> None:
    """Turn published CAUSE or STEGO model files into a run directory for segment/evaluate."""
    from .errors import ConfigError

    cause = {"--segment": segment_file, "--cluster": cluster_file, "--modular": modular, "--backbone": backbone}
    if method in ("cause-mlp", "cause-tr"):
        missing = [name for name in ("--segment", "--cluster", "--backbone") if cause[name] is None]
        if missing:
            raise ConfigError(f"import-checkpoint {method} needs {', '.join(missing)}")
        if ckpt is not None:
            raise ConfigError(f"--ckpt is STEGO's checkpoint; import-checkpoint {method} reads --segment and --cluster")
        from .importers.cause import import_cause

        path = import_cause(method, segment_file, cluster_file, backbone, out_dir, backbone_weights=backbone_weights,
                            modular=modular)
    elif method == "stego":
        if ckpt is None:
            raise ConfigError("import-checkpoint stego needs --ckpt FILE")
        given = [name for name, value in cause.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: CAUSE's files; import-checkpoint stego reads --ckpt alone")
        from .importers.stego import import_stego

        path = import_stego(ckpt, out_dir, backbone_weights=backbone_weights)
    else:
        raise ConfigError(f"import-checkpoint takes cause-mlp, cause-tr or stego, got {method!r}")
    out.print(f"run directory written to {path}")


@app.command()
def backbones() -> None:
    """List the backbones with dim, stride, weights licence and availability here."""
    from .backbones import list_backbones

    table = Table(title="backbones")
    for col in ("name", "dim", "stride", "weights licence", "weights here"):
        table.add_column(col)
    for info in list_backbones():
        table.add_row(
            info.name, str(info.dim), str(info.stride), info.licence, "yes" if info.weights_available else "no"
        )
    out.print(table)


@app.command("prepare-crops")
def prepare_crops(
    dataset: str = typer.Option(..., help="Benchmark dataset name, or 'images' for a plain folder."),
    root: Path = typer.Option(..., help="Folder holding the dataset (or the images)."),
    split: str = typer.Option("train", help="Split to crop."),
    kind: str = typer.Option("five", help="five, double or super (see the specs)."),
    out_dir: Path = typer.Option(..., "--out", help="New folder for the crops (never overwritten)."),
) -> None:
    """Write the offline training crops of the reference methods into a new folder."""
    from .data import ImageFolder, build_dataset
    from .data import prepare_crops as do_prepare

    data = ImageFolder(root) if dataset == "images" else build_dataset(dataset, str(root), split)
    do_prepare(data, kind, out_dir)
    out.print(f"crops of {len(data)} images written to {out_dir}")


class _CatalogueHelp(typer.core.TyperCommand):
    def format_help(self, ctx, formatter):  # the catalogue (and the data layer) load only for --help
        from .data.download import catalogue_help

        self.help = f"{self.help}\n\n{catalogue_help()}"
        super().format_help(ctx, formatter)


@app.command(cls=_CatalogueHelp)
def download(
    name: str = typer.Argument(..., help="Dataset: cocostuff27, cocostuff171, coco81, cityscapes27, voc21, potsdam3."),
    root: Path = typer.Option(..., help="Dataset root (the --root of fit / evaluate)."),
    mirror: Optional[str] = typer.Option(None, help="Base URL of a mirror holding the archives by file name."),
    only: Optional[str] = typer.Option(None, help="Only the archives of: images, labels or lists."),
    keep_archives: bool = typer.Option(False, help="Keep the downloaded archives after extraction."),
) -> None:
    """Fetch, verify (checksum or archive integrity) and lay out a benchmark under --root; resumes
    interrupted transfers; a complete root is checked and nothing downloaded. See docs/datasets.md."""
    from .data.download import download as fetch

    fetch(name, root, mirror=mirror, only=only, keep_archives=keep_archives, log=out.print)


@app.command("check-data")
def check_data(
    name: str = typer.Argument(..., help="Dataset name, as for `unsupseg download`."),
    root: Path = typer.Option(..., help="Dataset root."),
) -> None:
    """Verify and lay out a dataset's files under --root (archives placed by hand included); never downloads."""
    from .data.download import check_data as check

    check(name, root, log=out.print)


@app.command()
def doctor() -> None:
    """Check the installation: torch, device, backbones with weights here, optional extras."""
    import importlib.util
    import platform

    import torch

    from .backbones import list_backbones
    from .features.cache import default_cache_dir

    table = Table(title=f"unsupseg {__version__} doctor", show_header=False)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    cuda = torch.cuda.is_available()
    table.add_row("device", f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu (no CUDA device)")
    table.add_row("cpu threads", str(torch.get_num_threads()))
    ready = [b.name for b in list_backbones() if b.weights_available]
    table.add_row("backbones with weights here", ", ".join(ready) or "none")
    table.add_row("feature cache", str(default_cache_dir()))
    extras = {"pydensecrf2 (CRF reference backend)": "pydensecrf", "infomap (Leopart)": "infomap",
              "networkx (Leopart fallback)": "networkx", "matplotlib (report charts)": "matplotlib",
              "scikit-image (demo photos)": "skimage"}
    for label, module in extras.items():
        table.add_row(label, "installed" if importlib.util.find_spec(module) else "not installed")
    out.print(table)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("outputs/demo"), "--out", help="Folder for photos, run, masks and overlays."),
    method: str = typer.Option("cause-mlp", help="Method to fit (its 'demo' preset when it has one)."),
    clusters: str = typer.Option("auto", help="Number of clusters to discover, or 'auto' (on these six photos it "
                                 "chooses about 20: see docs/clusters.md)."),
    overwrite: bool = typer.Option(False, help="Fit again even if a finished run is there."),
) -> None:
    """The main job on the embedded default: fit, segment and summarise scikit-image's photos."""
    from .demo import run_demo

    table = run_demo(out_dir, method, _clusters(clusters), overwrite, out.print)
    out.print(table)
    out.print(f"masks and overlays in {out_dir / 'masks'}, report in {out_dir / 'report.html'}")


@app.command()
def label(
    run: Path = typer.Argument(..., help="A finished run directory."),
    name: list[str] = typer.Option([], help="CLUSTER=NAME, e.g. 0=sky (repeatable)."),
    merge: list[str] = typer.Option([], help="CLUSTERS=NAME, e.g. 4,7=building: one class of several clusters "
                                    "(repeatable)."),
    reset: bool = typer.Option(False, help="Remove labels.yaml first (alone: back to numbered clusters)."),
) -> None:
    """Name and merge a run's clusters (labels.yaml in the run directory); later masks, overlays, reports,
    evaluations and exports use the names and merged classes. Without options: show them."""
    from .api import label as api_label
    from .errors import ConfigError
    from .labels import parse_merge, parse_name

    names: dict[str, str] = {}
    for text in name:
        cluster, value = parse_name(text)
        if cluster in names:
            raise ConfigError(f"--name: cluster {cluster} is named twice ({names[cluster]!r} and {value!r})")
        names[cluster] = value
    merges: dict[str, list[str]] = {}
    for text in merge:
        value, clusters = parse_merge(text)
        if value.strip() in merges:
            raise ConfigError(f"--merge: the name {value.strip()!r} is given to two merges")
        merges[value.strip()] = clusters
    labels = api_label(run, names=names, merges=merges, reset=reset)
    table = Table(title=f"classes of {run}")
    for col in ("class", "name", "clusters"):
        table.add_column(col)
    for k, (group, class_name) in enumerate(zip(labels.groups, labels.classes)):
        table.add_row(str(k), class_name, ", ".join(map(str, group)))
    out.print(table)


@app.command()
def export(
    run: Path = typer.Argument(..., help="A finished run directory."),
    masks: Path = typer.Argument(..., help="The --out folder of `unsupseg segment` with this run."),
    export_format: str = typer.Option(..., "--format", help="coco, cvat, label-studio or png."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the export (never an input or masks folder)."),
    images: list[Path] = typer.Option([], help="The photos segmented (default: those segment recorded)."),
    image_root: Optional[str] = typer.Option(None, help="Prefix of the photos' paths in COCO / Label Studio "
                                             "files (a URL or a folder)."),
    overwrite: bool = typer.Option(False, help="Redo images already exported, or replace another export."),
) -> None:
    """Export a run's masks for annotation tools: COCO RLE, CVAT segmentation masks, Label Studio
    brush predictions, or plain PNGs with classes.json (FiftyOne)."""
    _export(run, masks, export_format, out_dir, images or None, image_root, overwrite)


def _export(run, masks, export_format, out_dir, images, image_root, overwrite) -> None:
    from .api import export as api_export

    result = api_export(run, masks, export_format, out_dir, images=images, image_root=image_root,
                        overwrite=overwrite)
    message = f"{export_format}: exported {len(result)} images to {out_dir}"
    if result.skipped:
        message += f"; skipped {len(result.skipped)} already exported (--overwrite redoes them)"
    out.print(message)
    for path in result.files:
        out.print(f"wrote {path}")


def main() -> None:
    try:
        _main()
    except SystemExit as exit_:
        _leave_process_group(finished=exit_.code in (None, 0))
        raise
    except BaseException:
        _leave_process_group(finished=False)
        raise


def _leave_process_group(finished: bool) -> None:
    """Under torchrun, end the process group before the interpreter ends (see
    engine.distributed.leave_process_group); torch is not imported for that when no command needed it."""
    if "torch.distributed" in sys.modules:
        from .engine.distributed import leave_process_group

        leave_process_group(wait=finished)


def _main() -> None:
    import warnings

    from .errors import Interrupted

    warnings.showwarning = _show_warning
    try:
        code = app(standalone_mode=False)
    except Interrupted as err:
        _error(str(err), prefix="")
        sys.exit(130)
    except UnsupsegError as err:
        _error(str(err))
        sys.exit(2)
    except typer.TyperException as err:  # typer's bundled click: usage errors (missing/unknown option, bad value)
        if err.format_message():  # empty for a bare `unsupseg`, whose help typer has printed
            _error(_usage_message(err))
        sys.exit(err.exit_code)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:  # end of input at a prompt
        _error("aborted")
        sys.exit(1)
    except OSError as err:  # file name too long, disk full, permission: written atomically, nothing half-done
        _error(_os_message(err))
        sys.exit(1)
    # typer turns Ctrl-C outside a training stage into exit code 130 and returns it
    if code == 130:
        _error("interrupted; rerun the same command to continue (finished work is kept)", prefix="")
    sys.exit(code if isinstance(code, int) else 0)


@app.command("segment-image")
def segment_image(
    photo: Path = typer.Argument(..., help="The photo to partition."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for <name>.png, <name>_overlay.jpg and report.html."),
    clusters: str = typer.Option("auto", help="Number of parts, or 'auto' (estimated from the photo, 2 to 12)."),
    backbone: str = typer.Option("efficientnet_lite0", help="Frozen backbone whose features are clustered."),
    backbone_weights: str = typer.Option("auto", help="Weights file, 'auto' (local/cache/download) or 'random'."),
    resolution: int = typer.Option(320, help="Shorter side of the photo as the backbone sees it, in pixels."),
    crf: bool = typer.Option(True, "--crf/--no-crf", help="Dense CRF refinement of the parts."),
    seed: int = typer.Option(0, help="Seed of the k-means (and of the K estimate)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html beside the mask."),
    overwrite: bool = typer.Option(False, help="Replace outputs already in --out."),
) -> None:
    """Partition one photo from its own features, training-free (k-means on its tokens, then the CRF)."""
    from .api import segment_image as api_segment_image

    seg = api_segment_image(photo, out_dir, clusters=_clusters(clusters), backbone=backbone,
                            backbone_weights=backbone_weights, resolution=resolution, crf=crf, seed=seed,
                            overwrite=overwrite, log=out.print)
    if report:
        from .reporting import build_report

        build_report(seg, out_dir / "report.html", images=photo, masks=out_dir, log=out.print)
    out.print(f"wrote {photo.stem}.png and {photo.stem}_overlay.jpg ({seg.num_clusters} parts) to {out_dir}")


if __name__ == "__main__":
    main()
