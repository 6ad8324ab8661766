"""Data recipes: the files each shipped config reads, built from their public sources through
``datasets`` or from a local copy (``python -m realm data NAME --output DIR [--from DIR]``), and
the check every stage runs on its inputs before any work (:func:`check_inputs`).

    from realm.data.recipes import build
    build("squad-open", "data")                          # data/squad_open/*.jsonl + manifest
    build("leads-open", "data", source="/copy/of/data")  # from a local copy, no network
"""

from __future__ import annotations

from typing import Any, Optional

from realm.data.recipes import leads, squad
from realm.data.recipes.common import Recipe, data_command
from realm.data.recipes.inputs import input_paths, require_inputs

#: recipe name -> recipe
RECIPES: dict[str, Recipe] = {r.name: r for r in (squad.RECIPE, leads.RECIPE)}

__all__ = ["RECIPES", "Recipe", "build", "check_inputs", "data_command", "input_paths"]


def build(name: str, output: str = "data", source: Optional[str] = None,
          progress: bool = True) -> dict[str, Any]:
    """Run the recipe ``name`` into ``output`` (from ``source``, a local directory holding the
    recipe's files, or from the public sources when None); returns its manifest.

    Raises:
        KeyError: No such recipe.
        realm.errors.MissingInputError: A public source cannot be reached, or ``source`` lacks
            a file (one line naming ``--from`` or the file).
        realm.errors.QAFormatError: A source record is malformed (file and line named).
    """
    return RECIPES[name].build(output, source, progress)


def check_inputs(config, stage: str) -> None:
    """Fail before any work when an input of ``stage`` is missing: one line naming each
    missing path and the ``python -m realm data ...`` command that makes it (every stage's
    entry runs this; :func:`realm.data.recipes.inputs.require_inputs`)."""
    require_inputs(config, stage, RECIPES.values())
