"""Property tests on the three kinds of file users hand back to mnistlab (issue 12): study, run
and sweep TOML; model checkpoints with hostile metadata and shapes; resume states.

Inputs are valid files with parts replaced by arbitrary values, keys added or removed, tensors
reshaped or retyped, and TOML text cut or spliced. Each input, given to the real entry point,
either works (and then what it gives is sound: bounded, finite, inside its folder) or raises the
project's one-line error naming the file. Any other exception fails the test.
"""

from __future__ import annotations

import json
import math
import os
import tracemalloc
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save

from mnistlab.config import (
    MAX_MODELS,
    RunConfig,
    Schedule,
    load_study,
    read_toml,
    run_study_from_dict,
    study_to_toml,
    to_dict,
)
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, train
from mnistlab.errors import MnistlabError
from mnistlab.experiment.sweep import load_sweep, sweep_to_toml
from mnistlab.experiment.trials import from_sweep
from mnistlab.inference import predict_images
from mnistlab.model import Checkpoint, InputSpec, build_mlp
from mnistlab.modules import checkpoint_bytes, load_checkpoint
from mnistlab.runs import RunDir

EXAMPLES = int(os.environ.get("MNISTLAB_FUZZ_EXAMPLES", 200))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5),
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
pytestmark = pytest.mark.timeout(300)  # a hang fails the test instead of stalling the run
MEMORY = 64 << 20  # bytes of Python memory one input may cost, at most


def one_line(exc: MnistlabError, path: Path) -> None:
    message = str(exc)
    assert "\n" not in message and message.startswith(str(path)), message


# --- values ------------------------------------------------------------------------------------

JUNK_TEXT = ["", "../x", "/abs", "..", "a b", "baseline", "baseline2", "relu", "scale",
             "fashion-mnist", "=HYPERLINK(1)", "choice", "uniform", "nan", "\u00e9", "x" * 120]
SCALARS = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.integers(-3, 300)
           | st.floats() | st.sampled_from([0.0, 0.5, 1.0, 1e-3, -1.0, 1e300])
           | st.text(max_size=8) | st.sampled_from(JUNK_TEXT))
KEYS = st.sampled_from(["name", "lr", "dropout", "hidden", "layernorm", "seeds", "epochs",
                        "batch_size", "colour", "runs", "schedule", "grid", "random", "base",
                        "samples", "seed", "data", "uniform", "log_uniform", "choice"])
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(KEYS, inner, max_size=3), max_leaves=8)

STUDY = {"name": "s", "data": "mnist", "seeds": [0, 1], "val_fraction": 0.2,
         "runs": ["baseline", {"name": "w", "lr": 0.001, "hidden": [30, 20], "layernorm": True,
                               "dropout": 0.3}],
         "schedule": {"batch_size": 64, "epochs": 2, "record_every": 10, "log_every": 50}}
RUN = {"name": "r", "lr": 0.003, "layernorm": True, "hidden": [40], "dropout_after": [1],
       "seed": 3, "data": "fashion-mnist", "schedule": {"epochs": 3, "drop_last": True}}
SWEEP = {"name": "g", "seeds": 2, "samples": 0,
         "base": {"layernorm": True, "hidden": [32], "dropout_after": [1]},
         "schedule": {"epochs": 2},
         "grid": {"lr": [0.01, 0.001], "dropout": [0.0, 0.3], "hidden": [[32], [64, 64]]},
         "random": {"weight_decay": {"log_uniform": [1e-5, 1e-3]}}}


@st.composite
def mutated(draw: st.DrawFn, base: dict) -> dict:
    """`base` with up to four places (top level, or a table or list inside it) given another
    value, deleted, or given a new key."""
    values = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(0, 4))):
        table = values
        while draw(st.booleans()):  # walk into a nested table or list
            inner = [v for v in (table.values() if isinstance(table, dict) else table)
                     if isinstance(v, dict | list) and v]
            if not inner:
                break
            table = draw(st.sampled_from(inner))
        if isinstance(table, list):
            table[draw(st.integers(0, len(table) - 1))] = draw(VALUES)
        elif table and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(table)))
            if draw(st.booleans()):
                del table[key]
            else:
                table[key] = draw(VALUES)
        else:
            table[draw(KEYS)] = draw(VALUES)
    return values


@st.composite
def toml_text(draw: st.DrawFn, base: dict) -> str:
    """A mutated `base` as TOML text, sometimes cut short or with a few characters spliced in."""
    text = tomli_w.dumps(draw(mutated(base)))
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(alphabet='[]{}="., \n0a-', max_size=4)) + text[at:]
    return text


