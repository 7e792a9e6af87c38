"""Independent random streams for independent purposes: batch order, dropout, augmentation.

Each is seeded from a model's seed and what the stream is for, never from its place in a stack,
so a model sees the same batches, masks and images in any stack and in either engine.
"""

from __future__ import annotations

import hashlib
import json

from mnistlab.config import RECIPE, RunConfig, to_dict

RECIPE_DEFAULTS = to_dict(RunConfig())


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from JSON-able parts: independent streams for independent purposes."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dropout_seed(config: RunConfig, seed: int) -> int:
    """A model's dropout stream: its seed and hyperparameters, not its name or stack position.

    The recipe's fields (config.RECIPE) count only where they differ from their defaults: they
    came later, and a configuration that leaves them alone keeps the masks it always had.
    """
    values = {k: v for k, v in to_dict(config).items()
              if k not in RECIPE or v != RECIPE_DEFAULTS[k]}
    return derived_seed("dropout", seed, {**values, "name": None})
