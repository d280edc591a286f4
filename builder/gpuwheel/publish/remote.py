"""Publish to a remote index (pypiserver, devpi, Artifactory, Nexus) through twine, after looking
each wheel up on the index's simple pages: the same file already there is skipped, another file of
that name refuses the publish."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Sequence
from urllib.parse import urljoin, urlsplit

import requests

from gpuwheel.errors import PublishError
from gpuwheel.log import logger
from gpuwheel.publish.gate import PublishGate, admit, read_all
from gpuwheel.publish.report import PublishedWheel, PublishReport
from gpuwheel.wheelfile import WheelFile

JSON_TYPE = "application/vnd.pypi.simple.v1+json"
_CHUNK = 1 << 20


def publish_remote(wheels: Sequence[Path], repository: str, *, gate: PublishGate | None = None,
                   simple_url: str | None = None, config_file: Path | None = None) -> PublishReport:
    """Upload wheels with twine to `repository` (an upload URL or a .pypirc section name).

    Credentials: TWINE_USERNAME / TWINE_PASSWORD, else the .pypirc section, else keyring; never
    prompted for, never printed. Each wheel is first looked up on the index's simple page
    (simple_url, or found next to the upload URL): same sha256 → skipped, different → refused.
    """
    with tempfile.TemporaryDirectory(prefix="gpuwheel-forced-") as scratch:
        return _publish_remote(read_all(wheels), repository, gate, simple_url, config_file, Path(scratch))


def _publish_remote(found: list[WheelFile], repository: str, gate: PublishGate | None, simple_url: str | None,
                    config_file: Path | None, scratch: Path) -> PublishReport:
    from twine.exceptions import TwineException
    from twine.package import PackageFile
    from twine.settings import Settings
    from twine.utils import DEFAULT_CONFIG_FILE

    found, warnings = admit(found, gate, scratch)
    is_url = "://" in repository
    try:
        settings = Settings(
            repository_url=repository if is_url else None,
            repository_name=repository if not is_url else "pypi",
            config_file=str(config_file) if config_file else DEFAULT_CONFIG_FILE,
            username=os.environ.get("TWINE_USERNAME"),
            password=os.environ.get("TWINE_PASSWORD"),
            non_interactive=True,
            disable_progress_bar=True,
        )
        # twine logs keyring lookups with tracebacks; our error says what is missing in one line
        logging.getLogger("twine").setLevel(logging.ERROR)
        upload_url = settings.repository_config["repository"]  # userinfo already stripped by twine
        _ = settings.username  # resolved first, so a missing username is named as such
        secret = settings.password
        remote = settings.create_repository()
    except TwineException as error:
        raise PublishError(f"cannot use repository {_safe_url(repository)}: {_one_line(str(error))}",
                           hint="set TWINE_USERNAME and TWINE_PASSWORD, or give the repository "
                                "username and password in .pypirc, or store them in keyring") from None
    scrub = _Scrubber(secret)
    try:
        lookup = _SimpleLookup(remote.session, upload_url, simple_url, scrub)
        results: list[PublishedWheel] = []
        to_upload = []
        for wheel in found:
            there = lookup.sha256_of(wheel)
            if there is None:
                to_upload.append(wheel)
            elif there == wheel.sha256:
                logger.info("%s is already on %s with the same sha256: skipped", wheel.filename, upload_url)
                results.append(PublishedWheel(wheel.filename, wheel.sha256, "skipped",
                                              warnings.get(wheel.filename, ())))
            else:
                raise PublishError(scrub(
                    f"{wheel.filename} is already on {upload_url} with sha256 {there[:16]}…, this file "
                    f"has {wheel.sha256[:16]}…; a published file is never replaced"),
                    hint="bump the version or the local version label and rebuild")
        for done, wheel in enumerate(to_upload):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # twine prints progress to stdout
                    response = remote.upload(PackageFile.from_filename(str(wheel.path), None))
            except (requests.RequestException, TwineException) as error:
                raise PublishError(scrub(f"uploading {wheel.filename} to {upload_url} failed: "
                                         f"{_request_failure(error)}{_so_far(done, to_upload)}")) from None
            if not 200 <= response.status_code < 300:
                raise PublishError(scrub(
                    f"{upload_url} refused {wheel.filename}: {response.status_code} {response.reason}"
                    f"{_server_reason(response)}{_so_far(done, to_upload)}"),
                    hint=_refusal_hint(response.status_code))
            results.append(PublishedWheel(wheel.filename, wheel.sha256, "published",
                                          warnings.get(wheel.filename, ())))
    finally:
        remote.close()
    order = {w.filename: i for i, w in enumerate(found)}
    results.sort(key=lambda r: order[r.filename])
    return PublishReport(upload_url, lookup.base or upload_url, tuple(results))


class _Scrubber:
    """Removes the password from any text that may reach the user (server echoes, URLs)."""

    def __init__(self, secret: str | None):
        self.secret = secret

    def __call__(self, text: str) -> str:
        # a 1-3 character "password" would mangle every message and protects nothing
        return text.replace(self.secret, "********") if self.secret and len(self.secret) >= 4 else text


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.username or parts.password:
        return parts._replace(netloc=f"********@{parts.hostname}" + (f":{parts.port}" if parts.port else "")).geturl()
    return url


def _request_failure(error: Exception) -> str:
    """requests' messages nest urllib3's; the OS reason ("Connection refused") is what helps."""
    reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
    if isinstance(error, requests.ConnectionError) and reason:
        return reason.group(1).strip()
    return _one_line(str(error))


def _one_line(text: str, limit: int = 240) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _so_far(done: int, to_upload: Sequence[WheelFile]) -> str:
    if not done:
        return ""
    return f" (after uploading {', '.join(w.filename for w in to_upload[:done])})"


def _refusal_hint(status: int) -> str | None:
    if status in (401, 403):
        return "check the username and password (TWINE_USERNAME / TWINE_PASSWORD, .pypirc or keyring)"
    if status in (400, 409):
        return "the index may already hold this file under another sha256, or refuse its metadata"
    return None


class _TextOf(HTMLParser):
    """The text of an error page: its <pre> (pypiserver), else its title/h1."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[str, list[str]] = {}
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in self.stack:
            del self.stack[self.stack.index(tag):]

    def handle_data(self, data):
        if self.stack:
            self.parts.setdefault(self.stack[-1], []).append(data)


