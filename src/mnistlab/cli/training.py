"""The commands that train and look at what was trained: study, train, sweep, report, compare.
They call the Python API (mnistlab.api); the text printed comes from mnistlab.report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from mnistlab.cli.shell import (
    VERBOSE,
    DataOpt,
    DeviceOpt,
    EpochsOpt,
    OutOpt,
    QuietOpt,
    ReportOpt,
    ResumeOpt,
    VerboseOpt,
    app,
    drawing,
    examples,
    finished,
    progress,
    say,
    user_errors,
)
from mnistlab.errors import MnistlabError


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
    with drawing(report):
        import mnistlab as ml

        results = ml.study(config, data=data, seeds=seeds, epochs=epochs, device=device, out=out,
                           resume=resume, progress=progress(verbose, quiet), report=False)
        finished(results, study_table(results), report)



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
    with drawing(report):
        results = ml.train(config, preset=preset, data=data, seed=seed, out=out, resume=resume,
                           progress=progress(verbose, quiet), report=False, **given)
        one = len(results.raw["runs"]) == 1  # else a run TOML's runs: trained like a study
        finished(results, fit_summary(results) if one else study_table(results), report)



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
    with drawing(report):
        results = ml.sweep(config or grid, random=random, seeds=seeds, stack_size=stack_size,
                           halving=halving or None, ray_address=ray_address, data=data,
                           epochs=epochs, device=device, out=out, resume=resume,
                           progress=progress(verbose, quiet), report=False)
        from mnistlab.report.sweep import top_text

        finished(results, top_text(results.raw), report)



@app.command(epilog=examples("mnistlab report runs/seed-study-20250101-120000"))
@user_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory made by study/train/sweep.")],
) -> None:
    """Re-render a run directory's plots and report.html.

    Also its TensorBoard files; from the run directory's own files, with no data set or network.
    """
    import mnistlab as ml

    with drawing(True):
        say(f"report: {ml.render(run_dir)}")



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
    say(comparison.text())
    say(f"page: {comparison.write(out)}")



def study_table(results: Any) -> str:
    from mnistlab.report.table import format_summary

    return format_summary(results.raw)



def fit_summary(results: Any) -> str:
    """How a single `train` ends: its model's final train/val/test loss and accuracy, and where
    its checkpoint is (a one-model run has no study table)."""
    from mnistlab.report.table import format_fit

    (run,) = results.raw["runs"]
    return format_fit(results.raw, results.run_dir.model_path(run["run"], run["seed"]))



def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise MnistlabError(
            f"{option} {text!r}: expected comma-separated integers, e.g. 150,150"
        ) from None
