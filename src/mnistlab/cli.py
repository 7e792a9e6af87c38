"""The `mnistlab` command. Thin: parse, call the Python API (mnistlab.api), print.

A user mistake (MnistlabError) is one `error: ...` line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mnistlab.errors import MnistlabError

app = typer.Typer(
    help="Run, compare and trust small-network experiments on MNIST-format image data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Download, verify and check data sources.", no_args_is_help=True)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Turn a MnistlabError into one line on stderr and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MnistlabError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            typer.echo(_interrupted(func.__name__, exc), err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _interrupted(command: str, exc: KeyboardInterrupt) -> str:
    """What Ctrl-C leaves behind, truthfully: the training state the engine saved (its
    `Interrupted` carries the path) and the run directory to resume (the pipeline attaches it),
    where these exist."""
    state = getattr(exc, "state_path", None)
    run_dir = getattr(exc, "run_dir", None)
    saved = f"; training state saved in {state}" if state else ""
    if run_dir is None or command not in ("study", "train", "sweep"):
        return f"interrupted{saved}"
    return f"interrupted{saved}; continue with `mnistlab {command} --resume {run_dir}`"


DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", help="A dataset name (mnist, fashion-mnist) or a path: IDX folder, CSV, NPZ."
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps.")
]
EpochsOpt = Annotated[int | None, typer.Option(help="Epochs per run (default 10).")]
OutOpt = Annotated[Path, typer.Option(help="Folder that receives the run directory.")]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(help="Finish an interrupted run directory; ends with the same numbers."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print no progress.")]


def _progress(verbose: bool, quiet: bool) -> Any:
    from mnistlab.progress import Progress

    return Progress(verbose=verbose, quiet=quiet)


def _finished(results: Any) -> None:
    from mnistlab.report.table import format_summary

    typer.echo(format_summary(results.raw))
    typer.echo(f"results: {results.path}  report: {results.report_path}")


@app.command()
@user_errors
def study(
    config: Annotated[
        Path | None, typer.Option(help="A study TOML (runs, seeds, schedule, data).")
    ] = None,
    data: DataOpt = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per configuration (default 3).")] = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs"),
    resume: ResumeOpt = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print the log line every log_every steps.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the seed study (five configurations × seeds) or --config's: curves, stats, report."""
    import mnistlab as ml

    _finished(ml.study(config, data=data, seeds=seeds, epochs=epochs, device=device, out=out,
                       resume=resume, progress=_progress(verbose, quiet)))


@app.command()
@user_errors
def train(
    config: Annotated[
        Path | None, typer.Option(help="A run TOML: RunConfig fields and a schedule table.")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Name of the run (default: what it changes).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 0.01).")] = None,
    dropout: Annotated[
        float | None, typer.Option(help="Dropout p after the chosen hidden layers.")
    ] = None,
    layernorm: Annotated[
        bool | None, typer.Option("--layernorm/--no-layernorm", help="LayerNorm after each "
                                  "hidden layer.")
    ] = None,
    hidden: Annotated[str | None, typer.Option(help="Hidden sizes, comma separated.")] = None,
    activation: Annotated[str | None, typer.Option(help="relu, gelu or tanh.")] = None,
    dropout_after: Annotated[
        str | None, typer.Option(help="Hidden layers (1-based) followed by dropout.")
    ] = None,
    beta1: float | None = None,
    beta2: float | None = None,
    eps: float | None = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="L2 penalty (torch.optim.Adam semantics).")
    ] = None,
    input_norm: Annotated[
        str | None, typer.Option(help="scale (to 0..1) or standardize.")
    ] = None,
    batch_size: int | None = None,
    epochs: EpochsOpt = None,
    record_every: int | None = None,
    log_every: int | None = None,
    drop_last: Annotated[
        bool | None, typer.Option("--drop-last/--keep-last", help="Drop the last partial batch "
                                  "of each epoch.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for init, batch order and dropout (default 0).")
    ] = None,
    data: DataOpt = None,
    val_fraction: float | None = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs"),
    resume: ResumeOpt = None,
    verbose: Annotated[
        bool, typer.Option("--verbose/--no-verbose", "-v", help="Print the log line every "
                           "log_every steps.")
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Train one configuration with one seed; results land in a run directory. Options given
    here override --config's values."""
    import mnistlab as ml

    betas = None
    if beta1 is not None or beta2 is not None:
        from mnistlab.config import RunConfig

        default = RunConfig().betas
        betas = (default[0] if beta1 is None else beta1, default[1] if beta2 is None else beta2)
    options = {
        "name": name, "lr": lr, "dropout": dropout, "layernorm": layernorm,
        "hidden": _ints(hidden, "--hidden"), "activation": activation,
        "dropout_after": _ints(dropout_after, "--dropout-after"), "betas": betas, "eps": eps,
        "weight_decay": weight_decay, "input_norm": input_norm, "batch_size": batch_size,
        "epochs": epochs, "record_every": record_every, "log_every": log_every,
        "drop_last": drop_last, "val_fraction": val_fraction, "device": device,
    }
    given = {k: v for k, v in options.items() if v is not None}
    _finished(ml.train(config, data=data, seed=seed, out=out, resume=resume,
                       progress=_progress(verbose, quiet), **given))


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MnistlabError(
            f"{option} {text!r}: expected comma-separated integers, e.g. 150,150"
        ) from None


@data_app.command("fetch")
@user_errors
def data_fetch(
    name: Annotated[str, typer.Argument(help="mnist or fashion-mnist.")],
    dest: Annotated[
        Path | None, typer.Option(help="Folder to download into (default: the cache).")
    ] = None,
) -> None:
    """Download a named dataset, verify its checksums, and say where it is."""
    from mnistlab.data.sources import fetch

    typer.echo(f"{name}: verified in {fetch(name, dest)}")


@data_app.command("check")
@user_errors
def data_check(
    source: Annotated[str, typer.Argument(help="A dataset name or a path: IDX folder, CSV, NPZ.")],
) -> None:
    """Validate a data source and print its summary (rows, classes, pixel range, nulls)."""
    from mnistlab.data import describe, load

    typer.echo(describe(load(source, download=False)))


@app.command()
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by study/train/sweep.")],
) -> None:
    """Re-render plots, TensorBoard files and report.html from a run directory alone."""
    import mnistlab as ml

    typer.echo(f"report: {ml.render(run_dir)}")


