"""The README's Python example runs as written, with only the data, the image and the epoch's size swapped in."""

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from toolkit.core.locate import EXAMPLES_DIR


@pytest.mark.slow  # trains for tens of seconds
def test_the_python_api_example_runs(mnist_dir, tmp_path):
    readme = (REPO / "README.md").read_text()
    code = re.search(r"## Python API\n.*?```python\n(.*?)```", readme, re.S).group(1)
    example = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    swaps = {
        '"../shared/mnist"': repr(str(mnist_dir)),
        '"digit.png"': repr(str(example)),
        'epochs=1)': 'epochs=1, limit_train=3000)',  # a short run: this checks the API, not accuracy
    }
    for old, new in swaps.items():
        assert old in code, f"the README example no longer contains {old}"
        code = code.replace(old, new)
    code = "import json\n" + code + "print('RESULT', json.dumps([result.label, probabilities.shape, report.passed]))\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    label, shape, passed = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert label in [str(digit) for digit in range(10)] and shape == [4, 10] and passed
    manifest = json.loads((tmp_path / "exports" / "lenet-api" / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and "model.onnx" in manifest["artifacts"]
    assert (tmp_path / "runs" / "lenet-api" / "best.pt").is_file()
