"""Plots, TensorBoard files and report.html rendered from a run directory alone.

The run directory is synthetic where it can be (curves for 3 configurations × 3 seeds, one seed
diverging) and real where it matters: the best configuration's checkpoints are trained on the real
MNIST test images, so the confusion matrix, worst errors and test accuracies are real.
"""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluation import SMALL, train_checkpoint
from typer.testing import CliRunner

from mnistlab.atomic import atomic_write_bytes, atomic_write_text
from mnistlab.config import RunConfig, Schedule, StudyConfig, load_study, study_to_toml
from mnistlab.data import Dataset, load, make_splits
from mnistlab.errors import MnistlabError
from mnistlab.evaluation import Predictions, evaluation, predictions, score
from mnistlab.experiment.executor import Outcome
from mnistlab.experiment.summary import summarize
from mnistlab.experiment.trials import Experiment
from mnistlab.modules import save_checkpoint
from mnistlab.report import render
from mnistlab.report.reading import reading
from mnistlab.runs import RunDir
from mnistlab.stats import Comparer, shown_seed, statistics

BEST, BASELINE, SLOW = "lr1e-3-p0.2", "baseline", "slow<&>"  # SLOW also tests escaping
STEPS_PER_EPOCH, RECORD_EVERY, EPOCHS = 53, 25, 5
EXPECTED_PLOTS = {
    "compare_test_accuracy.png", "compare_val_accuracy.png", "compare_val_loss.png",
    f"confusion_{BEST}.png", f"misclassified_{BEST}.png",
    *(f"{name}_{metric}.png" for name in (BASELINE, BEST, "slow___")
      for metric in ("loss", "accuracy")),
}


def synthetic_rows(run: str, seed: int, final: float, tau: float, gap: float,
                   diverged_at: int | None = None) -> list[dict]:
    """Plausible record rows: accuracy rising to `final` with time constant `tau` (iterations),
    training above validation by up to `gap`; NaN from `diverged_at` on."""
    rng = np.random.default_rng([seed, len(run)])
    last = STEPS_PER_EPOCH * EPOCHS
    rows = []
    for step in range(RECORD_EVERY, last + 1, RECORD_EVERY):
        val = final * (1 - 0.88 * math.exp(-step / tau)) + rng.normal(0, 0.002)
        for split, acc in (("train", val + gap * step / last), ("val", val)):
            dead = diverged_at is not None and step >= diverged_at
            rows.append({"run": run, "seed": seed, "step": step, "epoch": step / STEPS_PER_EPOCH,
                         "split": split, "loss": math.nan if dead else -1.3 * math.log(acc),
                         "accuracy": math.nan if dead else acc})
    return rows


def run_row(run: str, seed: int, rows: list[dict], test_accuracy: float, test_loss: float) -> dict:
    """summary.json's per-seed entry, from the rows as the study writes it."""
    mine = [r for r in rows if r["run"] == run and r["seed"] == seed]
    val = [r for r in mine if r["split"] == "val" and math.isfinite(r["loss"])]
    train = [r for r in mine if r["split"] == "train" and math.isfinite(r["loss"])]
    best = max(val, key=lambda r: r["accuracy"])
    dead = [r["step"] for r in mine if not math.isfinite(r["loss"])]
    return {"run": run, "seed": seed, "final_val_accuracy": val[-1]["accuracy"],
            "final_val_loss": val[-1]["loss"], "best_val_accuracy": best["accuracy"],
            "best_val_step": best["step"], "final_train_accuracy": train[-1]["accuracy"],
            "final_train_loss": train[-1]["loss"], "test_accuracy": test_accuracy,
            "test_loss": test_loss, "diverged_at": dead[0] if dead else None,
            "seconds": 4.0 + seed}


def synthetic_predictions(test: Dataset, accuracy: float, seed: int) -> Predictions:
    """A model's answers with exactly `accuracy` of the test images right, the rest one off."""
    rng = np.random.default_rng(seed)
    right = np.zeros(len(test), bool)
    right[rng.permutation(len(test))[: round(accuracy * len(test))]] = True
    predicted = np.where(right, test.labels, (test.labels + 1) % 10)
    probability = rng.uniform(0.3, 1.0, len(test)).astype(np.float32)
    return Predictions.of(predicted, probability, np.where(right, probability, 0.05), test)


