"""Files users hand back to mnistlab — checkpoints, predictions, resume states, stack files —
are trusted only after checking: anything hostile or damaged is one line (issue 12, causes 3-6).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from mnistlab.config import PRESETS, RunConfig, Schedule, to_dict
from mnistlab.data.csv import write_csv
from mnistlab.data.dataset import Dataset, Splits
from mnistlab.engine import Member, train
from mnistlab.errors import CheckpointError, MnistlabError
from mnistlab.evaluation import Predictions
from mnistlab.inference import predict_csv
from mnistlab.model import Checkpoint, InputSpec, build_mlp
from mnistlab.modules import checkpoint_bytes, load_checkpoint
from mnistlab.runs import RunDir

SMALL = RunConfig(name="small", hidden=(8,), dropout_after=())
STD = "must be in [1e-12, 1] (a std of pixels / 255)"


def rewrite(path: Path, tensors=None, **meta: str) -> Path:
    """The safetensors file at `path` with its tensors (or `tensors`) and metadata entries
    replaced by `meta` (JSON text; None deletes an entry)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = {**f.metadata(), **meta}
    tensors = load_file(str(path)) if tensors is None else tensors
    path.write_bytes(save(tensors, metadata={k: v for k, v in metadata.items() if v is not None}))
    return path


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "small.safetensors"
    path.write_bytes(checkpoint_bytes(Checkpoint(build_mlp(SMALL), SMALL, InputSpec(), 0)))
    return path


def load_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}: ")
    return str(info.value)


# --- checkpoints (causes 3 and 4) ----------------------------------------------------------------

HUGE = [
    ({"config": json.dumps({**to_dict(SMALL), "hidden": [10_000_000]})}),
    ({"inputs": json.dumps({**to_dict(InputSpec()), "shape": [100_000, 100_000]})}),
    ({"config": json.dumps({**to_dict(SMALL), "hidden": [2**62]})}),
]


@pytest.mark.parametrize("meta", HUGE)
def test_metadata_cannot_make_mnistlab_allocate(checkpoint, meta):
    """Cause 3: shapes are checked against the file's own tensors before any model is built, so
    metadata claiming a model of tens of GB is refused within a small address-space limit."""
    rewrite(checkpoint, **meta)
    child = f"""
import resource, sys
from mnistlab.errors import CheckpointError, MnistlabError
from mnistlab.modules import load_checkpoint
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30),) * 2)  # 1 GiB more than now
try:
    load_checkpoint({str(checkpoint)!r})
except CheckpointError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and not done.stderr, done.stderr[-2000:]
    assert "weights do not match the stored architecture" in done.stdout


@pytest.mark.parametrize(
    ("inputs", "problem"),
    [
        ({"std": 0.0}, f"inputs: std {STD}, got 0.0"),
        ({"std": 1e-300}, f"inputs: std {STD}, got 1e-300"),
        ({"mean": float("nan")}, "inputs: mean must be in [0, 1] (a mean of pixels / 255), "
                                 "got nan"),
        ({"classes": list(range(10))}, "inputs: classes must be a list of class names, got 0"),
        ({"classes": []}, "inputs: classes must be a list of class names, got []"),
        ({"shape": [28, 28, 1]}, "inputs: shape must be [height, width]"),
    ],
)
def test_input_spec_must_be_finite_and_named(checkpoint, inputs, problem):
    """Cause 4: std 0 or a NaN mean gave NaN probabilities with exit code 0."""
    rewrite(checkpoint, inputs=json.dumps({**to_dict(InputSpec()), **inputs}))
    assert f"damaged checkpoint metadata ({problem}" in load_error(checkpoint)


def test_non_finite_weights_are_refused(checkpoint):
    tensors = load_file(str(checkpoint))
    tensors["0.weight"][0, 0] = float("nan")
    rewrite(checkpoint, tensors)
    assert "weights 0.weight are not finite floating-point numbers" in load_error(checkpoint)


@pytest.mark.parametrize(
    ("name", "written"),
    [('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'), ("+1", "'+1"),
     ("-1", "'-1"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ('a,"b"', 'a,"b"'),
     ("7", "7")],
)
def test_class_names_cannot_inject_formulas_into_a_submission(checkpoint, tmp_path, name,
                                                              written):
    """Cause 4: a class name `=HYPERLINK(...)` went raw into submission.csv. Cells are written
    by the csv module (quoted where needed) and a formula's first character is made inert."""
    classes = [name, *"123456789"]
    rewrite(checkpoint, inputs=json.dumps({**to_dict(InputSpec()), "classes": classes}))
    ckpt = load_checkpoint(checkpoint)
    with torch.no_grad():
        ckpt.model[-1].bias.copy_(torch.arange(10.0) * -100)  # every image is class 0
    write_csv(tmp_path / "test.csv", Dataset(np.zeros((2, 28, 28), np.uint8), None), "kaggle")
    predict_csv(ckpt, tmp_path / "test.csv", tmp_path / "submission.csv")
    with open(tmp_path / "submission.csv", newline="") as f:
        assert list(csv.reader(f)) == [["ImageId", "Label"], ["1", written], ["2", written]]


