"""The `mnistlab` command: parse, call, print. study, train, sweep, evaluate, report and compare
call the Python API (mnistlab.api); data, predict and export call their modules' own functions
(mnistlab.data, .inference, .export), and the text printed comes from mnistlab.report.table.

A user mistake (MnistlabError) is one `error: ...` line on stderr and exit code 2,
never a traceback. Help is plain Click text (rich_markup_mode=None): it renders exactly as
written, so `[grid]` stays `[grid]` (Rich would read it as a style tag and drop it), and
`--help` needs no Rich import.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

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
                    "mnistlab evaluate runs/seed-study-20250101-120000",
                    "mnistlab compare runs/study-a runs/study-b"),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    **PLAIN,
)
data_app = typer.Typer(
    help="Download, verify and check data sources.",
    epilog=examples("mnistlab data list", "mnistlab data fetch mnist",
                    "mnistlab data check path/to/train.csv"),
    no_args_is_help=True,
    **PLAIN,
)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        from mnistlab._version import __version__

        _say(f"mnistlab {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print mnistlab's version and exit.")] = False,
) -> None:
    """The options of `mnistlab` itself, before any command."""


# Characters that move the cursor, recolour or rewrite the terminal, or reorder the text shown:
# C0 and C1 controls but newline and tab, and the Unicode bidirectional/zero-width marks.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` safe to print on a terminal: each unsafe character as its Python escape (`\\x1b`),
    so a class name, file name or message from a file can neither hide nor forge output."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _say(text: str, err: bool = False) -> None:
    """Everything the CLI prints goes through here: `printable`, on stdout or stderr."""
    typer.echo(printable(text), err=err)


def user_errors(func: F) -> F:
    """Turn a MnistlabError into one line on stderr and its exit code; Ctrl-C into exit 130; an
    OSError that no reader or writer worded (a file the OS refused) into one line naming the
    file and the errno's meaning, exit 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MnistlabError as exc:
            _say(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            where = exc.filename or func.__name__
            meaning = os.strerror(exc.errno) if exc.errno else str(exc)
            _say(f"error: {where}: {meaning}; check the path, its permissions and free space",
                 err=True)
            raise typer.Exit(MnistlabError.exit_code) from None
        except KeyboardInterrupt as exc:
            _say(_interrupted(func.__name__, exc), err=True)
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


DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def _device(value: str) -> str:
    """auto, cpu, cuda, mps, or an indexed device such as cuda:1: a choice Click checks at the
    command line, which a plain Choice could not be for the indexed ones."""
    kind, _, index = value.partition(":")
    if kind in DEVICE_KINDS and (not index or (kind != "auto" and index.isdigit())):
        return value
    from mnistlab.suggest import did_you_mean

    raise typer.BadParameter(f"{value!r} is not a device{did_you_mean(kind, DEVICE_KINDS)}; "
                             "use auto, cpu, cuda, mps or cuda:N")


DeviceOpt = Annotated[
    str | None, typer.Option(parser=_device, metavar="[auto|cpu|cuda|mps|cuda:N]",
                             show_default="auto",
                             help="Where to train: auto (CUDA, then MPS, then CPU), cpu, cuda "
                             "(or cuda:1, ...) or mps.")
]
EpochsOpt = Annotated[int | None, typer.Option(help="Epochs per run.", show_default="10")]
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
ReportOpt = Annotated[
    bool, typer.Option("--report/--no-report", help="Draw the plots and write report.html; "
                       "`mnistlab report RUN_DIR` draws them later.")
]


def _progress(verbose: bool, quiet: bool) -> Any:
    from mnistlab.progress import Progress

    return Progress(verbose=verbose, quiet=quiet)


def _drawing(report: bool) -> contextlib.AbstractContextManager[None]:
    """With `report`, the processes that will draw the report's figures (mnistlab.report.workers),
    started before the API is imported: they get ready while this one loads PyTorch and data."""
    if not report:
        return contextlib.nullcontext()
    from mnistlab.report.workers import started

    return started()


def _finished(results: Any, text: str, report: bool) -> None:
    """Print the results (`text`) and where they are, then render the report: the results wait
    for no figure, and the report is whole when the command returns."""
    _say(text)
    _say(f"results: {results.path}" + (f"  report: {results.report_path}" if report else ""))
    if report:
        import mnistlab as ml

        ml.render(results.path)


def study_table(results: Any) -> str:
    from mnistlab.report.table import format_summary

    return format_summary(results.raw)


def fit_summary(results: Any) -> str:
    """How a single `train` ends: its model's final train/val/test loss and accuracy, and where
    its checkpoint is (a one-model run has no study table)."""
    from mnistlab.report.table import format_fit

    (run,) = results.raw["runs"]
    return format_fit(results.raw, results.run_dir.model_path(run["run"], run["seed"]))


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
    seeds: Annotated[
        int | None, typer.Option(help="Seeds per configuration.", show_default="3")
    ] = None,
    epochs: EpochsOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs"),
    resume: ResumeOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    report: ReportOpt = True,
) -> None:
    """Run the seed study, or the configurations of a study TOML.

    Every configuration (the seed study's five, or --config's) trains with each seed, all at
    once; then curves, statistics and report.html land in a run directory.
    """
    with _drawing(report):
        import mnistlab as ml

        results = ml.study(config, data=data, seeds=seeds, epochs=epochs, device=device, out=out,
                           resume=resume, progress=_progress(verbose, quiet), report=False)
        _finished(results, study_table(results), report)