def build_run_dir(root: Path, mnist_t10k_dir: Path) -> RunDir:
    """A run directory as the pipeline leaves it: the winner's models are really trained on the
    MNIST test images, the other configurations' curves and answers are synthetic."""
    study = StudyConfig(
        name="synthetic<study>", data=str(mnist_t10k_dir), seeds=(0, 1, 2),
        runs=(RunConfig(name=BASELINE, lr=0.01, **SMALL),
              RunConfig(name=BEST, lr=1e-3, dropout=0.2, layernorm=True, **SMALL),
              RunConfig(name=SLOW, lr=1e-4, dropout=0.6, layernorm=True, **SMALL)),
        schedule=Schedule(epochs=EPOCHS, record_every=RECORD_EVERY),
    )
    run = RunDir(root)
    atomic_write_text(run.config_path, study_to_toml(study))
    splits = make_splits(load(study.data, progress=False), study.val_fraction, study.split_seed)
    rows, runs = [], []
    for seed in study.seeds:
        ckpt = train_checkpoint(study.runs[1], splits.train, seed)
        save_checkpoint(run.model_path(BEST, seed), ckpt)
        ev = score(ckpt, splits.test)
        curves = {  # final val accuracy, time constant, train-val gap, diverged at
            BASELINE: (ev.accuracy - 0.012, 60, 0.03, 150 if seed == 2 else None),
            BEST: (ev.accuracy, 50, 0.004, None),
            SLOW: (ev.accuracy - 0.08, 180, -0.01, None),
        }
        for name, (final, tau, gap, dead) in curves.items():
            rows += synthetic_rows(name, seed, final, tau, gap, dead)
            answers = (predictions(ckpt, splits.test) if name == BEST else
                       synthetic_predictions(splits.test, final - 0.002 * seed, seed))
            atomic_write_bytes(run.predictions_path(name, seed), answers.to_bytes())
            test = evaluation(answers)
            test = (math.nan, math.nan) if dead else (test.accuracy, test.loss)
            runs.append(run_row(name, seed, rows, *test))
    run.write_metrics(rows)
    outcome = Outcome(rows, runs, 36.0, "cpu")
    run.write_summary(summarize(Experiment(study), run, splits, [outcome], None, "in-process"))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist_t10k_dir) -> RunDir:
    run = build_run_dir(tmp_path_factory.mktemp("run"), mnist_t10k_dir)
    render(run)
    return run


def test_every_plot_is_a_sane_png(run_dir):
    assert {p.name for p in run_dir.plots.iterdir()} == EXPECTED_PLOTS
    for path in run_dir.plots.iterdir():
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG"
            assert 500 <= image.width <= 2500 and 250 <= image.height <= 2500, path.name
            pixels = np.asarray(image.convert("L"))
        assert (pixels < 200).mean() > 0.01, f"{path.name} is nearly blank"


def test_report_is_self_contained_and_escaped(run_dir):
    page = run_dir.report_path.read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == len(EXPECTED_PLOTS)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"https?:|//|@import|url\(", text)
    assert "slow&lt;&amp;&gt;" in page and "<&>" not in page
    assert "synthetic&lt;study&gt;" in page and "<study>" not in page


def test_report_states_setup_tables_and_test(run_dir):
    page = run_dir.report_path.read_text(encoding="utf-8")
    summary = run_dir.read_summary()
    assert summary["split_note"] and summary["split_note"] in page
    assert "two-level bootstrap" in page and "Holm" in page and "McNemar" in page
    for field in ("lr", "dropout", "layernorm", "hidden", "activation", "weight_decay"):
        assert f"<th>{field}</th>" in page
    best = next(c for c in summary["configs"] if c["run"] == BEST)["test_accuracy"]
    assert f"{best['mean']:.2%} [{100 * best['ci_low']:.2f}, {100 * best['ci_high']:.2f}]" in page
    assert f'<tr class="best"><td>1</td><td>{BEST}</td>' in page  # chosen on validation
    assert page.count("<td>5.0 s</td>") == 3  # time per model: seeds took 4, 5 and 6 s
    assert summary["claims"] is None and "seed study&#x27;s claims" not in page


