"""The commands that use a trained model: evaluate (through the API), predict and export
(mnistlab.inference, mnistlab.export)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mnistlab.cli.shell import (
    DataOpt,
    app,
    examples,
    say,
    user_errors,
)
from mnistlab.errors import MnistlabError

if TYPE_CHECKING:
    from mnistlab.scored import Scored


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
    say(json.dumps(scored.record(), indent=2) if as_json else _evaluation_text(scored))



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
        say(text)
    for error in errors:
        say(f"error: {error}", err=True)
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

    say(export_command(checkpoint_path(checkpoint, run, seed), onnx))
