"""The consoles' shared web core: sign-in, CSRF-safe forms, one layout, inline SVG charts.

A console is served by the machine it describes (loopback by default) with no external
asset: hospital networks are often air-gapped. The first start creates an `admin` user
and returns its one-time password; passwords are kept as scrypt hashes. Every POST needs
the session's CSRF token, and every page needs a signed-in user.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from markupsafe import Markup, escape

from federation.files import write_atomically
from federation.security import load_or_create_secret

__all__ = [
    "Page",
    "Users",
    "bar_chart",
    "create_console",
    "csrf_token",
    "form",
    "line_chart",
    "serve",
    "table",
]

USERS_FILE = "users.json"
SECRET_FILE = "secret.key"
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def _hash(password: str, salt: bytes) -> str:
    return hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT).hex()


class Users:
    """The console's users: names and scrypt password hashes, in a file only the owner reads."""

    def __init__(self, folder: Path) -> None:
        """Keep users in `folder` (created)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / USERS_FILE

    def _load(self) -> dict[str, dict[str, str]]:
        return dict(json.loads(self.path.read_text())) if self.path.exists() else {}

    def add(self, name: str, password: str) -> None:
        """Add or replace a user."""
        users = self._load()
        salt = secrets.token_bytes(16)
        users[name] = {"salt": salt.hex(), "hash": _hash(password, salt)}
        write_atomically(self.path, json.dumps(users, indent=1), mode=0o600)

    def create_admin(self) -> str | None:
        """On the first start, an `admin` with a random password, returned once; else None."""
        if self._load():
            return None
        password = secrets.token_urlsafe(12)
        self.add("admin", password)
        return password

    def check(self, name: str, password: str) -> bool:
        """Whether the name and password match (constant time)."""
        user = self._load().get(name)
        if user is None:
            _hash(password, b"0" * 16)  # the same work for unknown names
            return False
        return hmac.compare_digest(_hash(password, bytes.fromhex(user["salt"])), user["hash"])


def _secret(folder: Path) -> bytes:
    return load_or_create_secret(
        folder / SECRET_FILE, lambda: secrets.token_bytes(32), what="console session secret"
    )


@dataclass(frozen=True)
class Page:
    """A page of a console: its path, its title in the menu, and what renders its body.

    `render` gets the request's query arguments and returns escaped HTML (`Markup`).
    """

    path: str
    title: str
    render: Callable[[Mapping[str, str]], Markup]


# A POST action: (form fields, signed-in user) -> where to go next (a path).
Action = Callable[[Mapping[str, str], str], str]

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}
header{background:#1d3557;color:#fff;padding:.6em 1.2em;display:flex;gap:1.4em;align-items:center}
header a{color:#fff;text-decoration:none}header a.here{border-bottom:2px solid #fff}
header .who{margin-left:auto}main{padding:1em 1.6em;max-width:1100px}
table{border-collapse:collapse;margin:.6em 0;background:#fff}
td,th{border:1px solid #d0d5dc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#e9edf2}.ok{color:#11703c;font-weight:600}.bad{color:#b3261e;font-weight:600}
.box{background:#fff;border:1px solid #d0d5dc;padding:.8em 1em;margin:.8em 0}
form.inline{display:inline}input,button{font:inherit}pre{white-space:pre-wrap;margin:0}
"""


def _layout(
    title: str, pages: Sequence[Page], here: str, user: str, csrf: str, body: Markup
) -> str:
    menu = Markup("").join(
        Markup('<a href="{}" class="{}">{}</a>').format(
            p.path, "here" if p.path == here else "", p.title
        )
        for p in pages
    )
    who = (
        Markup(
            '<span class="who">{} <form class="inline" method="post" action="/logout">'
            '<input type="hidden" name="csrf" value="{}"><button>Sign out</button></form></span>'
        ).format(user, csrf)
        if user
        else Markup("")
    )
    return str(
        Markup(
            '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{}</title>'
            "<style>{}</style></head><body><header><strong>{}</strong>{}{}</header>"
            "<main>{}</main></body></html>"
        ).format(title, Markup(_STYLE), title, menu, who, body)
    )


def form(action: str, csrf: str, fields: Markup, button: str) -> Markup:
    """A POST form carrying the session's CSRF token."""
    return Markup(
        '<form method="post" action="{}"><input type="hidden" name="csrf" value="{}">{}'
        "<button>{}</button></form>"
    ).format(action, csrf, fields, button)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Markup:
    """An HTML table; cells are escaped unless they are `Markup`."""
    head = Markup("").join(Markup("<th>{}</th>").format(h) for h in headers)
    body = Markup("").join(
        Markup("<tr>{}</tr>").format(Markup("").join(Markup("<td>{}</td>").format(c) for c in row))
        for row in rows
    )
    return Markup("<table><tr>{}</tr>{}</table>").format(head, body)


_W, _H, _PAD = 640, 240, 44