def bounded(entry, path: Path):
    """entry(path) with Python's memory traced: the value, or None after a MnistlabError."""
    tracemalloc.start()
    try:
        return entry(path)
    except MnistlabError as exc:
        one_line(exc, path)
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY, f"{peak} bytes for one file"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_study(study, folder: Path) -> None:
    """A study a file produced: bounded, exactly re-runnable, its run directory inside `out`."""
    assert len(study.runs) * len(study.seeds) <= MAX_MODELS
    again = folder / "again.toml"
    again.write_text(study_to_toml(study), encoding="utf-8")
    assert load_study(again) == study
    out = folder / "out"
    run = RunDir.create(out, study.name)
    assert run.root.parent == out and run.root.resolve().parent == out.resolve()
    run.root.rmdir()


# --- (a) TOML ----------------------------------------------------------------------------------


@FUZZ
@given(text=toml_text(STUDY))
def test_study_toml(scratch, text):
    path = scratch / "study.toml"
    path.write_text(text, encoding="utf-8")
    study = bounded(load_study, path)
    if study is not None:
        check_study(study, scratch)


@FUZZ
@given(text=toml_text(RUN))
def test_run_toml(scratch, text):
    path = scratch / "run.toml"
    path.write_text(text, encoding="utf-8")
    study = bounded(lambda p: run_study_from_dict(read_toml(p, "run"), str(p)), path)
    if study is not None:
        check_study(study, scratch)


@FUZZ
@given(text=toml_text(SWEEP))
def test_sweep_toml(scratch, text):
    path = scratch / "sweep.toml"
    path.write_text(text, encoding="utf-8")
    spec = bounded(load_sweep, path)
    if spec is not None:
        again = scratch / "again-sweep.toml"
        again.write_text(sweep_to_toml(spec), encoding="utf-8")
        assert load_sweep(again) == spec
        check_study(from_sweep(spec).study, scratch)


# --- (b) checkpoints ---------------------------------------------------------------------------

CONFIG = RunConfig(name="small", hidden=(8, 6), layernorm=True, dropout=0.2)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in build_mlp(CONFIG).state_dict().items()}


@st.composite
def hostile_checkpoint(draw: st.DrawFn, weights: dict[str, torch.Tensor]) -> bytes:
    """The checkpoint of a real small model with its metadata mutated and, sometimes, its
    tensors reshaped, retyped, dropped or given NaN."""
    tensors = dict(weights)
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(tensors)))
        how = draw(st.sampled_from(["shape", "dtype", "drop", "nan", "extra"]))
        t = tensors.pop(key)
        if how == "shape":
            tensors[key] = torch.zeros(draw(st.lists(st.integers(0, 40), max_size=3)))
        elif how == "dtype":
            tensors[key] = t.to(draw(st.sampled_from(
                [torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool])))
        elif how == "nan":
            tensors[key] = torch.full(t.shape, float("nan"))
        elif how == "extra":
            tensors |= {key: t, "extra.weight": torch.ones(3)}
    meta_values = {"config": to_dict(CONFIG), "inputs": to_dict(InputSpec()), "seed": 0}
    meta = {k: json.dumps(v) for k, v in draw(mutated(meta_values)).items()}
    if draw(st.integers(0, 9)) == 0:  # text that is no JSON at all
        meta[draw(st.sampled_from(sorted(meta) or ["config"]))] = draw(st.text(max_size=12))
    meta["format"] = draw(st.sampled_from(["mnistlab-mlp/1"] * 5 + ["other/1"]))
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


@FUZZ
@given(data=st.data())
def test_checkpoints(scratch, weights, data):
    path = scratch / "model.safetensors"
    path.write_bytes(data.draw(hostile_checkpoint(weights)))
    ckpt = bounded(load_checkpoint, path)
    if ckpt is not None:  # a model that loads gives finite probabilities on any image
        image = np.full(ckpt.inputs.shape, 128, np.uint8)
        (prediction,) = predict_images(ckpt, [image])
        assert prediction.error is None and prediction.label in ckpt.inputs.classes
        assert all(math.isfinite(p) for _, p in prediction.top3)


def test_an_unharmed_checkpoint_loads(scratch, weights):
    """The fuzz's base case is a working file (else the property above would prove nothing)."""
    path = scratch / "intact.safetensors"
    model = build_mlp(CONFIG)
    model.load_state_dict(weights)
    path.write_bytes(checkpoint_bytes(Checkpoint(model, CONFIG, InputSpec(), 0)))
    assert load_checkpoint(path).config == CONFIG


# --- (c) resume states -------------------------------------------------------------------------

MEMBERS = [Member(RunConfig(name="a", hidden=(8,), dropout_after=()), 0),
           Member(RunConfig(name="b", hidden=(8,), dropout_after=(), layernorm=True), 1)]
SCHEDULE = Schedule(batch_size=50, epochs=2, record_every=3, log_every=100)


@pytest.fixture(scope="module")
def splits() -> Splits:
    from conftest import synthetic

    return Splits(synthetic(100, seed=1), synthetic(20, seed=2), synthetic(20, seed=3))


