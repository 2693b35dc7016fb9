"""The Fleet gate: the only listener the sites reach, in front of a loopback SuperLink.

Flower 1.41 serves its Fleet API (what a SuperNode needs), its Control API (start, stop
and list runs, logs, register and unregister nodes) and its runtime APIs on one HTTP
port. `medfed server start` binds that SuperLink to 127.0.0.1 only and puts nginx (the
Debian package `nginx-light`) on the consortium address. nginx terminates TLS with the
SuperLink's certificate and forwards `POST /v1/fleet/*` alone, over TLS verified
against the consortium CA; every other path is answered 403 without reaching Flower.
Each request is logged (`gate-access.log`: client address, path, status, the request's
number on its TLS connection, seconds).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from federation.errors import FederationError
from federation.flowerpatch import FLEET_KEEPALIVE
from federation.provision import CoordinatorKit

__all__ = ["FLEET_PREFIX", "FleetGate", "gate_config"]

FLEET_PREFIX = "/v1/fleet/"
_REFUSAL = "medfed: only the Fleet API is served on this address; runs are administered "
_REFUSAL += "from the coordinator's own host"


def _nginx() -> str:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).is_file()), None
    )
    if found is None:
        raise FederationError(
            "nginx is not installed: the coordinator serves the sites through it (only the "
            "Fleet API reaches the SuperLink). Install it with `apt-get install nginx-light`"
        )
    return found


def gate_config(
    kit: CoordinatorKit, *, listen: str, upstream: str, home: Path, user: str | None = None
) -> str:
    """The gate's configuration: TLS on `listen`, Fleet to `upstream`, 403 for the rest."""
    temp = home / "tmp"
    paths = "\n".join(
        f"    {kind}_temp_path {temp / kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    paths += f"\n    uwsgi_temp_path {temp / 'uwsgi'};\n    scgi_temp_path {temp / 'scgi'};"
    return f"""# Written by medfed server start; edits are overwritten.
daemon off;
worker_processes 1;
{f"user {user};" if user else ""}
pid {home / "gate.pid"};
error_log {home / "gate-error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    log_format gate '$time_iso8601 $remote_addr "$request" $status '
                    '$connection_requests $request_time';
    access_log {home / "gate-access.log"} gate;
{paths}
    client_max_body_size 0;
    server_tokens off;
    upstream superlink {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {kit.cert};
        ssl_certificate_key {kit.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_timeout {int(FLEET_KEEPALIVE) + 60}s;
        location {FLEET_PREFIX} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_trusted_certificate {kit.ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
        location / {{
            default_type text/plain;
            return 403 "{_REFUSAL}\\n";
        }}
    }}
}}
"""


@dataclass
class FleetGate:
    """A running nginx that passes only the Fleet API through to the SuperLink."""

    process: subprocess.Popen[bytes]
    address: str
    config: Path

    @classmethod
    def start(cls, kit: CoordinatorKit, *, listen: str, upstream: str, home: Path) -> FleetGate:
        """Write the configuration, check it with `nginx -t` and start nginx.

        Raises:
            FederationError: nginx is missing, refuses the configuration or exits.
        """
        nginx = _nginx()
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (home / "tmp" / kind).mkdir(parents=True, exist_ok=True)
        # As root, nginx's workers would switch to an unprivileged user that cannot
        # write the temp folders in the kit; they stay the kit's owner.
        user = "root" if os.geteuid() == 0 else None
        config = home / "gate.conf"
        config.write_text(gate_config(kit, listen=listen, upstream=upstream, home=home, user=user))
        base = [nginx, "-e", str(home / "gate-error.log"), "-p", str(home), "-c", str(config)]
        check = subprocess.run([*base, "-t"], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise FederationError(f"nginx refused the gate's configuration:\n{check.stderr}")
        with (home / "gate.log").open("ab") as out:
            proc = subprocess.Popen(base, stdout=out, stderr=subprocess.STDOUT)
        time.sleep(0.2)
        if proc.poll() is not None:
            tail = (home / "gate-error.log").read_text(errors="replace")[-2000:]
            raise FederationError(f"nginx exited with code {proc.returncode}:\n{tail}")
        return cls(proc, listen, config)

    def stop(self, grace: float = 10.0) -> None:
        """Stop nginx (its master stops its workers)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=grace)
