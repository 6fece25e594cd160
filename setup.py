"""Only what pyproject.toml cannot say: ship dromedary-lm-eval.pth at the top of site-packages, so
that lm-evaluation-harness finds `--model dromedary` (see dromedary/eval/lm_eval_hook.py).

A regular install gets the file through build_py. An editable install (`pip install -e .`) builds
its wheel without build_py's outputs, so the editable command adds the file to that wheel too
(through setuptools' `_select_strategy`, the one step that sees the wheel being written)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "dromedary-lm-eval.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPy(build_py):
    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class _WithPth:
    """An editable strategy that also writes the hook's .pth into the wheel."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        with open(os.path.join(HERE, PTH), "rb") as f:
            wheel.writestr(PTH, f.read())


class EditableWheel(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _WithPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel})
