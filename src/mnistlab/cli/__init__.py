"""The `mnistlab` command: parse, call, print. study, train, sweep, evaluate, report and compare
call the Python API (mnistlab.api); data, predict and export call their modules' own functions
(mnistlab.data, .inference, .export), and the text printed comes from mnistlab.report.table.

shell.py holds what every command shares (the app, the options, printing, and the one place where
a user mistake, a MnistlabError, becomes one `error: ...` line on stderr and exit code 2, never a
traceback); training.py, inference.py and data.py the commands themselves.
"""

# Each module registers its commands on import, and `mnistlab --help` lists them in that order:
# training first (study, train, sweep, report, compare), then inference, then data.
# isort: off
from mnistlab.cli import training  # noqa: F401
from mnistlab.cli import inference  # noqa: F401
from mnistlab.cli import data  # noqa: F401
# isort: on
from mnistlab.cli.inference import evaluate, export, predict
from mnistlab.cli.shell import app, main
from mnistlab.cli.training import compare, report, study, sweep, train

__all__ = ["app", "compare", "evaluate", "export", "main", "predict", "report", "study", "sweep",
           "train"]