@app.command(epilog=examples(
    "mnistlab train --lr 0.001 --dropout 0.2 --layernorm",
    "mnistlab train --hidden 300,300 --activation gelu --epochs 20 --seed 1",
    "mnistlab train --config run.toml --lr 0.0005 --no-verbose",
    "mnistlab train --preset tuned --data fashion-mnist",
    "mnistlab train --preset lenet5 --epochs 1",
    "mnistlab train --lr 0.003 --lr-schedule onecycle --translate 2",
))
@user_errors
def train(
    config: Annotated[
        Path | None, typer.Option(help="A run TOML: RunConfig fields (lr, dropout, layernorm, "
                                  "hidden, ...), seed, data and a [schedule] table.")
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Start from a preset instead of --config: baseline, "
                                 "layernorm-dropout, lr1e-3-p0.2, lr5e-4-p0.4, lr1e-4-p0.6, "
                                 "tuned or lenet5 (a CNN).")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="The network: mlp, lenet5, or a factory "
                                 "'package.module:function' returning a torch.nn.Module.",
                                 show_default="mlp")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Name of the run.", show_default="what it changes")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Adam's learning rate.", show_default="0.01")
    ] = None,
    dropout: Annotated[
        float | None, typer.Option(help="Dropout p after the chosen hidden layers.")
    ] = None,
    layernorm: Annotated[
        bool | None, typer.Option("--layernorm/--no-layernorm", help="LayerNorm after each "
                                  "hidden layer.")
    ] = None,
    hidden: Annotated[str | None, typer.Option(help="Hidden sizes, comma separated.")] = None,
    activation: Annotated[
        Literal["relu", "gelu", "tanh"] | None,
        typer.Option(show_default="relu", help="The hidden layers' activation.")
    ] = None,
    dropout_after: Annotated[
        str | None, typer.Option(help="Hidden layers (1-based) followed by dropout.")
    ] = None,
    beta1: Annotated[
        float | None, typer.Option(help="Adam's decay rate of the gradient's running mean.",
                                   show_default="0.9")
    ] = None,
    beta2: Annotated[
        float | None, typer.Option(help="Adam's decay rate of the squared gradient's running "
                                   "mean.", show_default="0.999")
    ] = None,
    eps: Annotated[
        float | None, typer.Option(help="Adam's epsilon, added to the denominator.",
                                   show_default="1e-08")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="L2 penalty (torch.optim.Adam semantics).")
    ] = None,
    input_norm: Annotated[
        Literal["scale", "standardize"] | None,
        typer.Option(show_default="scale", help="Pixels scaled to 0..1, or standardized with the "
                                 "training set's mean and std.")
    ] = None,
    lr_schedule: Annotated[
        Literal["constant", "cosine", "onecycle"] | None,
        typer.Option(show_default="constant",
                                 help="The learning rate over training: constant, cosine (to 0) "
                                 "or onecycle (OneCycleLR, --lr its peak).")
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
    batch_size: Annotated[
        int | None, typer.Option(help="Images per training step.", show_default="128")
    ] = None,
    epochs: EpochsOpt = None,
    record_every: Annotated[
        int | None, typer.Option(help="Iterations between records (training loss and "
                                 "accuracy since the last, validation loss and accuracy).",
                                 show_default="75")
    ] = None,
    log_every: Annotated[
        int | None, typer.Option(help="Iterations between log lines (with --verbose).",
                                 show_default="250")
    ] = None,
    drop_last: Annotated[
        bool | None, typer.Option("--drop-last/--keep-last", help="Drop the last partial batch "
                                  "of each epoch.")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed for init, batch order and dropout.",
                                 show_default="0")
    ] = None,
    data: DataOpt = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of the training images held out for "
                                   "validation (stratified).", show_default="0.2")
    ] = None,
    device: DeviceOpt = None,
    out: OutOpt = Path("runs"),
    resume: ResumeOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose/--no-verbose", "-v", help=VERBOSE)] = True,
    quiet: QuietOpt = False,
    report: ReportOpt = True,
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
        "name": name, "model": model, "lr": lr, "dropout": dropout, "layernorm": layernorm,
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
    with _drawing(report):
        results = ml.train(config, preset=preset, data=data, seed=seed, out=out, resume=resume,
                           progress=_progress(verbose, quiet), report=False, **given)
        one = len(results.raw["runs"]) == 1  # else a run TOML's runs: trained like a study
        _finished(results, fit_summary(results) if one else study_table(results), report)


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
    name: Annotated[str, typer.Argument(help="A dataset name: see `mnistlab data list`.")],
    dest: Annotated[
        Path | None, typer.Option(help="Folder to download into.", show_default="the cache, or "
                                  "a verified system copy such as Debian's")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show no download bars.")] = False,
) -> None:
    """Download a named dataset and verify its checksums.

    Files already there and verified are kept; prints the folder that holds them.
    """
    from mnistlab.data.sources import fetch

    _say(f"{name}: verified in {fetch(name, dest, progress=not quiet)}")


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
    from mnistlab.data import load, overview

    _say(overview(load(source, download=False)))


