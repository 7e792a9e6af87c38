"""Experiments: trials (configuration × seed) on one split, planned into engine stacks, run by an
executor (this process or a Ray cluster), recorded in a run directory and summarised.

    trials.py    Experiment and Trial; a sweep's configurations (sweep.py) become one
    plan.py      the one planner: trials cut into jobs, one engine stack each, sized to memory
    executor.py  the compute step and the in-process executor; ray.py the Ray one
    halving.py   successive halving, a policy over rungs of trials
    summary.py   summary.json from the jobs' outcomes
    pipeline.py  data → run directory → jobs → executor → summary, under every command
"""
