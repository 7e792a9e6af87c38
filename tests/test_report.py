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
from mnistlab.config import RunConfig, Schedule, StudyConfig, load_study, study_to_toml, to_dict
from mnistlab.data import load, make_splits
from mnistlab.errors import MnistlabError
from mnistlab.evaluation import evaluate, predictions
from mnistlab.model import save_checkpoint
from mnistlab.report import render
from mnistlab.report.html import reading
from mnistlab.runs import RunDir
from mnistlab.stats import summarize

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


def build_run_dir(root: Path, mnist_dir: Path) -> RunDir:
    study = StudyConfig(
        name="synthetic<study>", data=str(mnist_dir), seeds=(0, 1, 2),
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
        atomic_write_bytes(run.predictions_path(BEST, seed),
                           predictions(ckpt, splits.test).to_bytes())
        ev = evaluate(ckpt, splits.test)
        curves = {  # final val accuracy, time constant, train-val gap, diverged at
            BASELINE: (ev.accuracy - 0.012, 60, 0.03, 150 if seed == 2 else None),
            BEST: (ev.accuracy, 50, 0.004, None),
            SLOW: (ev.accuracy - 0.08, 180, -0.01, None),
        }
        for name, (final, tau, gap, dead) in curves.items():
            rows += synthetic_rows(name, seed, final, tau, gap, dead)
            if name == BEST:
                test = (ev.accuracy, ev.loss)
            else:  # a diverged model is frozen at chance level
                test = (0.098, math.nan) if dead else (final - 0.002 * seed, 0.3)
            runs.append(run_row(name, seed, rows, *test))
    run.write_metrics(rows)
    configs, comparisons = summarize(runs, {c.name: to_dict(c) for c in study.runs})
    run.write_summary({
        "study": study.name, "data": study.data, "split_note": splits.note,
        "classes": list(splits.train.classes),
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "device": "cpu", "seeds": list(study.seeds), "seconds": 36.0,
        "steps_per_epoch": STEPS_PER_EPOCH, "runs": runs, "configs": configs,
        "comparisons": comparisons,
    })
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist_dir) -> RunDir:
    run = build_run_dir(tmp_path_factory.mktemp("run"), mnist_dir)
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
    assert "Welch&#x27;s t-test" in page and "Holm" in page
    for field in ("lr", "dropout", "layernorm", "hidden", "activation", "weight_decay"):
        assert f"<th>{field}</th>" in page
    best = next(c for c in summary["configs"] if c["run"] == BEST)["test_accuracy"]
    assert f"{best['mean']:.2%} [{100 * best['ci_low']:.2f}, {100 * best['ci_high']:.2f}]" in page
    assert f'<tr class="best"><td>{BEST}</td>' in page
    assert page.count("<td>5.0 s</td>") == 3  # time per run: seeds took 4, 5 and 6 s


def test_the_reading_names_winner_overfit_slow_and_diverged(run_dir):
    page = run_dir.report_path.read_text(encoding="utf-8")
    reading = re.search(r"<h2>Reading</h2>\s*<ul>(.*?)</ul>", page).group(1)
    assert reading.startswith(f"<li>{BEST} has the highest mean test accuracy")
    # baseline's diverged seed (test accuracy 0.098) drags its mean below SLOW's and widens its
    # interval so much that the winner's large lead over it is not significant with 3 seeds.
    assert "beats the runner-up, slow&lt;&amp;&gt;, by 8.20 pp; this is significant" in reading
    assert "not distinguishable from baseline" in reading
    assert f"{BASELINE} overfits most" in reading
    assert "slow&lt;&amp;&gt; converges slowest" in reading
    assert "baseline seed 2 (iteration 150)" in reading


def test_the_reading_says_when_it_cannot_rank():
    rows = synthetic_rows("a", 0, 0.9, 50, -0.01) + synthetic_rows("b", 0, 0.8, 50, -0.02)
    last = [r for r in rows if r["step"] == rows[-1]["step"]]  # one record only
    runs = [run_row(name, 0, rows, test, 0.3) for name, test in (("a", 0.9), ("b", 0.8))]
    configs, comparisons = summarize(runs, {"a": {}, "b": {}})
    text = " ".join(reading({"configs": configs, "comparisons": comparisons, "runs": runs}, last))
    assert "1 seed)" in text and "cannot be tested: fewer than 2 seeds" in text
    assert "No configuration overfits" in text and "the largest gap is a's, -0.94 pp" in text
    assert "too few records to rank their speed" in text
    configs, comparisons = summarize(runs[:1], {"a": {}})
    text = " ".join(reading({"configs": configs, "comparisons": comparisons, "runs": runs}, rows))
    assert "no other configuration to compare" in text


def test_tensorboard_events_hold_the_metrics(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(p.name for p in run_dir.tensorboard.iterdir())
    assert runs == sorted(f"{n}-seed{s}" for n in (BASELINE, BEST, "slow___") for s in range(3))
    events = EventAccumulator(str(run_dir.tensorboard / f"{BEST}-seed1"))
    events.Reload()
    tags = {"loss/train", "loss/val", "accuracy/train", "accuracy/val"}
    assert set(events.Tags()["scalars"]) == tags
    expected = [(r["step"], r["accuracy"]) for r in run_dir.read_metrics()
                if r["run"] == BEST and r["seed"] == 1 and r["split"] == "val"]
    got = [(e.step, e.value) for e in events.Scalars("accuracy/val")]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_rerender_replaces_everything_and_leaves_no_temp_files(run_dir):
    from mnistlab.cli import app

    before = run_dir.report_path.read_bytes()
    tb_before = sorted(p.name for p in run_dir.tensorboard.rglob("*"))
    result = CliRunner().invoke(app, ["report", str(run_dir.root)])
    assert result.exit_code == 0, result.output
    assert str(run_dir.report_path) in result.output
    assert run_dir.report_path.read_bytes() == before
    tb_after = sorted(p.name for p in run_dir.tensorboard.rglob("*"))
    assert len(tb_after) == len(tb_before)  # rewritten, not appended to
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
    scored = ml.evaluate(moved.root, plots=tmp_path / "plots")
    best = max((r for r in moved.read_summary()["runs"] if r["run"] == BEST),
               key=lambda r: r["test_accuracy"])
    assert scored.evaluation.accuracy == pytest.approx(best["test_accuracy"])
    results = ml.load_run(moved.root)
    assert results.winner == BEST and len(results.summary) == 3


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
  out.textContent = JSON.stringify({images: images.length, errors: __errors,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)});
  document.body.appendChild(out);
});
</script>"""


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
                     "--dump-dom", probed.as_uri()], tmp_path / "profile")
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
    assert result == {"images": len(EXPECTED_PLOTS), "errors": [], "broken": []}
    assert console == []
    shot = tmp_path / "report.png"
    chromium([f"--screenshot={shot}", "--window-size=1280,1800", run_dir.report_path.as_uri()],
             tmp_path / "profile")
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1280, 1800)
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005, "the screenshot is blank"
