"""The `mnistlab` command. Thin: parse, call the Python API (mnistlab.api), print.

A user mistake (MnistlabError) is one `error: ...` line on stderr and exit code 2,
never a traceback. Help is plain Click text (rich_markup_mode=None): it renders exactly as
written, so `[grid]` stays `[grid]` (Rich would read it as a style tag and drop it), and
`--help` needs no Rich import.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from mnistlab.errors import MnistlabError

if TYPE_CHECKING:
    from mnistlab.api import Scored


def examples(*lines: str) -> str:
    """A command's "Examples:" block (its help's epilog); the \\b line tells Click to keep the
    line breaks, where it rewraps every other paragraph."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


PLAIN = {"rich_markup_mode": None, "context_settings": {"help_option_names": ["-h", "--help"]}}
app = typer.Typer(
    help="Run, compare and trust small-network experiments on MNIST-format image data.",
    epilog=examples("mnistlab study", "mnistlab study --data fashion-mnist --seeds 5",
                    "mnistlab train --lr 0.001 --dropout 0.2 --layernorm",
                    "mnistlab evaluate runs/seed-study-20250101-120000"),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    **PLAIN,
)
data_app = typer.Typer(
    help="Download, verify and check data sources.",
    epilog=examples("mnistlab data fetch mnist", "mnistlab data check path/to/train.csv"),
    no_args_is_help=True,
    **PLAIN,
)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        from mnistlab._version import __version__

        typer.echo(f"mnistlab {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print mnistlab's version and exit.")] = False,
) -> None:
    """The options of `mnistlab` itself, before any command."""


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
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print no progress, only the results.")
]
VERBOSE = ("Also print, per configuration, a Keras-style line at the end of each epoch (loss, "
           "acc, val_loss, val_acc) and the log line every log_every iterations.")
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE)]


def _progress(verbose: bool, quiet: bool) -> Any:
    from mnistlab.progress import Progress

    return Progress(verbose=verbose, quiet=quiet)


def _finished(results: Any) -> None:
    from mnistlab.report.table import format_summary

    typer.echo(format_summary(results.raw))
    typer.echo(f"results: {results.path}  report: {results.report_path}")