# --- predictions files ---------------------------------------------------------------------------


@pytest.fixture
def predictions(tmp_path: Path) -> Path:
    images = np.zeros((20, 4, 4), np.uint8)
    labels = np.arange(20, dtype=np.int64) % 10
    p = Predictions.of((labels + 1) % 10, np.full(20, 0.9), np.full(20, 0.05),
                       Dataset(images, labels))
    path = tmp_path / "p.safetensors"
    path.write_bytes(p.to_bytes())
    return path


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t: t.pop("labels"), "holds ["),
        (lambda t: t.update(labels=t["labels"].to(torch.bfloat16)), "labels is torch.bfloat16"),
        (lambda t: t.update(labels=t["labels"] + 10), "labels outside 0..9"),
        (lambda t: t.update(predicted=t["predicted"][:5]), "differ in length"),
        (lambda t: t.update(worst_index=t["worst_index"] + 100), "worst_index outside 0..19"),
        (lambda t: t.update(worst_images=t["worst_images"][:1]), "differ in length"),
    ],
)
def test_damaged_predictions_files_are_one_line(predictions, change, problem):
    tensors = load_file(str(predictions))
    change(tensors)
    rewrite(predictions, tensors)
    with pytest.raises(CheckpointError, match="damaged predictions file") as info:
        Predictions.load(predictions)
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_predictions_classes_must_be_names(predictions):
    assert Predictions.load(predictions).classes == tuple("0123456789")
    for classes in ("[1, 2]", "{", "[]"):
        rewrite(predictions, classes=classes)
        with pytest.raises(CheckpointError, match="damaged predictions file"):
            Predictions.load(predictions)


# --- resume states (cause 5) -------------------------------------------------------------------

MEMBERS = [Member(PRESETS["lr1e-3-p0.2"], 0), Member(PRESETS["baseline"], 1)]
SCHEDULE = Schedule(batch_size=50, epochs=2, record_every=3, log_every=100)


@pytest.fixture
def splits(make_dataset) -> Splits:
    return Splits(make_dataset(200, seed=1), make_dataset(40, seed=2), make_dataset(20, seed=3))


@pytest.fixture
def state(splits, tmp_path) -> Path:
    """The resume state Ctrl-C leaves in the middle of the first epoch (step 3 of 8)."""
    path = tmp_path / "state.safetensors"

    def ctrl_c(event) -> None:
        if event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=path, on_record=ctrl_c)
    return path


def progress(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["progress"])


def resume_error(splits, path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=path, resume=True)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}: damaged")
    return str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("step", "abc", "progress: step: input should be a valid integer"),
        ("step", [1], "progress: step: input should be a valid integer"),
        ("step", True, "progress: step: input should be a valid integer"),
        ("seconds", "soon", "progress: seconds: input should be a valid number"),
        ("rows", 5, "progress: rows: input should be a valid list"),
        ("step", 44, "step 44 of 8 with 0 since the last record"),
        ("since", 2, "step 3 of 8 with 2 since the last record"),
    ],
)
def test_tampered_progress_is_a_one_line_checkpoint_error(splits, state, field, value, problem):
    """Cause 5: non-numeric or list-valued fields were tracebacks; a step beyond the total
    "finished" a study after a few steps."""
    rewrite(state, progress=json.dumps({**progress(state), field: value}))
    assert problem in resume_error(splits, state)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda rows: rows[0].update(loss="x"), "rows[0].loss: input should be a valid number"),
        (lambda rows: rows[0].pop("split"), "rows[0].split: field required"),
        (lambda rows: rows[0].update(run="intruder"), "a record of intruder seed 0"),
        (lambda rows: rows[0].update(step=99), "at step 99 that this run cannot have written"),
    ],
)
def test_tampered_records_are_refused(splits, state, change, problem):
    values = progress(state)
    change(values["rows"])
    rewrite(state, progress=json.dumps(values))
    assert problem in resume_error(splits, state)