@app.command()
@user_errors
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory or a .safetensors checkpoint.")],
    data: DataOpt = None,
    run: Annotated[
        str | None, typer.Option(help="A configuration of the run directory (default: winner).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="One seed's model (default: all the seeds).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the confusion/misclassified PNGs.")
    ] = None,
) -> None:
    """Test accuracy, per-class precision/recall, confusion matrix, worst errors.

    A run directory's winner (chosen on validation) over all its seeds, or one model with
    --run/--seed, from its stored test predictions (no data needed); with --data, its
    checkpoints are scored on that source instead.
    """
    import mnistlab as ml
    from mnistlab.report.table import format_evaluation

    scored = ml.evaluate(target, data=data, run=run, seed=seed, plots=out)
    lines = [f"model: {scored.model}", f"data: {scored.data}"]
    lines += [scored.note] if scored.note else []
    if len(scored.per_seed) > 1:
        each = ", ".join(f"seed {s}: {a:.4f}" for s, a in scored.per_seed.items())
        lines += [f"mean over {len(scored.per_seed)} seeds ({each}); the confusion matrix is "
                  "summed over them, the errors are the shown seed's"]
    lines += [format_evaluation(scored.evaluation, scored.classes)]
    lines += [f"wrote {p}" for p in scored.plots]
    typer.echo("\n".join(lines))


@app.command()
@user_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors model checkpoint.")],
    images: Annotated[list[Path] | None, typer.Argument(help="PNG/JPEG/BMP files.")] = None,
    csv: Annotated[
        Path | None, typer.Option(help="A CSV of images (any layout mnistlab reads).")
    ] = None,
    submission: Annotated[
        Path | None, typer.Option(help="Write a Kaggle ImageId,Label CSV.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Predict digits in image files, or a whole CSV into a Kaggle submission."""
    from mnistlab.inference import predict_command

    text, code = predict_command(checkpoint, list(images or []), csv, submission, as_json)
    typer.echo(text)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors model checkpoint.")],
    onnx: Annotated[Path, typer.Option(help="Where to write the ONNX model.")],
) -> None:
    """Export a model to ONNX (dynamic batch), verified against PyTorch with onnxruntime."""
    from mnistlab.export import export_command

    typer.echo(export_command(checkpoint, onnx))


@app.command()
@user_errors
def sweep(
    grid: Annotated[
        Path | None, typer.Option(help="A sweep TOML: a base table, grid and random tables.")
    ] = None,
    random: Annotated[
        int | None, typer.Option("--random", help="Sample N configurations from [random] ranges.")
    ] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per configuration.")] = None,
    stack_size: Annotated[
        int | None, typer.Option(help="Models per engine stack (default: from free memory).")
    ] = None,
    halving: Annotated[
        bool, typer.Option("--halving", help="Successive halving: keep the best third per rung.")
    ] = False,
    ray_address: Annotated[
        str | None, typer.Option(help="Run the stacks on a Ray cluster: auto or HOST:PORT.")
    ] = None,
    data: DataOpt = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs"),
    resume: ResumeOpt = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print the log line every log_every steps.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Sweep a grid or random sample of configurations × seeds, here or on a Ray cluster."""
    import mnistlab as ml
    from mnistlab.report.sweep import top_text

    results = ml.sweep(grid, random=random, seeds=seeds, stack_size=stack_size,
                       halving=halving or None, ray_address=ray_address, data=data,
                       epochs=epochs, device=device, out=out, resume=resume,
                       progress=_progress(verbose, quiet))
    typer.echo(top_text(results.raw))
    typer.echo(f"results: {results.path}  report: {results.report_path}")


def main() -> None:
    app(prog_name="mnistlab")


if __name__ == "__main__":
    sys.exit(main())