@app.command(epilog=examples(
    "mnistlab study",
    "mnistlab study --data fashion-mnist --seeds 5 --epochs 20",
    "mnistlab study --config study.toml --device cuda -q",
    "mnistlab study --resume runs/seed-study-20250101-120000",
))
@user_errors
def study(
    config: Annotated[
        Path | None, typer.Option(help="A study TOML: name, data, seeds (a count or a list), "
                                  "runs (preset names or tables of RunConfig fields) and a "
                                  "[schedule] table.")
    ] = None,
    data: DataOpt = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per configuration (default 3).")] = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs"),
    resume: ResumeOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the seed study, or the configurations of a study TOML.

    Every configuration (the seed study's five, or --config's) trains with each seed, all at
    once; then curves, statistics and report.html land in a run directory.
    """
    import mnistlab as ml

    _finished(ml.study(config, data=data, seeds=seeds, epochs=epochs, device=device, out=out,
                       resume=resume, progress=_progress(verbose, quiet)))


@app.command(epilog=examples(
    "mnistlab train --lr 0.001 --dropout 0.2 --layernorm",
    "mnistlab train --hidden 300,300 --activation gelu --epochs 20 --seed 1",
    "mnistlab train --config run.toml --lr 0.0005 --no-verbose",
    "mnistlab train --preset tuned --data fashion-mnist",
    "mnistlab train --lr 0.003 --lr-schedule onecycle --label-smoothing 0.1 --translate 2",
))
@user_errors
def train(
    config: Annotated[
        Path | None, typer.Option(help="A run TOML: RunConfig fields (lr, dropout, layernorm, "
                                  "hidden, ...), seed, data and a [schedule] table.")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Start from a preset instead of --config: baseline, "
                                 "layernorm-dropout, lr1e-3-p0.2, lr5e-4-p0.4, lr1e-4-p0.6 or "
                                 "tuned.")
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
    lr_schedule: Annotated[
        str | None, typer.Option(help="constant, cosine (to 0) or onecycle (OneCycleLR, --lr "
                                 "its peak).")
    ] = None,
    warmup: Annotated[
        float | None, typer.Option(help="Fraction of the steps spent warming up (onecycle: its "
                                   "rise, pct_start).")
    ] = None,
    decoupled_decay: Annotated[
        float | None, typer.Option(help="Decoupled weight decay (torch.optim.AdamW's).")
    ] = None,
    label_smoothing: Annotated[
        float | None, typer.Option(help="Label smoothing of the loss, e.g. 0.1.")
    ] = None,
    translate: Annotated[
        int | None, typer.Option(help="Augment: shift each image by up to this many pixels.")
    ] = None,
    rotate: Annotated[
        float | None, typer.Option(help="Augment: rotate each image by up to this many degrees.")
    ] = None,
    zoom: Annotated[
        float | None, typer.Option(help="Augment: zoom each image by a factor in 1 +- zoom.")
    ] = None,
    restore_best: Annotated[
        bool | None, typer.Option("--restore-best/--last-weights", help="End with the weights of "
                                  "the best validation record.")
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="Stop after this many records without a better "
                                 "validation accuracy (0: never).")
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
        bool, typer.Option("--verbose/--no-verbose", "-v", help=f"{VERBOSE} On by default.")
    ] = True,
    quiet: QuietOpt = False,
) -> None:
    """Train one configuration with one seed.

    The results land in a run directory, as a study's do. Options given here override
    --config's values.
    """
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
        "weight_decay": weight_decay, "input_norm": input_norm, "lr_schedule": lr_schedule,
        "warmup": warmup, "decoupled_decay": decoupled_decay, "label_smoothing": label_smoothing,
        "translate": translate, "rotate": rotate, "zoom": zoom, "restore_best": restore_best,
        "patience": patience, "batch_size": batch_size,
        "epochs": epochs, "record_every": record_every, "log_every": log_every,
        "drop_last": drop_last, "val_fraction": val_fraction, "device": device,
    }
    given = {k: v for k, v in options.items() if v is not None}
    _finished(ml.train(config, preset=preset, data=data, seed=seed, out=out, resume=resume,
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


@data_app.command("fetch", epilog=examples(
    "mnistlab data fetch mnist", "mnistlab data fetch fashion-mnist --dest data/ -q"))
@user_errors
def data_fetch(
    name: Annotated[str, typer.Argument(help="mnist or fashion-mnist.")],
    dest: Annotated[
        Path | None, typer.Option(help="Folder to download into (default: the cache).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show no download bars.")] = False,
) -> None:
    """Download a named dataset and verify its checksums.

    Files already there and verified are kept; prints the folder that holds them.
    """
    from mnistlab.data.sources import fetch

    typer.echo(f"{name}: verified in {fetch(name, dest, progress=not quiet)}")


@data_app.command("check", epilog=examples(
    "mnistlab data check mnist", "mnistlab data check path/to/train.csv",
    "mnistlab data check path/to/mnist/"))
@user_errors
def data_check(
    source: Annotated[str, typer.Argument(help="A dataset name or a path: IDX folder, CSV, NPZ.")],
) -> None:
    """Validate a data source and print its summary.

    Rows, classes, pixel range and nulls; or the first problem, with its file and place (line
    and column, or byte offset).
    """
    from mnistlab.data import describe, load

    typer.echo(describe(load(source, download=False)))


@app.command(epilog=examples("mnistlab report runs/seed-study-20250101-120000"))
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by study/train/sweep.")],
) -> None:
    """Re-render a run directory's plots and report.html.

    Also its TensorBoard files; from the run directory's own files, with no data set or network.
    """
    import mnistlab as ml

    typer.echo(f"report: {ml.render(run_dir)}")


@app.command(epilog=examples(
    "mnistlab evaluate runs/seed-study-20250101-120000",
    "mnistlab evaluate runs/seed-study-20250101-120000 --run baseline --seed 1 --json",
    "mnistlab evaluate model.safetensors --data fashion-mnist --out plots/",
))
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
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead: model, data, "
                           "accuracy, loss, per-class precision/recall/F1/support and their "
                           "macro averages, confusion matrix, per-seed accuracies, worst errors "
                           "(without images), plots written.")
    ] = False,
) -> None:
    """Test accuracy, per-class scores, confusion matrix, worst errors.

    Per class: precision, recall, F1 and support, with their macro averages. A run
    directory's winner (chosen on validation) over all its seeds, or one model with
    --run/--seed, from its stored test predictions (no data needed); with --data, its
    checkpoints are scored on that source instead. A checkpoint file needs --data.
    """
    import json

    import mnistlab as ml

    scored = ml.evaluate(target, data=data, run=run, seed=seed, plots=out)
    typer.echo(json.dumps(scored.record(), indent=2) if as_json else _evaluation_text(scored))


def _evaluation_text(scored: Scored) -> str:
    """What `evaluate` prints: the model and data, the note, the per-seed accuracies, the
    tables, the plots written."""
    from mnistlab.report.table import format_evaluation

    lines = [f"model: {scored.model}", f"data: {scored.data}"]
    lines += [scored.note] if scored.note else []
    if len(scored.per_seed) > 1:
        each = ", ".join(f"seed {s}: {a:.4f}" for s, a in scored.per_seed.items())
        lines += [f"mean over {len(scored.per_seed)} seeds ({each}); the confusion matrix is "
                  "summed over them, the errors are the shown seed's"]
    lines += [format_evaluation(scored.evaluation, scored.classes)]
    lines += [f"wrote {p}" for p in scored.plots]
    return "\n".join(lines)


@app.command(epilog=examples(
    "mnistlab predict model.safetensors digit.png scan.jpg",
    "mnistlab predict model.safetensors digits/ --json",
    "mnistlab predict model.safetensors 'scans/*.png' --out preds.csv",
    "mnistlab predict model.safetensors --csv test.csv",
    "mnistlab predict model.safetensors --csv test.csv --submission submission.csv",
))
@user_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(
        help="A .safetensors model checkpoint, e.g. RUN_DIR/checkpoints/baseline-seed0"
             ".safetensors.")],
    images: Annotated[list[Path] | None, typer.Argument(
        metavar="IMAGES",
        help="Image files (PNG, JPEG, BMP, ...), folders (every image file in them, sorted) or "
             "glob patterns such as 'scans/*.png' (expanded here too, for shells that do not)."
    )] = None,
    csv: Annotated[
        Path | None, typer.Option(help="A CSV of images (any layout mnistlab reads) instead of "
                                  "files; its rows are named test.csv[0], test.csv[1], ...")
    ] = None,
    submission: Annotated[
        Path | None, typer.Option(help="With --csv: write a Kaggle ImageId,Label CSV instead.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the predictions to this CSV instead of printing "
                                  "them: path, then label, index and probability of the top "
                                  "3, then error.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: per image its path, label (the class as "
                           "named, a string), index (an int), top3 (label, index, probability) "
                           "and error.")
    ] = False,
) -> None:
    """Predict the class of images, or of a CSV's rows.

    Prints one line per image: its class and the top 3 with probabilities. An image that
    cannot be read gets an error line on stderr, the others go on; the exit code is then 2.
    """
    from mnistlab.inference import predict_command

    text, errors = predict_command(checkpoint, images or [], csv, submission, as_json, out)
    if text:
        typer.echo(text)
    for error in errors:
        typer.echo(f"error: {error}", err=True)
    if errors:
        raise typer.Exit(MnistlabError.exit_code)


@app.command(epilog=examples("mnistlab export model.safetensors --onnx model.onnx"))
@user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors model checkpoint.")],
    onnx: Annotated[Path, typer.Option(help="Where to write the ONNX model.")],
) -> None:
    """Export a model to ONNX, verified against PyTorch.

    The batch size is dynamic; onnxruntime's outputs are checked against PyTorch's.
    """
    from mnistlab.export import export_command

    typer.echo(export_command(checkpoint, onnx))


@app.command(epilog=examples(
    "mnistlab sweep --grid sweep.toml",
    "mnistlab sweep --grid sweep.toml --random 20 --halving",
    "mnistlab sweep --grid sweep.toml --seeds 5 --ray-address auto",
))
@user_errors
def sweep(
    grid: Annotated[
        Path | None, typer.Option(help="A sweep TOML: name, data, seeds, base (a preset name or "
                                  "a table of RunConfig fields), [schedule], [grid] lists and "
                                  "[random] ranges (format: README).")
    ] = None,
    random: Annotated[
        int | None, typer.Option("--random", help="Sample N configurations from the [random] "
                                 "ranges (and [grid] lists) instead of the whole grid.")
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
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Sweep a grid or a random sample of configurations × seeds.

    In this process, or on a Ray cluster with --ray-address. The sweep TOML's format is in the
    README ("Sweeps").
    """
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
