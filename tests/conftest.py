import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def corpora():
    """The offline corpora, prepared once (a few seconds) if this clone has not prepared them yet."""
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare.py")], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return ROOT