def test_the_reading_names_winner_overfit_slow_and_diverged(run_dir):
    page = run_dir.report_path.read_text(encoding="utf-8")
    reading = re.search(r"<h2>Reading</h2>\s*<ul>(.*?)</ul>", page).group(1)
    assert reading.startswith(f"<li>{BEST} has the highest mean final validation accuracy")
    assert "its test accuracy, scored once, is" in reading
    # The runner-up on validation is baseline (its diverged seed left out of the mean).
    assert "differs from the runner-up, baseline, by +" in reading
    assert re.search(r"difference is (not )?significant at α = 0.05 \(paired bootstrap", reading)
    assert f"{BASELINE} overfits most" in reading
    assert "slow&lt;&amp;&gt; converges slowest" in reading
    assert "baseline seed 2 (iteration 150)" in reading


def test_the_reading_says_when_it_cannot_rank():
    rows = synthetic_rows("a", 0, 0.9, 50, -0.01) + synthetic_rows("b", 0, 0.8, 50, -0.02)
    last = [r for r in rows if r["step"] == rows[-1]["step"]]  # one record only
    runs = [run_row(name, 0, rows, test, 0.3) for name, test in (("a", 0.9), ("b", 0.8))]
    correct = {"a": np.arange(100)[None] < 90, "b": np.arange(100)[None] < 80}
    summary = {**statistics({"a": {}, "b": {}}, Comparer(runs, correct)), "runs": runs}
    text = " ".join(reading(summary, last))
    assert "n/a (1 seed) over 1 seed" in text and "no test is possible: n/a (1 seed)" in text
    assert "No configuration overfits" in text and "the largest gap is a's, -0.94 pp" in text
    assert "too few records to rank their speed" in text
    summary = {**statistics({"a": {}}, Comparer(runs[:1], {"a": correct["a"]})), "runs": runs}
    # One configuration reads as one (issue 23): no winner, no comparison, no "overfits".
    alone = " ".join(reading(summary, rows))
    assert alone.startswith("a ends with a final validation accuracy of ")
    assert "winner" not in alone and "compare" not in alone and "overfits" not in alone