def line_chart(
    series: Mapping[str, Sequence[float]], *, limit: float | None = None, y_label: str = ""
) -> Markup:
    """Lines (one per name) over their step index, with an optional limit line: inline SVG."""
    values = [v for ys in series.values() for v in ys] + ([limit] if limit else [])
    top = max(values, default=1.0) * 1.1 or 1.0
    steps = max((len(ys) for ys in series.values()), default=1)
    colours = ["#1d3557", "#e76f51", "#2a9d8f", "#8d5fd3", "#f4a261"]

    def point(i: int, y: float) -> str:
        x = _PAD + (_W - 2 * _PAD) * (i / max(steps - 1, 1))
        return f"{x:.1f},{_H - _PAD - (_H - 2 * _PAD) * y / top:.1f}"

    parts = [
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#888"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#888"/>',
        f'<text x="4" y="{_PAD - 8}" font-size="12">{escape(y_label)} (max {top / 1.1:.3g})</text>',
    ]
    if limit:
        y = _H - _PAD - (_H - 2 * _PAD) * limit / top
        parts.append(
            f'<line x1="{_PAD}" y1="{y:.1f}" x2="{_W - _PAD}" y2="{y:.1f}" stroke="#b3261e" '
            f'stroke-dasharray="6 4"/><text x="{_W - _PAD - 90}" y="{y - 4:.1f}" font-size="12" '
            f'fill="#b3261e">budget {limit:g}</text>'
        )
    for k, (name, ys) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        pts = " ".join(point(i, y) for i, y in enumerate(ys))
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        parts.append(
            f'<text x="{_PAD + 8}" y="{_PAD + 14 + 14 * k}" font-size="12" fill="{colour}">'
            f"{escape(name)}</text>"
        )
    return Markup(
        f'<svg role="img" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


def bar_chart(values: Mapping[str, float], *, label: str = "") -> Markup:
    """Horizontal bars, one per name: inline SVG."""
    top = max(values.values(), default=1.0) or 1.0
    height = 24 * len(values) + 30
    parts = [f'<text x="4" y="16" font-size="12">{escape(label)}</text>']
    for k, (name, value) in enumerate(values.items()):
        y = 26 + 24 * k
        width = (_W - 260) * value / top
        parts.append(
            f'<text x="4" y="{y + 14}" font-size="12">{escape(name)[:32]}</text>'
            f'<rect x="200" y="{y}" width="{width:.1f}" height="18" fill="#2a9d8f"/>'
            f'<text x="{206 + width:.1f}" y="{y + 14}" font-size="12">{value:g}</text>'
        )
    return Markup(
        f'<svg role="img" width="{_W}" height="{height}" viewBox="0 0 {_W} {height}" '
        f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'
    )


def create_console(
    *, title: str, folder: Path, pages: Sequence[Page], actions: Mapping[str, Action]
) -> Any:
    """A Flask app serving `pages` and `actions` behind sign-in and CSRF checks.

    Args:
        title: Shown in the header.
        folder: Where users and the session secret are kept.
        pages: GET pages; the first is the home page.
        actions: POST paths -> handlers returning the path to go to next.
    """
    from flask import Flask, abort, redirect, request, session

    app = Flask(title)
    app.secret_key = _secret(folder)
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict")
    users = Users(folder)
    csrf = csrf_token

    @app.before_request
    def guard() -> Any:
        if request.method == "POST":
            sent = request.form.get("csrf", "")
            if not sent or not hmac.compare_digest(sent, session.get("csrf", "")):
                abort(400, "missing or wrong CSRF token: reload the page and submit again")
        if request.path != "/login" and not session.get("user"):
            if request.method != "GET":
                abort(401)
            return redirect("/login")
        return None

    @app.get("/login")
    def login_page() -> str:
        fields = Markup(
            '<p><label>User <input name="user" autocomplete="username"></label></p>'
            '<p><label>Password <input name="password" type="password" '
            'autocomplete="current-password"></label></p>'
        )
        failed = "failed" in request.args  # a fixed message: nothing a link can inject
        note = Markup('<p class="bad">Wrong user or password.</p>') if failed else ""
        body = Markup("<h1>Sign in</h1>{}{}").format(
            note, form("/login", csrf(), fields, "Sign in")
        )
        return _layout(title, [], "", "", csrf(), body)

    @app.post("/login")
    def login() -> Any:
        name = request.form.get("user", "")
        if not users.check(name, request.form.get("password", "")):
            return redirect("/login?failed=1")
        session.clear()
        session["user"] = name
        csrf()
        return redirect(pages[0].path)

    @app.post("/logout")
    def logout() -> Any:
        session.clear()
        return redirect("/login")

    for page in pages:

        def view(page: Page = page) -> str:
            body = page.render(request.args)
            return _layout(title, pages, page.path, session["user"], csrf(), body)

        app.add_url_rule(page.path, f"page{page.path}", view, methods=["GET"])
    if pages[0].path != "/":
        app.add_url_rule("/", "home", lambda: redirect(pages[0].path))

    for path, handler in actions.items():

        def act(handler: Action = handler) -> Any:
            try:
                target = handler(request.form, session["user"])
            except ValueError as err:
                body = Markup('<h1>Not done</h1><p class="bad">{}</p>').format(str(err))
                return _layout(title, pages, "", session["user"], csrf(), body), 400
            return redirect(target)

        app.add_url_rule(path, f"action{path}", act, methods=["POST"])
    return app


def csrf_token() -> str:
    """The signed-in session's CSRF token (for forms a page renders)."""
    from flask import session

    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(24)
    return str(session["csrf"])


def serve(app: Any, *, host: str, port: int) -> None:
    """Serve a console until interrupted (threaded, werkzeug)."""
    from werkzeug.serving import make_server

    make_server(host, port, app, threaded=True).serve_forever()
