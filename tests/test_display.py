"""How results read wherever they land (issue 23): terminal tables at the console's width, the
live bar, a single run's ending, did-you-mean, help, run directories where checkpoints go, the
report's shape, `compare`, and a real terminal (tmux) and a real notebook kernel (nbclient)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main
from conftest import synthetic
from typer.testing import CliRunner

import mnistlab as ml
from mnistlab import engine
from mnistlab.cli import app
from mnistlab.config import RunConfig, Schedule, StudyConfig
from mnistlab.data import idx, load, make_splits
from mnistlab.errors import MnistlabError
from mnistlab.evaluation import Evaluation
from mnistlab.progress import Progress
from mnistlab.report.table import format_evaluation, format_fit, format_summary

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
TINY = Schedule(batch_size=32, epochs=2, record_every=5)
RUNS = (RunConfig(name="plain", lr=3e-3, hidden=(16,), dropout_after=()),
        RunConfig(name="smaller-lr", lr=1e-3, hidden=(16,), dropout_after=()))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """600 training and 200 test images of 28×28 as gzipped IDX files."""
    folder = tmp_path_factory.mktemp("data")
    for prefix, part in (("train", synthetic(600, seed=1)), ("t10k", synthetic(200, seed=2))):
        idx.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz",
                      folder / f"{prefix}-labels-idx1-ubyte.gz", part)
    return folder


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[str, ml.Results]:
    """A study (2 configurations × 2 seeds), a single `train`, and a study on another split."""
    out = tmp_path_factory.mktemp("runs")
    study = StudyConfig(name="pair", runs=RUNS, seeds=(0, 1), schedule=TINY, device="cpu",
                        data=str(data_dir))
    other = dataclasses.replace(study, name="other-split", split_seed=7)
    return {
        "study": ml.study(study, out=out, progress=False),
        "single": ml.train(data=str(data_dir), hidden=(16,), dropout_after=(), epochs=2,
                           batch_size=32, record_every=5, device="cpu", out=out,
                           progress=False),
        "other": ml.study(other, out=out, progress=False),
    }


# --- terminal tables ---------------------------------------------------------------------------


def _summary_of(results: ml.Results) -> dict:
    """A summary as long as a real one: long names and data path, a diverged seed."""
    summary = json.loads(json.dumps(results.raw))
    summary["data"] = "/home/someone/datasets/fashion-mnist-from-the-debian-package"
    for c in summary["configs"]:
        c["diverged"] = 1
    return summary


@pytest.mark.parametrize("width", [80, 100])
def test_tables_fit_the_console_width_and_keep_their_rows(runs, width, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))  # what Rich measures where there is no terminal
    summary = _summary_of(runs["study"])
    text = format_summary(summary)  # no width given: the console's
    assert max(map(len, text.splitlines())) <= width
    for c in summary["configs"]:
        assert f"{c['test_accuracy']['mean']:.4f}" in text  # numbers never split
    footer = " ".join(line for line in text.splitlines() if "│" not in line and "┃" not in line)
    assert "(the test set never chooses)" in " ".join(footer.split())  # wrapped at spaces
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 40, (10, 10)) + np.diag(rng.integers(900, 1100, 10))
    ev = Evaluation(0.9, 0.3, confusion, [])
    text = format_evaluation(ev, FASHION)
    assert max(map(len, text.splitlines())) <= width
    matrix = text.split("confusion matrix (rows: true class")[1].split("most confident")[0]
    for i, row in enumerate(confusion):  # each true class on one line, every count in it
        (line,) = [ln for ln in matrix.splitlines() if FASHION[i] in ln]
        assert [int(v) for v in re.findall(r"\d+", line.split(FASHION[i])[1])] == list(row)


def test_a_wide_console_keeps_the_boxed_matrix_with_class_names():
    ev = Evaluation(0.9, 0.3, np.eye(10, dtype=np.int64) * 7, [])
    text = format_evaluation(ev, [str(d) for d in range(10)], width=100)
    assert "┃ true \\ pred ┃ 0 ┃ 1 ┃" in text  # boxed, the class names as column headers
    rows = [line for line in text.splitlines() if line.startswith("│ ")]
    assert [line.split("│")[1].strip() for line in rows][-10:] == [str(d) for d in range(10)]


# --- the live bar ------------------------------------------------------------------------------


class _Line:
    """Stands in for the notebook's display handle: keeps what it was shown."""

    def __init__(self) -> None:
        self.shown: list[str] = []

    def show(self, text: str, force: bool = False) -> None:
        self.shown.append(text)


