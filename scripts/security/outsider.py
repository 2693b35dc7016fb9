"""Try a consortium's control plane as an outsider would: stock `flwr`, the CA certificate.

    python scripts/security/outsider.py --address HOST:PORT --ca ca.pem [--register KEY.pub]

Each attempt (list runs, list nodes, start a run of a small foreign app whose ClientApp
would write a marker file, stop a run, read a log, register a key, unregister a node) is
made with the stock `flwr` CLI against the address the sites dial. The last line is JSON:
for each attempt, whether the coordinator refused it, and whether the foreign code ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

FOREIGN_CLIENT = """
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg, context):
    site = context.node_config.get("site-name", "?")
    with open({marker!r}, "a") as out:
        out.write(f"{{site}} {{dict(context.node_config)}}\\n")
    return Message(RecordDict(), reply_to=msg)
"""
FOREIGN_SERVER = """
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    for reply in grid.send_and_receive(msgs, timeout=60):
        src = reply.metadata.src_node_id
        if reply.has_error():
            print(f"FOREIGN node {src} error: {reply.error.reason}", flush=True)
        else:
            print(f"FOREIGN node {src} ran the foreign code", flush=True)
"""
PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"
[project]
name = "foreign"
version = "1.0.0"
dependencies = []
[tool.hatch.build.targets.wheel]
packages = ["."]
[tool.flwr.app]
publisher = "outsider"
[tool.flwr.app.components]
serverapp = "foreign.server:app"
clientapp = "foreign.client:app"
[tool.flwr.app.config]
"""


def write_foreign_app(root: Path, marker: Path) -> Path:
    """A Flower app whose ClientApp appends the site's node config to `marker`."""
    app = root / "foreign"
    (app / "foreign").mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (app / "foreign" / "__init__.py").write_text("")
    (app / "foreign" / "client.py").write_text(FOREIGN_CLIENT.format(marker=str(marker)))
    (app / "foreign" / "server.py").write_text(FOREIGN_SERVER)
    return app


def flwr(home: Path, *args: str) -> tuple[bool, str]:
    """Run stock `flwr` with the outsider's config; (whether it succeeded, its output)."""
    env = dict(os.environ, FLWR_HOME=str(home))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.run(
        ["flwr", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    out = proc.stdout + proc.stderr
    if "--format" in args:
        try:
            return bool(json.loads(proc.stdout[proc.stdout.find("{") :])["success"]), out
        except ValueError:
            return False, out
    return proc.returncode == 0 and "403" not in out and "Error" not in out, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the address the sites dial")
    parser.add_argument("--ca", required=True, help="the consortium CA certificate")
    parser.add_argument("--register", help="a public key to try to register (OpenSSH)")
    parser.add_argument("--node-id", help="a node to try to unregister (default: one listed)")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for markers")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medfed-outsider-"))
    (work / "home").mkdir()
    (work / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{args.address}"\n'
        f'root-certificates = "{Path(args.ca).resolve()}"\n'
    )
    marker = work / "marker"
    app = write_foreign_app(work, marker)
    home = work / "home"
    results: dict[str, bool] = {}
    ok, out = flwr(home, "ls", "--format", "json")
    results["list runs"] = ok
    results["list nodes"], out = flwr(home, "supernode", "ls", "--format", "json")
    listed = json.loads(out[out.find("{") :]).get("nodes", []) if results["list nodes"] else []
    node_id = args.node_id or (str(listed[0]["node-id"]) if listed else "1")
    ok, out = flwr(home, "run", str(app), "--format", "json")
    results["start a run"] = ok
    run_id = json.loads(out[out.find("{") :]).get("run-id", 1) if ok else 1
    results["read a log"] = flwr(home, "log", str(run_id), "--show")[0]
    results["stop a run"] = flwr(home, "stop", str(run_id), "--format", "json")[0]
    if args.register:
        results["register a key"] = flwr(
            home, "supernode", "register", args.register, "--format", "json"
        )[0]
    results["unregister a node"] = flwr(
        home, "supernode", "unregister", node_id, "--format", "json"
    )[0]
    deadline = time.monotonic() + (args.wait if results["start a run"] else 0)
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(1)
    ran_at = marker.read_text().splitlines() if marker.exists() else []
    for what, succeeded in results.items():
        print(f"{what}: {'SUCCEEDED' if succeeded else 'refused'}")
    print(f"foreign ClientApp ran at {len(ran_at)} site(s)")
    print(json.dumps({"succeeded": results, "foreign_code_ran_at": len(ran_at)}))


if __name__ == "__main__":
    main()
