"""Build hook: ship the gin fragments and the recipes inside the package.

A wheel (``pip install .``) holds ``dfqkit/_shipped/gin/`` and ``dfqkit/_shipped/recipes/``,
copies of the source tree's ``gin/`` and ``recipes/``, so ``--gin recipes/...`` and
``dfqkit.quantize(method=...)`` work from any directory without the source tree
(:data:`dfqkit.config.REPO_ROOT`). Everything else is in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("gin", "recipes")


class BuildWithRecipes(build_py):
    """``build_py`` that also copies ``gin/`` and ``recipes/`` into ``dfqkit/_shipped/``."""

    def run(self) -> None:
        super().run()
        root = Path(__file__).resolve().parent
        target = Path(self.build_lib) / "dfqkit" / "_shipped"
        for name in SHIPPED:
            if (root / name).is_dir():
                shutil.copytree(root / name, target / name, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithRecipes})