def _rows(step: int, epoch: float) -> engine.RecordEvent:
    rows = [{"run": "a", "seed": 0, "step": step, "epoch": epoch, "split": s, "loss": 0.5,
             "accuracy": 0.8} for s in ("train", "val")]
    return engine.RecordEvent(step, 20, epoch, rows)


def test_one_bar_covers_every_stack_with_speed_loss_and_eta():
    progress = Progress(io.StringIO(), live=False)
    progress.notebook, progress._line = True, _Line()
    for stack in range(2):
        progress.stack_started(stack, 2, ["a"], 1, 20)
        for step in range(1, 21):
            progress.step(engine.StepEvent(step, 20, 10, torch.tensor([2.0 * step]), step))
        progress.stack_finished()
    first, last = progress._line.shown[0], progress._line.shown[-1]
    assert first.startswith("stack 1/2 [") and " 1/40 steps" in first and "loss 2.0000" in first
    assert last.startswith("stack 2/2 [" + "#" * 20 + "] 40/40 steps")
    assert re.search(r"[\d,.]+ it/s", last) and "ETA " in last


def test_a_resumed_stack_counts_only_its_steps_and_labels_epochs_truly():
    """Resumed at the end of epoch 1 (10 steps an epoch, records every 3): the first record,
    at epoch 1.2, ends no epoch; the one past epoch 2 ends it, and says where it was taken."""
    log = io.StringIO()
    progress = Progress(log, live=False, verbose=True)
    progress.stack_started(0, 1, ["a"], 1, 30)
    progress.step(engine.StepEvent(11, 30, 10, torch.tensor([1.0]), 1))
    assert progress._total == 20  # the 10 steps done before the interruption are not run again
    for step in (12, 15, 18, 21):
        progress.record(_rows(step, step / 10))
    lines = [ln for ln in log.getvalue().splitlines() if ln.startswith("epoch ")]
    assert lines == ["epoch 2 a: loss 0.5000 - acc 0.8000 - val_loss 0.5000 - val_acc 0.8000 "
                     "(at epoch 2.10)"]


def test_on_step_is_throttled_and_changes_no_number(data_dir):
    splits = make_splits(load(str(data_dir), progress=False), 0.2, 0)
    members = [engine.Member(RUNS[0], 0)]
    events: list[tuple[int, list[float], float]] = []
    seen = engine.train(splits, members, TINY, device="cpu",
                        on_step=lambda e: events.append((e.step, e.loss(), time.monotonic())))
    plain = engine.train(splits, members, TINY, device="cpu")
    assert seen.rows == plain.rows and seen.test == plain.test
    assert events[0][0] == 1 and all(math.isfinite(v) for _, loss, _ in events for v in loss)
    gaps = np.diff([when for _, _, when in events])
    assert len(events) < 30 and (gaps >= 0.9 * engine.STEP_EVERY).all()  # throttled


# --- a single run, resume, names, help ----------------------------------------------------------


def test_a_single_train_ends_like_fit_and_evaluate(runs):
    results = runs["single"]
    (run,) = results.raw["runs"]
    checkpoint = results.run_dir.model_path(run["run"], run["seed"])
    text = format_fit(results.raw, checkpoint, width=80)
    lines = text.splitlines()
    for split, key in (("train", "final_train"), ("val", "final_val"), ("test", "test")):
        (line,) = [ln for ln in lines if ln.strip().startswith(split + " ")]
        assert f"{run[key + '_loss']:.4f}" in line and f"{run[key + '_accuracy']:.4f}" in line
    assert lines[-1] == f"checkpoint: {checkpoint}" and checkpoint.is_file()
    assert "seed(s)" not in text and "warning" not in text


def test_resuming_a_finished_run_says_it_is_complete(runs):
    result = CliRunner().invoke(app, ["study", "--resume", str(runs["study"].path)])
    assert result.exit_code == 0, result.output
    assert f"{runs['study'].path} is complete: nothing to resume" in result.stderr
    assert "final val acc" in result.stdout