def test_tensorboard_events_hold_the_metrics(run_dir):
    """A run directory without live events (made before live logging) gets them from
    metrics.csv: Keras' layout, one run per model, train and validation under the same tags;
    each configuration's confusion matrix as an image, beside its shown model's curves."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # A configuration's seeds grouped in its folder (issue 23).
    runs = sorted(p.relative_to(run_dir.tensorboard).as_posix()
                  for p in run_dir.tensorboard.glob("*/seed*"))
    assert runs == sorted(f"{n}/seed{s}" for n in (BASELINE, BEST, "slow___") for s in range(3))
    shown = shown_seed(run_dir.read_summary(), BEST)
    other = next(s for s in range(3) if s != shown)
    model = run_dir.tensorboard / BEST / f"seed{other}"
    assert {p.name for p in model.iterdir() if p.is_dir()} == {"train", "validation", "test"}
    for sub in ("train", "validation"):
        events = EventAccumulator(str(model / sub))
        events.Reload()
        # train/ also holds the learning rate (issue 23)
        assert set(events.Tags()["scalars"]) == {"loss", "accuracy",
                                                 *(["learning_rate"] * (sub == "train"))}
    expected = [(r["step"], r["accuracy"]) for r in run_dir.read_metrics()
                if r["run"] == BEST and r["seed"] == other and r["split"] == "val"]
    got = [(e.step, e.value) for e in events.Scalars("accuracy")]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)
    images = EventAccumulator(str(run_dir.tensorboard / BEST / f"seed{shown}" / "images"))
    images.Reload()
    (image,) = images.Images("confusion_matrix")
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 300


def test_rerender_replaces_everything_and_leaves_no_temp_files(run_dir):
    from mnistlab.cli import app

    before = run_dir.report_path.read_bytes()
    tb_before = sorted(p.name for p in run_dir.tensorboard.rglob("*"))
    result = CliRunner().invoke(app, ["report", str(run_dir.root)])
    assert result.exit_code == 0, result.output
    assert str(run_dir.report_path) in result.output
    assert run_dir.report_path.read_bytes() == before
    tb_after = sorted(p.name for p in run_dir.tensorboard.rglob("*"))
    assert tb_after == tb_before  # no new event files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shown = shown_seed(run_dir.read_summary(), BEST)
    images = EventAccumulator(str(run_dir.tensorboard / BEST / f"seed{shown}" / "images"))
    images.Reload()
    assert len(images.Images("confusion_matrix")) == 1  # the earlier image replaced
    assert not [p for p in run_dir.root.rglob(".*") if p.name != ".gitignore"]


def test_report_and_evaluate_need_neither_the_data_nor_the_network(run_dir, tmp_path,
                                                                    monkeypatch):
    """The data set gone and every loader refusing: the report re-renders whole, `evaluate`
    reads the winner's stored predictions, and `load_run` gives the results."""
    import mnistlab as ml

    moved = RunDir(tmp_path / "moved")
    shutil.copytree(run_dir.root, moved.root, ignore=shutil.ignore_patterns("plots", "tb"))
    study = load_study(moved.config_path)
    atomic_write_text(moved.config_path, study_to_toml(
        StudyConfig(**{**study.__dict__, "data": str(tmp_path / "gone")})))

    def no_data(*args, **kwargs):
        raise AssertionError("the data were loaded")

    monkeypatch.setattr("mnistlab.data.loader.load", no_data)
    monkeypatch.setattr("mnistlab.data.sources.locate", no_data)
    render(moved)
    assert {p.name for p in moved.plots.iterdir()} == EXPECTED_PLOTS
    assert moved.report_path.read_text(encoding="utf-8").count("data:image/png") == len(
        EXPECTED_PLOTS)
    scored = ml.evaluate(moved.root, plots=tmp_path / "plots")  # the winner over its seeds
    tests = {r["seed"]: r["test_accuracy"] for r in moved.read_summary()["runs"]
             if r["run"] == BEST}
    assert scored.per_seed == pytest.approx(tests)
    assert scored.evaluation.accuracy == pytest.approx(np.mean(list(tests.values())))
    # each of the three seeds scored every test image once
    assert scored.evaluation.confusion.sum() == 3 * moved.read_summary()["sizes"]["test"]
    results = ml.load_run(moved.root)
    assert results.winner == BEST and len(results.summary) == 3


