"""A file of a project on the Python package index that pip uses here.

The indexes are pip's: `PIP_INDEX_URL`, else pip's configured `index-url` (as `pip download`
reads it: its [download] section over [global]), else PyPI; then the extra ones, from
`PIP_EXTRA_INDEX_URL` or the configured `extra-index-url`. pip is asked (`pip config list`)
only when an environment variable does not already say. A project's simple page is read as
PEP 691 JSON or PEP 503 HTML, whichever the index answers; a `sha256` it gives for the file is
returned for the caller to check. Credentials in an index URL are sent to that index's host
alone, and printed nowhere (see `mnistlab.data.urls`).
"""

from __future__ import annotations

import ast
import http.client
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import url2pathname, urlopen

from mnistlab.data.urls import TIMEOUT, USER_AGENT, request, same_origin, with_userinfo_of

PYPI = "https://pypi.org/simple/"
JSON_PAGE = "application/vnd.pypi.simple.v1+json"
ACCEPT = f"{JSON_PAGE}, text/html;q=0.1"  # PEP 691: JSON preferred, HTML understood
MAX_PAGE = 16 << 20  # bytes of a simple page read at most: PyPI's largest are a few MB


class NotOnIndex(Exception):
    """This index cannot give the file; the message says why."""


@dataclass(frozen=True)
class Found:
    """Where an index serves a file, and the SHA-256 it lists for it (None: none listed)."""

    url: str
    sha256: str | None


def normalize(project: str) -> str:
    """A project's name as its simple page is addressed (PEP 503)."""
    return re.sub(r"[-_.]+", "-", project).lower()


def index_urls() -> list[str]:
    """The simple-index base URLs pip uses here: the main one, then the extra ones."""
    main, extra = os.environ.get("PIP_INDEX_URL"), os.environ.get("PIP_EXTRA_INDEX_URL")
    if main is None or extra is None:
        config = _pip_config()
        main = config.get("index-url", "") if main is None else main
        extra = config.get("extra-index-url", "") if extra is None else extra
    return list(dict.fromkeys([main.strip() or PYPI, *extra.split()]))


def _pip_config() -> dict[str, str]:
    """pip's configured values for `pip download` ({} when pip is absent or fails)."""
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
            timeout=60, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    values: dict[str, str] = {}
    for section in ("global", "download"):  # the later section wins, as in pip
        for line in listed.stdout.splitlines() if listed.returncode == 0 else ():
            key, eq, value = line.partition("=")
            if eq and key.startswith(f"{section}."):
                values[key.removeprefix(f"{section}.")] = _unquote(value)
    return values


def _unquote(value: str) -> str:
    """A value as `pip config list` prints it: a Python string literal (a multi-line one has
    `\\n` escapes)."""
    try:
        literal = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return value.strip()
    return literal if isinstance(literal, str) else value.strip()


def find(index: str, project: str, filename: str) -> Found:
    """Where the index at `index` serves `filename` of `project`; NotOnIndex says why not."""
    page = index.rstrip("/") + f"/{normalize(project)}/"
    body, kind, final = _get(page)
    files = _json_files(body) if kind == JSON_PAGE else _html_files(body)
    for name, href, sha256 in files:
        if name == filename:
            url = urljoin(final, href)
            if same_origin(url, index):
                url = with_userinfo_of(url, index)  # pip sends an index's credentials there too
            return Found(url, sha256)
    raise NotOnIndex(f"{project} has no file {filename} there ({len(files)} other files)")


def _get(url: str) -> tuple[bytes, str, str]:
    """(body, content type, final URL) of a simple page; a local index's folder is read as its
    index.html, as pip does."""
    target = url
    parts = urlsplit(url)
    if parts.scheme == "file" and Path(url2pathname(parts.path)).is_dir():
        target = url + "index.html"
    try:
        headers = {"User-Agent": USER_AGENT, "Accept": ACCEPT}
        with urlopen(request(target, headers), timeout=TIMEOUT) as response:
            body = response.read(MAX_PAGE + 1)
            kind = response.headers.get_content_type()
            final = response.geturl()
    except HTTPError as exc:
        raise NotOnIndex(f"HTTP {exc.code} {exc.reason}") from None
    except URLError as exc:
        raise NotOnIndex(str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise NotOnIndex(str(exc) or type(exc).__name__) from None
    if len(body) > MAX_PAGE:
        raise NotOnIndex(f"the page is larger than {MAX_PAGE} bytes: not a simple page")
    return body, kind, final


def _json_files(body: bytes) -> list[tuple[str, str, str | None]]:
    """(filename, URL, sha256 or None) of each file a PEP 691 page lists."""
    try:
        files = json.loads(body)["files"]
        return [(f["filename"], f["url"], f.get("hashes", {}).get("sha256")) for f in files]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise NotOnIndex(f"not a PEP 691 JSON page ({type(exc).__name__}: {exc})") from None


def _html_files(body: bytes) -> list[tuple[str, str, str | None]]:
    """(filename, URL, sha256 or None) of each link a PEP 503 page lists: the name is the URL's
    last path segment, the sum its `#sha256=` fragment."""
    parser = _Links()
    parser.feed(body.decode("utf-8", errors="replace"))
    files = []
    for href in parser.hrefs:
        url, _, fragment = href.partition("#")
        name = unquote(urlsplit(url).path.rpartition("/")[2])
        algorithm, _, digest = fragment.partition("=")
        files.append((name, url, digest.lower() if algorithm == "sha256" and digest else None))
    return files


class _Links(HTMLParser):
    """Collects the href of every <a> element."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)
