"""Registers the `dromedary` model type with lm-evaluation-harness, lazily, whenever it is imported.

lm-evaluation-harness 0.4 looks models up in its registry and has no plugin entry points, so the
package installs `dromedary-lm-eval.pth` into site-packages: at interpreter start it imports this
module, which only puts a finder on `sys.meta_path` (no import of torch, of the harness or of the
rest of dromedary). When the harness's model table `lm_eval.models` is imported, the finder lets it
load, then registers "dromedary" as a lazy placeholder: our engine is imported only when a run asks
for `--model dromedary`.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "lm_eval.models"
MODEL = "dromedary.eval.lm_eval_model:DromedaryLM"


def register() -> None:
    """Register the model type now (for a program that drives the harness itself)."""
    from lm_eval.api.registry import model_registry

    if "dromedary" not in model_registry:
        model_registry.register("dromedary", target=MODEL)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # find the real module, then wrap its loading
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