@pytest.fixture(scope="module")
def state(splits, tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A real resume state: Ctrl-C at step 3 of 4 (tensors, metadata)."""
    path = tmp_path_factory.mktemp("state") / "state.safetensors"

    def ctrl_c(event) -> None:
        if event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=path, on_record=ctrl_c)
    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), f.metadata()


@st.composite
def hostile_state(draw: st.DrawFn, state) -> bytes:
    tensors, meta = dict(state[0]), dict(state[1])
    if draw(st.booleans()):
        meta["progress"] = json.dumps(draw(mutated(json.loads(meta["progress"]))))
    if draw(st.integers(0, 3)) == 0:
        meta["fingerprint"] = json.dumps(draw(mutated(json.loads(meta["fingerprint"]))))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(sorted(tensors)))
        how = draw(st.sampled_from(["shape", "dtype", "drop", "values"]))
        t = tensors.pop(key)
        if how == "shape":
            tensors[key] = torch.zeros(draw(st.lists(st.integers(0, 8), max_size=3)), dtype=t.dtype)
        elif how == "dtype":
            tensors[key] = t.to(draw(st.sampled_from([torch.float64, torch.int32, torch.uint8])))
        elif how == "values":
            tensors[key] = torch.full_like(t, draw(st.sampled_from([0, 1, 7, -1, 200])))
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


@FUZZ
@given(data=st.data())
def test_resume_states(scratch, splits, state, data):
    folder = scratch / "resume"
    folder.mkdir(exist_ok=True)
    path = folder / "state.safetensors"
    path.write_bytes(data.draw(hostile_state(state)))
    resumed = bounded(lambda p: train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=p,
                                      resume=True), path)
    assert [p.name for p in folder.iterdir()] == ["state.safetensors"]  # nothing else written
    if resumed is not None:  # a run that resumes ends where the schedule ends
        assert {r["step"] for r in resumed.rows} <= set(range(1, 5))
        assert max(r["step"] for r in resumed.rows) == 4


# --- (d) run directories and the Python API (issue 26) ----------------------------------------

RUNS = settings(max_examples=max(20, EXAMPLES // 4), deadline=timedelta(seconds=20),
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished one-run directory, trained on in-memory digits (nothing else to fetch)."""
    from conftest import synthetic

    import mnistlab as ml

    data = synthetic(120, seed=4)
    results = ml.train(data=(data.images, data.labels), epochs=1, hidden=(8,),
                       dropout_after=(), device="cpu", out=tmp_path_factory.mktemp("run"),
                       progress=False, report=False)
    return Path(results.path)


def read_back(root: Path) -> None:
    """Everything that reads a run directory back without training: the API's Results and its
    tables, env.json and its arithmetic, metrics.csv."""
    import mnistlab as ml

    results = ml.load_run(root)
    assert set(results.summary.columns) >= {"test_accuracy", "diverged"}
    assert len(results.runs) >= 0 and results.winner in (None, *results.summary.index)
    run = RunDir.existing(root)
    run.recorded_arithmetic()
    assert list(results.metrics.columns)[:3] == ["run", "seed", "step"]


@RUNS
@given(data=st.data())
def test_damaged_run_directories(scratch, finished_run, data):
    """summary.json, env.json or metrics.csv with parts replaced, deleted or cut, or a link or
    FIFO in their place: read back, or one line naming the file."""
    import shutil

    root = scratch / "run"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(finished_run, root)
    name = data.draw(st.sampled_from(["summary.json", "env.json", "metrics.csv"]))
    path = root / name
    how = data.draw(st.sampled_from(["mutate", "cut", "fifo", "link"]))
    if how == "mutate" and name != "metrics.csv":
        path.write_text(json.dumps(data.draw(mutated(json.loads(path.read_text())))))
    elif how in ("mutate", "cut"):
        text = path.read_text()
        path.write_text(text[: data.draw(st.integers(0, len(text)))])
    else:
        path.unlink()
        os.mkfifo(path) if how == "fifo" else path.symlink_to(finished_run / name)
    try:
        read_back(root)
    except MnistlabError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(str(root)), message


WRONG = (st.integers() | st.floats() | st.binary(max_size=4) | st.booleans()
         | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=2),
                                                                 st.integers(), max_size=2))


@FUZZ
@given(call=st.sampled_from(["study", "sweep", "train", "evaluate", "load_run", "render",
                             "predict"]), value=WRONG)
def test_api_arguments_of_the_wrong_kind(call, value):
    """A public function given a value of a kind its first argument cannot be: one line
    naming the function and the argument, before anything runs."""
    import mnistlab as ml

    function = getattr(ml, call)
    if call in ("sweep",) and isinstance(value, dict):
        value = list(value)  # a dict is a sweep's TOML values: not a wrong kind there
    args = (value, []) if call == "predict" else (value,)
    with pytest.raises(MnistlabError) as info:
        function(*args)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{call}: "), message