@data_app.command("list", epilog=examples("mnistlab data list"))
@user_errors
def data_list() -> None:
    """List the named datasets: classes, train/test sizes, where each comes from, and the
    folder holding it here (the cache or a system copy such as Debian's), or "no".

    A folder is listed when it holds every file; `mnistlab data check NAME` verifies them.
    """
    from mnistlab.data.sources import REGISTRY, cached, origin

    rows = [("name", "classes", "train", "test", "from", "here")]
    for name, info in REGISTRY.items():
        train, test = info.sizes
        rows.append((name, str(len(info.classes)), f"{train:,}", f"{test:,}", origin(info),
                     str(cached(name) or "no")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.rjust(w) if 0 < i < 4 else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=False))]
        _say("  ".join([*cells, row[-1]]))


@app.command(epilog=examples("mnistlab report runs/seed-study-20250101-120000"))
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by study/train/sweep.")],
) -> None:
    """Re-render a run directory's plots and report.html.

    Also its TensorBoard files; from the run directory's own files, with no data set or network.
    """
    import mnistlab as ml

    with _drawing(True):
        _say(f"report: {ml.render(run_dir)}")


@app.command(epilog=examples(
    "mnistlab evaluate runs/seed-study-20250101-120000",
    "mnistlab evaluate runs/study-20250101-120000 --run baseline --seed 1 --json",
    "mnistlab evaluate model.safetensors --data fashion-mnist --out plots/",
))
@user_errors
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory or a .safetensors checkpoint.")],
    data: DataOpt = None,
    run: Annotated[
        str | None, typer.Option(help="A configuration of the run directory.",
                                 show_default="the winner")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="One seed's model.", show_default="all the seeds")
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
    _say(json.dumps(scored.record(), indent=2) if as_json else _evaluation_text(scored))


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


RunOpt = Annotated[
    str | None, typer.Option(help="With a run directory: its configuration whose model to use.",
                             show_default="the winner")
]
SeedOpt = Annotated[
    int | None, typer.Option(help="With a run directory: the seed of that model.",
                             show_default="the winner's shown seed, else the first")
]


@app.command(epilog=examples(
    "mnistlab predict runs/seed-study-20250101-120000 digit.png",
    "mnistlab predict model.safetensors digit.png scan.jpg",
    "mnistlab predict model.safetensors digits/ --json",
    "mnistlab predict model.safetensors 'scans/*.png' --save preds.csv",
    "mnistlab predict model.safetensors --csv test.csv",
    "mnistlab predict model.safetensors --csv test.csv --submission sub.csv",
))
@user_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="MODEL",
        help="A run directory (its winner's model, or --run/--seed's) or a .safetensors model "
             "checkpoint, e.g. RUN_DIR/checkpoints/baseline-seed0.safetensors.")],
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
    save: Annotated[
        Path | None, typer.Option(help="Write the predictions to this CSV file instead of "
                                  "printing them: path, then label, index and probability of "
                                  "the top 3, then error.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: per image its path, label (the class as "
                           "named, a string), index (an int), top3 (label, index, probability) "
                           "and error.")
    ] = False,
    run: RunOpt = None,
    seed: SeedOpt = None,
    out: Annotated[Path | None, typer.Option(hidden=True)] = None,  # --save's old name
) -> None:
    """Predict the class of images, or of a CSV's rows.

    Prints one line per image: its class and the top 3 with probabilities. An image that
    cannot be read gets an error line on stderr, the others go on; the exit code is then 2.
    """
    from mnistlab.api import checkpoint_path
    from mnistlab.inference import predict_command

    text, errors = predict_command(checkpoint_path(checkpoint, run, seed), images or [], csv,
                                   submission, as_json, save or out)
    if text:
        _say(text)
    for error in errors:
        _say(f"error: {error}", err=True)
    if errors:
        raise typer.Exit(MnistlabError.exit_code)


