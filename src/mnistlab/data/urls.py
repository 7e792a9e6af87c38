"""URLs that may carry credentials (`https://user:token@host/...`, as pip's index URLs may):
requests that send them, and the redacted form every message shows instead.

urllib does not read credentials out of a URL, so `request` moves them into an Authorization
header sent to that URL only: an unredirected header, which a redirect to another host never
receives.
"""

from __future__ import annotations

import base64
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import Request

from mnistlab._version import __version__

TIMEOUT = 30.0  # seconds for a connect or a read: a stalled server fails instead of hanging
USER_AGENT = f"mnistlab/{__version__}"


def _without_userinfo(url: str) -> tuple[str, str | None]:
    """(`url` without its user[:password]@ part, that part or None)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    return urlunsplit(parts._replace(netloc=host)), userinfo


def redact(url: str) -> str:
    """`url` with any credentials replaced by `****`: the form to print."""
    clean, userinfo = _without_userinfo(url)
    if userinfo is None:
        return url
    parts = urlsplit(clean)
    return urlunsplit(parts._replace(netloc="****@" + parts.netloc))


def request(url: str, headers: dict[str, str]) -> Request:
    """A request for `url` with `headers`; credentials in the URL go in a Basic Authorization
    header for this URL alone."""
    clean, userinfo = _without_userinfo(url)
    req = Request(clean, headers=headers)
    if userinfo is not None:
        user, _, password = userinfo.partition(":")
        token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        req.add_unredirected_header("Authorization", f"Basic {token}")
    return req


def same_origin(url: str, other: str) -> bool:
    """True when both URLs name the same scheme, host and port (credentials ignored)."""
    a, b = urlsplit(_without_userinfo(url)[0]), urlsplit(_without_userinfo(other)[0])
    return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)


def with_userinfo_of(url: str, source: str) -> str:
    """`url` carrying `source`'s credentials (pip sends an index's credentials to files on the
    same host); unchanged when it has its own or `source` has none."""
    userinfo = _without_userinfo(source)[1]
    if userinfo is None or _without_userinfo(url)[1] is not None:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))
