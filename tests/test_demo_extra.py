"""`finnstream demo` without the optional `demo` extra (moto, Flask): how to install it, exit 3."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finnstream.errors import EXIT_DEPENDENCY


@pytest.mark.parametrize("absent", ["moto", "flask", "flask_cors"])
def test_demo_without_the_extra_says_how_to_install_it(absent: str) -> None:
    # A None entry in sys.modules makes the module unimportable, as if it were not installed.
    code = (
        f"import sys; sys.modules[{absent!r}] = None; "
        "from finnstream.cli import main; sys.exit(main(['demo', '--cycles', '1']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == EXIT_DEPENDENCY, proc.stderr
    assert proc.stdout == ""
    message = proc.stderr.strip()
    assert "Traceback" not in message
    assert "\n" not in message  # one paragraph
    assert "pip install 'finnstream[demo]'" in message
    assert f"{absent} missing" in message