def test_evaluate_command_on_the_run_dir_reproduces_the_summary(run_dir, tmp_path):
    """The winner over all its seeds by default, one model with --seed; both from the stored
    predictions, matching the summary's per-seed test accuracies."""
    from mnistlab.cli import app

    summary = run_dir.read_summary()
    tests = {r["seed"]: r["test_accuracy"] for r in summary["runs"] if r["run"] == BEST}
    result = CliRunner().invoke(app, ["evaluate", str(run_dir.root), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"model: {BEST} (seeds 0, 1, 2: {run_dir.checkpoints})" in text
    assert f"accuracy {np.mean(list(tests.values())):.4f}" in text
    assert ", ".join(f"seed {s}: {a:.4f}" for s, a in tests.items()) in text
    assert "held out as the test set" in text  # MNIST t10k alone: the split note is printed
    assert {p.name for p in tmp_path.iterdir()} == {f"confusion_{BEST}.png",
                                                   f"misclassified_{BEST}.png"}
    one = CliRunner().invoke(app, ["evaluate", str(run_dir.root), "--seed", "1", "--out",
                                   str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    assert f"accuracy {tests[1]:.4f}" in one.stdout and "mean over" not in one.stdout
    assert (tmp_path / "one" / f"confusion_{BEST}-seed1.png").is_file()
    missing = CliRunner().invoke(app, ["evaluate", str(run_dir.root), "--seed", "9"])
    assert missing.exit_code == 2 and "no finished model" in missing.output


def test_an_unfinished_run_dir_is_a_one_line_error(run_dir, tmp_path):
    unfinished = RunDir(tmp_path / "unfinished")
    atomic_write_text(unfinished.config_path, run_dir.config_path.read_text(encoding="utf-8"))
    with pytest.raises(MnistlabError, match=r"summary.json: missing.*--resume"):
        render(unfinished)


# --- a real browser ------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars"]
# Injected by the test into a copy of the report: forbid every network fetch (so "works offline"
# is enforced, not assumed), record errors, and write the image check into the DOM on load.
PROBE = """<meta http-equiv="Content-Security-Policy" content="default-src 'none';
 img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<script>
window.__errors = [];
addEventListener('error', e => __errors.push(e.message || 'failed: ' + e.target.alt), true);
addEventListener('securitypolicyviolation', e => __errors.push('blocked ' + e.blockedURI));
console.error = (...a) => __errors.push('console: ' + a.join(' '));
addEventListener('load', () => {
  const images = [...document.images];
  const out = document.createElement('pre');
  out.id = 'probe';
  const bottom = selector => {
    const found = document.querySelector(selector);
    return found ? Math.round(found.getBoundingClientRect().bottom) : null;
  };
  out.textContent = JSON.stringify({images: images.length, errors: __errors,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    bottom: {summary: bottom('#summary table'), main: bottom('figure.main img'),
             viewport: innerHeight}});
  document.body.appendChild(out);
});
</script>"""


FIRST_SCREEN = (1280, 900)  # a laptop's browser window


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=True,
    )


def browser_check(page: Path, tmp_path: Path) -> tuple[dict, list[str]]:
    """(in-page probe result, console lines chromium logged) for a copy of `page` with PROBE."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + PROBE, 1),
                      encoding="utf-8")
    done = chromium(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                     f"--window-size={FIRST_SCREEN[0]},{FIRST_SCREEN[1]}", "--dump-dom",
                     probed.as_uri()], tmp_path / "profile")
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, "the probe did not run: the page did not finish loading"
    result = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">")
                        .replace("&quot;", '"').replace("&amp;", "&"))
    return result, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_probe_catches_broken_images_and_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head></head><body><img alt="gone" src="data:image/png;'
                   'base64,AAAA"><img alt="net" src="https://example.invalid/x.png">'
                   '<script>console.error("boom")</script></body></html>', encoding="utf-8")
    result, console = browser_check(bad, tmp_path)
    assert result["images"] == 2 and result["broken"] == ["gone", "net"]
    assert "console: boom" in result["errors"]
    assert any("example.invalid" in e for e in result["errors"])
    assert console


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_report_renders_offline_in_chromium(run_dir, tmp_path):
    result, console = browser_check(run_dir.report_path, tmp_path)
    bottom = result.pop("bottom")
    assert result == {"images": len(EXPECTED_PLOTS), "errors": [], "broken": []}
    assert console == []
    # The first screen holds the summary table and the main comparison plot, whole.
    assert bottom["viewport"] <= FIRST_SCREEN[1]
    assert 0 < bottom["summary"] < bottom["main"] <= bottom["viewport"], bottom
    shot = tmp_path / "report.png"
    chromium([f"--screenshot={shot}", "--window-size=1280,1800", run_dir.report_path.as_uri()],
             tmp_path / "profile")
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1280, 1800)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005, "the screenshot is blank"


def test_workers_draw_what_this_process_would_and_leave_it_what_they_cannot():
    """The figures worker processes draw (issue 22) are byte for byte this process's; a call a
    worker fails on is made again here, where it raises as it would; the calls of a worker that
    died are made here."""
    from mnistlab.evaluation import Evaluation
    from mnistlab.report import plots, workers

    ev = Evaluation(0.9, 0.3, np.array([[9, 1], [1, 9]]), [])
    call = ("confusion_png", (ev, ("a", "b"), "two classes"))
    here = plots.confusion_png(*call[1])
    with workers.started(2):
        assert len(workers._STARTED) == 2
        assert workers.draw({k: call for k in range(3)}) == {k: here for k in range(3)}
        with pytest.raises(AttributeError, match="confusion"):
            workers.draw({"bad": ("confusion_png", (None, ("a",), "none"))})
        for worker in workers._STARTED:
            worker.process.kill()
            worker.process.wait()
        assert workers.draw({"again": call}) == {"again": here}
    assert workers._STARTED == []
