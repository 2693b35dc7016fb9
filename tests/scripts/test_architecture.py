import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_picture_is_drawn_from_the_contracts_and_no_import_goes_against_them(tmp_path):
    out = tmp_path / "architecture.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "architecture.py"), "--output", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layers"] == [["medfed"], ["client", "server"], ["federation"]]
    assert result["against_layers"] == []
    # Each role leans on the core, and only the composition roots on both roles.
    assert {"client -> federation", "server -> federation"} <= set(result["imports"])
    assert {"medfed -> client", "medfed -> server"} <= set(result["imports"])
    assert "client -> server" not in result["imports"]
    assert "server -> client" not in result["imports"]
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
