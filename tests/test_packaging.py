"""The installed layout: bilevel_ray.tasks and bilevel_ray.rl map to the top-level tasks/ and rl/."""

import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_directory_is_declared():
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = conf["package-dir"]
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == set(conf["packages"])


def test_tasks_and_rl_import_under_the_package_only():
    code = ("import bilevel_ray.tasks, bilevel_ray.rl, importlib.util as u;"
            "assert u.find_spec('tasks') is None and u.find_spec('rl') is None;"
            "print(bilevel_ray.tasks.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("tasks/__init__.py")


def test_core_import_is_light():
    code = "import sys, bilevel_ray; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd="/", check=True)