def test_tampered_batch_order_and_fingerprint_are_refused(splits, state):
    tensors = load_file(str(state))
    tensors["perms"] = torch.zeros_like(tensors["perms"])
    rewrite(state, tensors)
    assert "perms (2, 200) are not 2 permutations of 200 rows" in resume_error(splits, state)
    del tensors["perms"]
    rewrite(state, tensors)
    assert "no perms at step 3, in the middle of an epoch" in resume_error(splits, state)
    rewrite(state, fingerprint="[1, 2]")
    assert "the fingerprint is no table" in resume_error(splits, state)
    rewrite(state, progress="[" * 100_000)
    assert "'progress' is not JSON" in resume_error(splits, state)


def test_an_intact_state_still_resumes_exactly(splits, state):
    """The checks refuse nothing a real run writes: resumed, the run ends as one run."""
    assert progress(state)["step"] == 3
    rewrite(state, progress=json.dumps(progress(state)))  # the same values, rewritten
    resumed = train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state, resume=True)
    assert resumed.rows == train(splits, MEMBERS, SCHEDULE, device="cpu").rows


# --- a finished stack's done file (cause 6) ------------------------------------------------------

GOOD = {"rows": [{"run": "a", "seed": 0, "step": 3, "epoch": 0.5, "split": "val",
                  "loss": float("nan"), "accuracy": 0.5}],
        "runs": [{"run": "a", "seed": 0, "final_val_accuracy": 0.5, "final_val_loss": 0.7,
                  "best_val_accuracy": 0.5, "best_val_step": 3, "final_train_accuracy": 0.4,
                  "final_train_loss": 0.8, "test_accuracy": 0.5, "test_loss": 0.7,
                  "diverged_at": None, "seconds": 1.0}],
        "seconds": 1.0, "device": "cpu"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "damaged stack file (Expecting property name"),
        ("[]", "damaged stack file: input should be a valid dictionary"),
        (json.dumps({**GOOD, "rows": 5}), "damaged stack file: rows: input should be a valid list"),
        (json.dumps({**GOOD, "seconds": "1"}), "damaged stack file: seconds: input should be a "),
        (json.dumps({**GOOD, "extra": 1}), "damaged stack file: unknown field(s) extra"),
        (json.dumps({**GOOD, "runs": [{**GOOD["runs"][0], "seed": "0"}]}),
         "damaged stack file: runs[0].seed: input should be a valid integer"),
        ("\xff\xfe", "damaged stack file ("),
    ],
)
def test_a_damaged_stack_file_says_to_delete_it(tmp_path, text, problem):
    run = RunDir.create(tmp_path, "s")
    run.record_stack("0", GOOD, [])
    assert json.dumps(run.finished_stack("0")) == json.dumps(GOOD)
    (run.checkpoints / "stack-0.json").write_text(text, encoding="latin-1")
    with pytest.raises(CheckpointError) as info:
        run.finished_stack("0")
    message = str(info.value)
    assert message.startswith(f"{run.checkpoints / 'stack-0.json'}: {problem}"), message
    assert message.endswith(f"; delete it to retrain that stack (--resume {run.root})")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("run,seed\na,0\n", "KeyError"),
        ("run,seed,step,epoch,split,loss,accuracy\na,zero,1,0.5,val,0.1,0.9\n", "ValueError"),
        ("run,seed,step,epoch,split,loss,accuracy\na,0,1\n", "TypeError"),
    ],
)
def test_a_damaged_metrics_file_is_one_line(tmp_path, text, problem):
    """metrics.csv is read back by reports and load_run; a resume rewrites it."""
    run = RunDir.create(tmp_path, "s")
    run.metrics_path.write_text(text)
    with pytest.raises(MnistlabError) as info:
        run.read_metrics()
    assert str(info.value).startswith(f"{run.metrics_path}: damaged metrics file ({problem}")
    assert f"--resume {run.root}`" in str(info.value) and "\n" not in str(info.value)
    run.summary_path.write_text("{")
    with pytest.raises(MnistlabError, match=r"summary\.json: damaged .*--resume"):
        run.read_summary()
