"""Which registered data set some data are, by content rather than by name.

A study's data is a registered name (`mnist`, verified by checksums when it was fetched) or a
path. A path is that data set when its IDX files are the published ones: each file's payload
(gunzipped) has the size and SHA-256 the registry lists for its role (train/t10k images/labels).
So `--data ../copies/mnist` is known to be MNIST whatever the folder is called, and a folder
called `mnist` that holds anything else is not. Other formats (CSV, NPZ) and subsets of the files
are not recognised: they may be MNIST's images, but nothing proves it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mnistlab.data.idx import read_bytes
from mnistlab.data.loader import IDX_NAME, _idx_pairs
from mnistlab.errors import DataError


def is_dataset(data: str | Path, name: str) -> bool:
    """Whether `data` (a study's data: a registered name or a path) is registered data set
    `name`: the name itself, or a folder whose IDX files are all published files of `name`."""
    if str(data) == name:
        return True
    from mnistlab.data import sources  # lazy, as in loader.load: a path needs no registry

    info = sources.REGISTRY.get(name)
    if info is None or not Path(data).is_dir():
        return False
    roles = {match.group(1, 2): r for r in info.files if (match := IDX_NAME.fullmatch(r.filename))}
    try:
        files = [f for pair in _idx_pairs(Path(data)).values() for f in pair]
        return bool(files) and all(_published(f, roles) for f in files)
    except DataError:  # a lone IDX file, an unreadable or damaged one: not the published set
        return False


def _published(path: Path, roles: Mapping[tuple[str, str], Any]) -> bool:
    """Whether the payload of IDX file `path` is the published one for its role."""
    resource = roles.get(IDX_NAME.fullmatch(path.name).group(1, 2))
    if resource is None:
        return False
    payload = read_bytes(path)
    return (len(payload) == resource.payload_size
            and hashlib.sha256(payload).hexdigest() == resource.payload_sha256)