@pytest.mark.parametrize(("args", "needle"), [
    (["train", "--preset", "tunde"], "unknown preset 'tunde' (did you mean 'tuned'?)"),
    (["data", "check", "mnsit"], "(did you mean 'mnist'?)"),
    (["data", "check", "fashion-mnst"], "(did you mean 'fashion-mnist'?)"),
])
def test_a_mistyped_name_gets_a_suggestion(args, needle):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and needle in result.stderr, result.output


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--device", "cdua", "did you mean 'cuda'?"), ("--activation", "relux", "'relu', 'gelu'"),
    ("--lr-schedule", "cosin", "'cosine'"), ("--input-norm", "std", "'standardize'")])
def test_choices_are_checked_by_the_command_line(option, value, needle):
    result = CliRunner().invoke(app, ["train", option, value])
    assert result.exit_code == 2 and needle in result.output


def _tree(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _tree(sub, (*path, name))


@pytest.mark.parametrize("path", dict(_tree(typer.main.get_command(app))),
                         ids=lambda path: " ".join(path) or "mnistlab")
def test_every_option_has_help_examples_fit_80_columns_and_defaults_are_one_way(path):
    command = dict(_tree(typer.main.get_command(app)))[path]
    for param in command.params:
        if not param.hidden:
            assert param.help, f"{param.name} has no help"
            assert "(default" not in param.help, param.help  # defaults: [default: ...] only
    output = CliRunner().invoke(app, [*path, "--help"], terminal_width=80).output
    assert max(map(len, output.splitlines())) <= 80


def test_fetch_finds_and_verifies_the_system_copy_offline(fashion_dir, tmp_path, monkeypatch):
    from mnistlab.data import sources

    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(sources, "_from_url", _no_network)
    result = CliRunner().invoke(app, ["data", "fetch", "fashion-mnist"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"fashion-mnist: verified in {fashion_dir}\n"


def _no_network(*args, **kwargs):
    raise sources_failed("offline")


def sources_failed(why: str) -> Exception:
    from mnistlab.data.transfer import MirrorFailed

    return MirrorFailed(why)


def test_the_offline_error_names_the_datasets_already_here(fashion_dir, tmp_path, monkeypatch):
    from mnistlab.data import sources

    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(sources, "_from_url", _no_network)
    info = sources.REGISTRY["mnist"]
    monkeypatch.setitem(sources.REGISTRY, "mnist", dataclasses.replace(
        info, mirrors=("http://mirror.invalid/",)))
    with pytest.raises(MnistlabError) as error:
        sources.locate("mnist", progress=False)
    assert f"on this machine already: --data fashion-mnist ({fashion_dir})" in str(error.value)
    assert "\n" not in str(error.value)


# --- run directories where a checkpoint goes -----------------------------------------------------


def test_predict_and_export_take_a_run_directory(runs, tmp_path):
    results = runs["study"]
    winner, seed = results.winner, results.raw["selection"]["seed"]
    assert ml.api.checkpoint_path(results.path) == results.run_dir.model_path(winner, seed)
    other = "plain" if winner != "plain" else "smaller-lr"
    assert ml.api.checkpoint_path(results.path, other, 1) == results.run_dir.model_path(other, 1)
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(synthetic(1).images[0]).save(image)
    by_dir = CliRunner().invoke(app, ["predict", str(results.path), str(image), "--json"])
    by_file = CliRunner().invoke(app, ["predict", str(results.run_dir.model_path(winner, seed)),
                                       str(image), "--json"])
    assert by_dir.exit_code == 0 and json.loads(by_dir.stdout) == json.loads(by_file.stdout)
    missing = CliRunner().invoke(app, ["predict", str(results.path), str(image), "--run", "nope"])
    assert missing.exit_code == 2 and "no finished model nope" in missing.stderr
    onnx = tmp_path / "m.onnx"
    exported = CliRunner().invoke(app, ["export", str(results.path), "--run", other, "--seed",
                                        "1", "--onnx", str(onnx)])
    assert exported.exit_code == 0, exported.output
    assert onnx.is_file() and "onnxruntime matches PyTorch" in exported.stdout


# --- the report ----------------------------------------------------------------------------------


def test_the_report_states_the_real_test_set_size_and_names_its_tests(runs):
    page = runs["study"].report_path.read_text(encoding="utf-8")
    assert ("confusion matrix on the test set (200 test images × 2 seeds, mean count per "
            "model)") in page
    assert "McNemar per seed pair: pairs with p &lt; 0.05 (uncorrected)" in page
    assert "significant: Holm p &lt; α" in page
    assert "too few to zoom" not in page


def test_a_single_run_report_is_shaped_as_one_run(runs):
    page = runs["single"].report_path.read_text(encoding="utf-8")
    assert "<h2>Comparison</h2>" not in page and "Winner" not in page and "winner" not in page
    assert "The model on the test set" in page and "overfits most" not in page


def test_a_single_run_draws_no_comparison_and_its_confusion_matrix_once(runs):
    """One configuration is compared with nothing (issue 22): its own accuracy curve is the
    first figure, shown once; TensorBoard's confusion image is the report's PNG, not drawn
    again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs["single"].run_dir
    (name,) = {r["run"] for r in runs["single"].raw["runs"]}
    assert sorted(p.name for p in run.plots.iterdir()) == sorted(
        [f"{name}_loss.png", f"{name}_accuracy.png", f"confusion_{name}.png",
         f"misclassified_{name}.png"])
    page = run.report_path.read_text(encoding="utf-8")
    assert page.count("data:image/png") == 4
    assert f'<figure class="main" id="main-{name}_accuracy">' in page
    assert f'id="f-{name}_accuracy"' not in page and f'id="f-{name}_loss"' in page
    images = EventAccumulator(str(run.tensorboard / name / "seed0" / "images"))
    images.Reload()
    (image,) = images.Images("confusion_matrix")
    assert image.encoded_image_string == (run.plots / f"confusion_{name}.png").read_bytes()


def test_a_large_sweep_figure_shows_the_top_configurations_and_says_so():
    from mnistlab.report import plots

    names = [f"c{i}" for i in range(81)]
    rows = [{"run": n, "seed": 0, "step": s, "epoch": s / 10, "split": "val", "loss": 1.0,
             "accuracy": 0.5 + i / 200} for i, n in enumerate(names) for s in (5, 10)]
    figure = plots.comparison_figure(rows, names, "accuracy")
    (ax,) = figure.axes
    assert "top 12 of 81 configurations" in ax.get_title()
    assert len(ax.get_lines()) == 12
    configs = [{"run": n, "test_accuracy": {"mean": 0.9, "ci_low": 0.89, "ci_high": 0.91}}
               for n in names]
    path = plots.compare_test_accuracy(configs, [], names, Path(figure_dir()))
    from PIL import Image

    with Image.open(path) as png:
        assert png.size[1] < 1200  # not 5,000 px


def figure_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="mnistlab-top-")


# --- across runs ------------------------------------------------------------------------------


def test_compare_pairs_runs_on_the_same_images_and_refuses_others(runs):
    study, single, other = runs["study"].path, runs["single"].path, runs["other"].path
    comparison = ml.compare(study, single)
    table = comparison.table
    assert sorted(table["run"]) == ["A", "A", "B"]
    assert "lr" in table.columns and "hidden" not in table.columns  # only what differs
    pairs = comparison.pairs
    assert {("A/plain", "A/smaller-lr"), ("A/smaller-lr", "A/plain")} & set(
        zip(pairs["a"], pairs["b"], strict=True))
    assert any(p.startswith("B/") for p in [*pairs["a"], *pairs["b"]])  # across the runs
    assert comparison.note == ""
    apart = ml.compare(study, other)
    assert apart.note.startswith("not paired, tested on different images") and "split_seed" in \
        apart.note and "\n" not in apart.note
    assert not any(a[0] != b[0] for a, b in zip(apart.pairs["a"], apart.pairs["b"], strict=True))
    with pytest.raises(MnistlabError, match="two or more run directories"):
        ml.compare(study)


@pytest.mark.parametrize("width", [80, 100])
def test_the_compare_command_fits_the_terminal_and_writes_a_page(runs, tmp_path, width):
    result = CliRunner().invoke(app, ["compare", str(runs["study"].path), str(runs["other"].path),
                                      "--out", str(tmp_path)], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    drawn = result.stdout.splitlines()[2:-1]  # between the run's paths and the page's path
    assert drawn and max(map(len, drawn)) <= width
    assert "note: not paired" in result.stdout
    (page,) = tmp_path.glob("compare-*.html")
    assert result.stdout.rstrip().endswith(f"page: {page}")


CHROMIUM = shutil.which("chromium")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_compare_page_and_the_report_render_in_chromium_within_1280_px(runs, tmp_path):
    from test_report import browser_check, chromium

    page = ml.compare(runs["study"].path, runs["single"].path).write(tmp_path)
    result, console = browser_check(page, tmp_path)
    assert result["errors"] == [] and result["broken"] == [] and result["images"] == 1
    assert console == []
    for html_page in (page, runs["study"].report_path):
        width = tmp_path / f"width-{html_page.stem}.html"
        width.write_text(html_page.read_text(encoding="utf-8").replace(
            "</body>", "<script>addEventListener('load', () => document.title = "
            "'W' + document.documentElement.scrollWidth)</script></body>"), encoding="utf-8")
        dom = chromium(["--virtual-time-budget=5000", "--window-size=1280,900", "--dump-dom",
                        width.as_uri()], tmp_path / "profile").stdout
        scroll = int(re.search(r"<title>W(\d+)</title>", dom).group(1))
        assert scroll <= 1280, (html_page, scroll)


# --- a real terminal and a real notebook -------------------------------------------------------


TMUX = shutil.which("tmux")


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed")
def test_train_in_a_real_80_column_terminal(data_dir, tmp_path):
    """`mnistlab train` in tmux at 80×40: the live bar shows it/s and the loss while it trains,
    and what stays on screen fits 80 columns."""
    tmux = [TMUX, "-L", f"mnistlab-test-{time.monotonic_ns()}"]  # a server of its own
    command = (f"{sys.executable} -m mnistlab.cli train --data {data_dir} --hidden 16 "
               f"--dropout-after '' --epochs 40 --batch-size 8 --device cpu --no-verbose "
               f"--out {tmp_path}; echo DONE-$?; sleep 600")
    subprocess.run([*tmux, "new-session", "-d", "-s", "t", "-x", "80", "-y", "40", command],
                   check=True)
    try:
        seen, screen = "", ""
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "t"],
                                    capture_output=True, text=True, check=True).stdout
            if "DONE-" not in screen and "ETA" in screen and "it/s" in screen:
                seen = screen  # the bar drawn in full, the latest before the end
            if "DONE-" in screen:
                break
            time.sleep(0.1)
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    assert "DONE-0" in screen, screen
    bar = next((line for line in seen.splitlines() if "it/s" in line), seen)
    assert "training" in bar and "loss " in bar and "ETA" in bar, bar
    assert "checkpoint: " in screen and "test " in screen
    assert all(len(line) <= 80 for line in screen.splitlines())


def test_a_notebook_shows_plots_evaluations_and_a_bar_inline_without_magics(runs, data_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = runs["study"].path
    cells = [
        "import mnistlab as ml",
        f"results = ml.load_run({str(path)!r})\nresults.plot()",
        f"ml.evaluate({str(path)!r})",
        "results.summary",
        "results.comparisons",
        "results.report()",
        f"ml.train(data={str(data_dir)!r}, hidden=(16,), dropout_after=(), epochs=3, "
        f"batch_size=8, device='cpu', out={str(path.parent / 'nb')!r}, report=False)",
    ]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    outputs = [cell.outputs for cell in notebook.cells]
    assert all(o.get("output_type") != "error" for out in outputs for o in out)
    (figure,) = [o for o in outputs[1] if o.get("output_type") == "execute_result"]
    assert figure["data"]["image/png"]  # the figure itself, not '<Figure size ...>'
    (scored,) = [o for o in outputs[2] if o.get("output_type") == "execute_result"]
    assert len(scored["data"]["text/plain"]) < 300 and "accuracy" in scored["data"]["text/plain"]
    assert scored["data"]["text/html"].count("<table") == 2
    summary = outputs[3][0]["data"]["text/plain"]
    assert "lr" in summary and "test_accuracy" in summary
    assert "p_holm" in outputs[4][0]["data"]["text/plain"]
    assert "<iframe srcdoc=" in outputs[5][0]["data"]["text/html"]
    bar = [o for o in outputs[6] if o.get("output_type") == "display_data"
           and "steps" in o.get("data", {}).get("text/plain", "")]
    assert bar, outputs[6]  # the text bar, updated in place (its last state kept)
    assert re.search(r"\] \d+/\d+ steps", bar[-1]["data"]["text/plain"])
