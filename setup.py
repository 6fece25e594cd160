"""Only what pyproject.toml cannot say: ship dromedary-lm-eval.pth at the top of site-packages, so
that lm-evaluation-harness finds `--model dromedary` (see dromedary/eval/lm_eval_hook.py)."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "dromedary-lm-eval.pth"


class BuildPy(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=1):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildPy})
