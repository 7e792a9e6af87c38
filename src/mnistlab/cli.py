"""The `mnistlab` command. Thin: parse, call one function, print.

A user mistake (MnistlabError) is one `error: ...` line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mnistlab.config import RunConfig, Schedule, StudyConfig, load_study, seed_study
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
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: state saved at the last checkpoint; rerun with --resume RUN_DIR",
                err=True,
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", help="A dataset name (mnist, fashion-mnist) or a path: IDX folder, CSV, NPZ."
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps.")
]
OutOpt = Annotated[Path, typer.Option(help="Folder that receives the run directory.")]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(help="Continue an interrupted run directory; ends with the same numbers."),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Print the log line every log_every steps.")
]


def _run(study: StudyConfig, out: Path, resume: Path | None, verbose: bool) -> None:
    from mnistlab.progress import StudyProgress
    from mnistlab.report.table import format_summary
    from mnistlab.study import run_study

    run_dir, summary = run_study(
        study, out=out, resume=resume, display=StudyProgress(verbose=verbose)
    )
    typer.echo(format_summary(summary))
    typer.echo(f"results: {run_dir.root}  report: {run_dir.report_path}")


def _schedule(base: Schedule, **changes: Any) -> Schedule:
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


@app.command()
@user_errors
def study(
    config: Annotated[
        Path | None, typer.Option(help="A study TOML (runs, seeds, schedule, data).")
    ] = None,
    data: DataOpt = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per configuration (default 3).")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per run (default 10).")] = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs"),
    resume: ResumeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the seed study (five configurations × seeds) or --config's: curves, stats, report."""
    base = load_study(config) if config else seed_study()
    changes: dict[str, Any] = {"schedule": _schedule(base.schedule, epochs=epochs)}
    if data is not None:
        changes["data"] = data
    if seeds is not None:
        changes["seeds"] = tuple(range(seeds))
    if device is not None:
        changes["device"] = device
    _run(dataclasses.replace(base, **changes), out, resume, verbose)


@app.command()
@user_errors
def train(
    config: Annotated[
        Path | None, typer.Option(help="A run TOML: RunConfig fields, [schedule].")
    ] = None,
    name: Annotated[str, typer.Option(help="Name of the run.")] = "run",
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 0.001,
    dropout: Annotated[float, typer.Option(help="Dropout p after the chosen hidden layers.")] = 0.0,
    layernorm: Annotated[bool, typer.Option(help="LayerNorm after each hidden layer.")] = False,
    hidden: Annotated[str, typer.Option(help="Hidden sizes, comma separated.")] = "150,150",
    activation: Annotated[str, typer.Option(help="relu, gelu or tanh.")] = "relu",
    dropout_after: Annotated[
        str, typer.Option(help="Hidden layers (1-based) followed by dropout.")
    ] = "2",
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: Annotated[
        float, typer.Option(help="L2 penalty (torch.optim.Adam semantics).")
    ] = 0.0,
    input_norm: Annotated[str, typer.Option(help="scale (to [0,1]) or standardize.")] = "scale",
    batch_size: int = 128,
    epochs: int = 10,
    record_every: int = 75,
    log_every: int = 250,
    drop_last: Annotated[
        bool, typer.Option(help="Drop the last partial batch of each epoch.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed for init, batch order and dropout.")] = 0,
    data: DataOpt = "mnist",
    val_fraction: float = 0.2,
    device: DeviceOpt = "auto",
    out: OutOpt = Path("runs"),
    resume: ResumeOpt = None,
    verbose: VerboseOpt = True,
) -> None:
    """Train one configuration with one seed; results land in a run directory."""
    if config is not None:
        from mnistlab.config import load_run_study

        study_config = load_run_study(config, data=data, seed=seed, device=device)
    else:
        run = RunConfig(
            name=name,
            lr=lr,
            dropout=dropout,
            layernorm=layernorm,
            hidden=_ints(hidden, "--hidden"),
            activation=activation,
            dropout_after=_ints(dropout_after, "--dropout-after"),
            betas=(beta1, beta2),
            eps=eps,
            weight_decay=weight_decay,
            input_norm=input_norm,
        )
        schedule = Schedule(batch_size, epochs, record_every, log_every, drop_last)
        study_config = StudyConfig(
            name=name,
            data=data or "mnist",
            runs=(run,),
            seeds=(seed,),
            schedule=schedule,
            val_fraction=val_fraction,
            device=device or "auto",
        )
    _run(study_config, out, resume, verbose)


def _ints(text: str, option: str) -> tuple[int, ...]:
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
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by study/train.")],
) -> None:
    """Re-render plots, TensorBoard files and report.html from a run directory alone."""
    from mnistlab.report import render
    from mnistlab.runs import RunDir

    typer.echo(f"report: {render(RunDir.existing(run_dir))}")


@app.command()
@user_errors
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory or a .safetensors checkpoint.")],
    data: DataOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the confusion/misclassified PNGs.")
    ] = None,
) -> None:
    """Test accuracy, per-class precision/recall, confusion matrix, worst errors."""
    from mnistlab.evaluate import evaluate_command

    typer.echo(evaluate_command(target, data, out))


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
    from mnistlab.predict import predict_command

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
        Path | None, typer.Option(help="A sweep TOML: base config, [grid], [random].")
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
    epochs: Annotated[int | None, typer.Option(help="Epochs per run.")] = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs"),
    resume: ResumeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Sweep a grid or random sample of configurations × seeds, here or on a Ray cluster."""
    from mnistlab.sweep import sweep_command

    typer.echo(
        sweep_command(
            grid,
            random=random,
            seeds=seeds,
            stack_size=stack_size,
            halving=halving,
            ray_address=ray_address,
            data=data,
            epochs=epochs,
            device=device,
            out=out,
            resume=resume,
            verbose=verbose,
        )
    )


def main() -> None:
    app(prog_name="mnistlab")


if __name__ == "__main__":
    sys.exit(main())
