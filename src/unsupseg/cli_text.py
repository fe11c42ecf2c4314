"""What the command line prints: score tables, fit records, one-line errors and warnings, and the parsing
of the options whose text the commands share (``--clusters``, ``--seeds``)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

out = Console()


def print_scores(report: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("class")
    table.add_column("IoU %", justify="right")
    for name, value in report["per_class_iou"].items():
        table.add_row(name, "-" if value is None else f"{value:.1f}")
    table.add_section()
    table.add_row("[bold]mIoU", f"[bold]{report['miou']:.1f}")
    table.add_row("[bold]pixel accuracy", f"[bold]{report['pixel_accuracy']:.1f}")
    out.print(table)
    out.print(
        f"{report['n_images']} images, {report['num_clusters']} clusters"
        + (f" in {len(report['labels']['classes'])} classes (labels.yaml)" if "labels" in report else "")
        + f", matching {report['matching']}, "
        f"flip {'on' if report['flip'] else 'off'}, CRF {'on' if report['crf'] else 'off'}"
    )
    if len(report.get("protocols", {})) > 1:
        table = Table(title="protocols")
        for col in ("matching", "mIoU %", "pixel accuracy %"):
            table.add_column(col)
        for name, r in report["protocols"].items():
            table.add_row(name, f"{r['miou']:.1f}", f"{r['pixel_accuracy']:.1f}")
        out.print(table)


def _clusters(text: str | None) -> int | str | None:
    """--clusters: a whole number (negative included, for the range check) is a number; anything else goes to
    the config check as text ("auto")."""
    return int(text) if text is not None and text.strip().lstrip("+-").isdigit() else text


def print_seed_scores(report: dict, title: str) -> None:
    table = Table(title=title)
    for col in ("Infomap seed", "mIoU %", "pixel accuracy %"):
        table.add_column(col, justify="right")
    for run in report["per_seed"]:
        table.add_row(str(run["seed"]), f"{run['miou']:.1f}", f"{run['pixel_accuracy']:.1f}")
    table.add_section()
    table.add_row("[bold]mean ± std", f"[bold]{report['miou']:.1f} ± {report['miou_std']:.1f}",
                  f"[bold]{report['pixel_accuracy']:.1f} ± {report['pixel_accuracy_std']:.1f}")
    out.print(table)
    out.print(
        f"{report['n_images']} images at {report['map_size']} x {report['map_size']}, {report['num_clusters']} labels, "
        f"matching {report['matching']} (Leopart's PredsmIoU)"
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # one line naming the problem, without the library's source line
    from rich.markup import escape

    Console(stderr=True).print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def _error(message: str, prefix: str = "[bold red]error:[/] ") -> None:
    # escaped: rich markup would eat square brackets such as "unsupseg[demo]"
    from rich.markup import escape

    Console(stderr=True).print(f"{prefix}{escape(message)}", highlight=False, soft_wrap=True)


def _usage_message(err: typer.TyperException) -> str:
    """One line for a mistyped command line: click's own message and where the help is."""
    ctx = getattr(err, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"{err.format_message()}{hint}"


def _os_message(err: OSError) -> str:
    """One line for an operating-system error: the path and the problem, not the call stack."""
    problem = err.strerror or str(err)
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {problem}" if paths else problem


def _seeds(text: str | None) -> tuple[int, ...]:
    """--seeds: comma-separated seeds, as the API's ``seeds`` (default 0..4)."""
    from .errors import ConfigError

    if text is None:
        return (0, 1, 2, 3, 4)
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integer seeds, e.g. 0,1,2; got {text!r}") from None
    return seeds


def print_fit_record(report: dict) -> None:
    """One line per fact the method recorded about the run's fit (e.g. Leopart's community detection)."""
    for name, value in report.get("fit_record", {}).items():
        out.print(f"{name.replace('_', ' ')}: {value}", highlight=False)