@app.command(epilog=examples(
    "mnistlab export model.safetensors --onnx model.onnx",
    "mnistlab export runs/seed-study-20250101-120000 --onnx winner.onnx",
    "mnistlab export runs/sweep-20250101 --run lr1e-3 --seed 1 --onnx a.onnx",
))
@user_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="MODEL", help="A run directory (its winner's model, or --run/--seed's) or a "
                              ".safetensors model checkpoint.")],
    onnx: Annotated[Path, typer.Option(help="Where to write the ONNX model.")],
    run: RunOpt = None,
    seed: SeedOpt = None,
) -> None:
    """Export a model to ONNX, verified against PyTorch.

    The batch size is dynamic; onnxruntime's outputs are checked against PyTorch's.
    """
    from mnistlab.api import checkpoint_path
    from mnistlab.export import export_command

    _say(export_command(checkpoint_path(checkpoint, run, seed), onnx))


@app.command(epilog=examples(
    "mnistlab sweep --config sweep.toml",
    "mnistlab sweep --config sweep.toml --random 20 --halving",
    "mnistlab sweep --config sweep.toml --seeds 5 --ray-address auto",
))
@user_errors
def sweep(
    config: Annotated[
        Path | None, typer.Option(help="A sweep TOML: name, data, seeds, base (a preset name or "
                                  "a table of RunConfig fields), [schedule], [grid] lists and "
                                  "[random] ranges (format: README).")
    ] = None,
    random: Annotated[
        int | None, typer.Option("--random", help="Sample N configurations from the [random] "
                                 "ranges (and [grid] lists) instead of the whole grid.")
    ] = None,
    seeds: Annotated[
        int | None, typer.Option(help="Seeds per configuration.", show_default="the TOML's")
    ] = None,
    stack_size: Annotated[
        int | None, typer.Option(help="Models per engine stack.",
                                 show_default="as many as free memory holds")
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
    report: ReportOpt = True,
    grid: Annotated[Path | None, typer.Option(hidden=True)] = None,  # --config's old name
) -> None:
    """Sweep a grid or a random sample of configurations × seeds.

    In this process, or on a Ray cluster with --ray-address. The sweep TOML's format is in the
    README ("Sweeps").
    """
    import mnistlab as ml

    if config is not None and grid is not None:
        raise MnistlabError("sweep: --grid is the old name of --config; pass one of them")
    with _drawing(report):
        results = ml.sweep(config or grid, random=random, seeds=seeds, stack_size=stack_size,
                           halving=halving or None, ray_address=ray_address, data=data,
                           epochs=epochs, device=device, out=out, resume=resume,
                           progress=_progress(verbose, quiet), report=False)
        from mnistlab.report.sweep import top_text

        _finished(results, top_text(results.raw), report)


@app.command(epilog=examples(
    "mnistlab compare runs/study-a runs/study-b",
    "mnistlab compare runs/seed-study-* --out comparisons/",
))
@user_errors
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR...", help="Two or more run directories made by study/train/sweep.")],
    out: Annotated[Path, typer.Option(help="Folder that receives the comparison page.")
                   ] = Path("runs"),
) -> None:
    """Compare the configurations of several run directories side by side.

    With the hyperparameters that differ as columns, the same configuration's rows together,
    and paired statistics (bootstrap, Holm, McNemar) for runs tested on the same images; runs
    tested on other images are shown but not paired. Writes an HTML page like the report.
    """
    import mnistlab as ml

    comparison = ml.compare(*run_dirs)
    _say(comparison.text())
    _say(f"page: {comparison.write(out)}")


def main() -> None:
    app(prog_name="mnistlab")


if __name__ == "__main__":
    sys.exit(main())
