"""The page's pure typing code (novnc_static/typing.js) under node's test runner (tests/js/).

The word table of Korean (안녕하세요, 닭, 읽다, 값, 뷁, 왜, 의사 → their exact dubeolsik key
sequences with the 한/영 toggles), the layouts (us, ko, de, fr, ja, uk) and what a layout cannot type.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import require_tool

JS_TESTS = Path(__file__).parents[1] / "js"


@pytest.mark.integration
def test_typing_module_under_node() -> None:
    node = require_tool("node", "nodejs")
    out = subprocess.run([node, "--test", str(JS_TESTS / "typing.test.mjs")], capture_output=True,
                         text=True, timeout=120, check=False, cwd=JS_TESTS.parent.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "# fail 0" in out.stdout and "# pass 0" not in out.stdout, out.stdout