def _server_reason(response: requests.Response) -> str:
    text = response.text or ""
    if "html" in response.headers.get("Content-Type", "") or text.lstrip().startswith("<"):
        parser = _TextOf()
        parser.feed(text)
        for tag in ("pre", "p", "h1", "title"):
            candidate = _one_line(" ".join(parser.parts.get(tag, [])))
            if candidate and candidate not in ("None", response.reason):
                return f": {candidate}"
        return ""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f": {_one_line(first)}" if first and first != response.reason else ""


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (href, text)
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


class _SimpleLookup:
    """Finds a file on a remote index's simple API: PEP 691 JSON if offered, else PEP 503 HTML."""

    def __init__(self, session: requests.Session, upload_url: str, simple_url: str | None, scrub: _Scrubber):
        self.session = session
        self.upload_url = upload_url
        self.scrub = scrub
        self.base = simple_url.rstrip("/") + "/" if simple_url else None
        self.anonymous = requests.Session()

    def _session_for(self, url: str) -> requests.Session:
        # the credentials go to the upload host only
        return self.session if urlsplit(url)[:2] == urlsplit(self.upload_url)[:2] else self.anonymous

    def _get(self, url: str) -> requests.Response:
        """GET without leaving the index: pypiserver redirects unknown projects to pypi.org."""
        origin = urlsplit(url)[:2]
        headers = {"Accept": f"{JSON_TYPE}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"}
        for _ in range(5):
            try:
                response = self._session_for(url).get(url, headers=headers, allow_redirects=False, timeout=60)
            except requests.RequestException as error:
                raise PublishError(self.scrub(f"cannot read {url}: {_request_failure(error)}")) from None
            if not response.is_redirect:
                return response
            url = urljoin(url, response.headers["Location"])
            if urlsplit(url)[:2] != origin:
                response.status_code = 404  # a redirect elsewhere means: not on this index
                return response
        return response

    def _find_base(self, project: str) -> tuple[str, requests.Response]:
        """The simple root next to the upload URL: <url>/simple/ (pypiserver, Nexus, Artifactory)
        or <url>/+simple/ (devpi); the project page's response comes along."""
        root = self.upload_url.rstrip("/") + "/"
        for base in (root + "simple/", root + "+simple/"):
            page = self._get(f"{base}{project}/")
            listing = self._get(base) if page.status_code == 404 else page  # a new project: is the index there?
            if listing.status_code == 200:
                return base, page
            if listing.status_code in (401, 403):  # an index is there, and refuses us: say so, not "no index"
                raise PublishError(self.scrub(f"cannot read {listing.url}: {listing.status_code} {listing.reason}"),
                                   hint=_refusal_hint(listing.status_code))
        raise PublishError(f"found no simple index at {root}simple/ or {root}+simple/ to check for "
                           "files already there", hint="pass --simple-url with the index's simple URL")

    def sha256_of(self, wheel: WheelFile) -> str | None:
        """The sha256 of the file of that name on the index, None when it is not there."""
        if self.base is None:
            self.base, page = self._find_base(wheel.project)
        else:
            page = self._get(f"{self.base}{wheel.project}/")
        if page.status_code == 404:
            return None
        if page.status_code != 200:
            raise PublishError(self.scrub(f"cannot read {page.url}: {page.status_code} {page.reason}"),
                               hint=_refusal_hint(page.status_code))
        for filename, url, hashes in self._files(page):
            if filename == wheel.filename:
                return hashes.get("sha256") or self._download_sha256(url)
        return None

    def _files(self, page: requests.Response) -> list[tuple[str, str, dict[str, str]]]:
        if page.headers.get("Content-Type", "").startswith(JSON_TYPE):
            return [(f["filename"], urljoin(page.url, f["url"]), f.get("hashes", {}))
                    for f in page.json().get("files", [])]
        parser = _Anchors()
        parser.feed(page.text)
        files = []
        for href, text in parser.links:
            url, _, fragment = href.partition("#")
            name, _, value = fragment.partition("=")
            filename = text or url.rsplit("/", 1)[-1]
            files.append((filename, urljoin(page.url, url), {name: value} if value else {}))
        return files

    def _download_sha256(self, url: str) -> str:
        """An index that lists no sha256 (md5 only): hash the file itself."""
        digest = hashlib.sha256()
        try:
            with self._session_for(url).get(url, stream=True, timeout=60) as response:
                response.raise_for_status()
                for chunk in response.iter_content(_CHUNK):
                    digest.update(chunk)
        except requests.RequestException as error:
            raise PublishError(self.scrub(f"cannot download {url} to compare it: {_request_failure(error)}")) from None
        return digest.hexdigest()
