"""The fork server's preload: what it imports, and what it leaves out."""

from __future__ import annotations

import json
import subprocess
import sys

from client.preload import LEFT_OUT, MODULES

_PROBE = """
import importlib, json, sys
import client.preload
loaded = {name: name in sys.modules for name in client.preload.MODULES + client.preload.LEFT_OUT}
for name in client.preload.LEFT_OUT:  # a ClientApp that needs one still imports it
    importlib.import_module(name)
print(json.dumps({"loaded": loaded, "later": [n in sys.modules for n in client.preload.LEFT_OUT]}))
"""


def test_the_preload_imports_the_clientapp_but_not_what_monai_imports_for_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, check=True
    )
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(seen["loaded"][name] for name in MODULES)
    assert not any(seen["loaded"][name] for name in LEFT_OUT)
    assert all(seen["later"])
