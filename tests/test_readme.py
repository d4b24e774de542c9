"""The README's Python example runs as written and finds a sensible ridge penalty."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    out = subprocess.run([sys.executable, "-c", "import torch; torch.manual_seed(0)\n" + code],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    penalty, loss = map(float, re.search(r"ridge penalty (\S+), validation loss (\S+)", out).groups())
    assert 0 < penalty < 10 and loss < 6.0  # noise variance is 4


def test_readme_meta_rl_example_runs():
    code = next(block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                if "bilevel_ray.rl" in block)
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
