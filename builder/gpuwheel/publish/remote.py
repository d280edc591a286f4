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
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
from pypi_simple import (
    IndexPage,
    NoSuchProjectError,
    ProjectPage,
    PyPISimple,
    UnsupportedContentTypeError,
    UnsupportedRepoVersionError,
)

from gpuwheel.errors import PublishError
from gpuwheel.log import logger
from gpuwheel.publish.gate import PublishGate, admit, read_all
from gpuwheel.publish.report import PublishedWheel, PublishReport
from gpuwheel.wheelfile import WheelFile

_CHUNK = 1 << 20
_UNREADABLE = (UnsupportedContentTypeError, UnsupportedRepoVersionError)  # an answer that is no simple page


def publish_remote(
    wheels: Sequence[Path],
    repository: str,
    *,
    gate: PublishGate | None = None,
    simple_url: str | None = None,
    config_file: Path | None = None,
) -> PublishReport:
    """Upload wheels with twine to `repository` (an upload URL or a .pypirc section name).

    Credentials: TWINE_USERNAME / TWINE_PASSWORD, else the .pypirc section, else keyring; never
    prompted for, never printed. Each wheel is first looked up on the index's simple page
    (simple_url, or found next to the upload URL): same sha256 → skipped, different → refused.
    """
    with tempfile.TemporaryDirectory(prefix="gpuwheel-forced-") as scratch:
        return _publish_remote(read_all(wheels), repository, gate, simple_url, config_file, Path(scratch))


def _publish_remote(
    found: list[WheelFile],
    repository: str,
    gate: PublishGate | None,
    simple_url: str | None,
    config_file: Path | None,
    scratch: Path,
) -> PublishReport:
    # twine's settings load in ~0.1 s: only an upload to a remote index pays for them.
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
        if not upload_url:  # twine refuses a repository without a URL first; this keeps upload_url a str
            raise PublishError(f"repository {repository} has no URL", hint="give it a repository URL in .pypirc")
        _ = settings.username  # resolved first, so a missing username is named as such
        secret = settings.password
        remote = settings.create_repository()
    except TwineException as error:
        raise PublishError(
            f"cannot use repository {_safe_url(repository)}: {_one_line(str(error))}",
            hint="set TWINE_USERNAME and TWINE_PASSWORD, or give the repository "
            "username and password in .pypirc, or store them in keyring",
        ) from None
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
                results.append(
                    PublishedWheel(wheel.filename, wheel.sha256, "skipped", warnings.get(wheel.filename, ()))
                )
            else:
                raise PublishError(
                    scrub(
                        f"{wheel.filename} is already on {upload_url} with sha256 {there[:16]}…, this file "
                        f"has {wheel.sha256[:16]}…; a published file is never replaced"
                    ),
                    hint="bump the version or the local version label and rebuild",
                )
        for done, wheel in enumerate(to_upload):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # twine prints progress to stdout
                    response = remote.upload(PackageFile.from_filename(str(wheel.path), None))
            except (requests.RequestException, TwineException) as error:
                raise PublishError(
                    scrub(
                        f"uploading {wheel.filename} to {upload_url} failed: "
                        f"{_request_failure(error)}{_so_far(done, to_upload)}"
                    )
                ) from None
            if not 200 <= response.status_code < 300:
                raise PublishError(
                    scrub(
                        f"{upload_url} refused {wheel.filename}: {response.status_code} {response.reason}"
                        f"{_server_reason(response)}{_so_far(done, to_upload)}"
                    ),
                    hint=_refusal_hint(response.status_code),
                )
            results.append(PublishedWheel(wheel.filename, wheel.sha256, "published", warnings.get(wheel.filename, ())))
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


def _response_of(error: requests.HTTPError) -> requests.Response:
    """The answer an HTTPError carries: raise_for_status, which raises every one caught here, sets it."""
    if error.response is None:
        raise error
    return error.response


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
            del self.stack[self.stack.index(tag) :]

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


def _stay_on_index(response: requests.Response, **_: object) -> requests.Response:
    """A redirect off the index means "not on this index": pypiserver redirects unknown projects to pypi.org."""
    if response.is_redirect:
        target = urljoin(response.url, response.headers["Location"])
        if urlsplit(target)[:2] != urlsplit(response.url)[:2]:
            response.status_code = 404
            del response.headers["Location"]
    return response


class _SimpleLookup:
    """Finds a file on a remote index's simple pages (PEP 691 JSON or PEP 503 HTML, read by pypi-simple)."""

    def __init__(self, session: requests.Session, upload_url: str, simple_url: str | None, scrub: _Scrubber):
        self.upload_url = upload_url
        self.scrub = scrub
        self.base = simple_url.rstrip("/") + "/" if simple_url else None
        self.authenticated = requests.Session()
        self.authenticated.auth = session.auth  # twine's credentials, for the upload host only
        self.anonymous = requests.Session()
        for own in (self.authenticated, self.anonymous):
            own.hooks["response"].append(_stay_on_index)

    def _session_for(self, url: str) -> requests.Session:
        # the credentials go to the upload host only
        return self.authenticated if urlsplit(url)[:2] == urlsplit(self.upload_url)[:2] else self.anonymous

    def _fetch(self, base: str, project: str | None) -> ProjectPage | IndexPage | None:
        """The project's page (the index's root page for None); None when the index answers 404."""
        client = PyPISimple(endpoint=base, session=self._session_for(base))
        try:
            return client.get_project_page(project, timeout=60) if project else client.get_index_page(timeout=60)
        except NoSuchProjectError:
            return None
        except requests.HTTPError as error:
            if error.response is not None and error.response.status_code == 404:
                return None
            raise

    def _read(self, base: str, project: str) -> ProjectPage | None:
        url = f"{base}{project}/"
        try:
            page = self._fetch(base, project)
        except requests.HTTPError as error:
            response = _response_of(error)
            status, reason = response.status_code, response.reason
            raise PublishError(
                self.scrub(f"cannot read {url}: {status} {reason}"), hint=_refusal_hint(status)
            ) from None
        except requests.RequestException as error:
            raise PublishError(self.scrub(f"cannot read {url}: {_request_failure(error)}")) from None
        except _UNREADABLE as error:
            raise PublishError(self.scrub(f"cannot read {url}: {error}")) from None
        assert page is None or isinstance(page, ProjectPage)
        return page

    def _find_base(self, project: str) -> tuple[str, ProjectPage | None]:
        """The simple root next to the upload URL: <url>/simple/ (pypiserver, Nexus, Artifactory)
        or <url>/+simple/ (devpi); the project's page comes along."""
        root = self.upload_url.rstrip("/") + "/"
        for base in (root + "simple/", root + "+simple/"):
            try:
                page = self._fetch(base, project)
                if page is not None or self._fetch(base, None) is not None:  # a new project: is the index there?
                    return base, page  # type: ignore[return-value]
            except requests.HTTPError as error:
                response = _response_of(error)
                status = response.status_code
                if status in (401, 403):  # an index is there, and refuses us: say so, not "no index"
                    raise PublishError(
                        self.scrub(f"cannot read {response.url}: {status} {response.reason}"),
                        hint=_refusal_hint(status),
                    ) from None
            except requests.RequestException as error:
                raise PublishError(self.scrub(f"cannot read {base}: {_request_failure(error)}")) from None
            except _UNREADABLE:
                continue  # something else answers there: no index
        raise PublishError(
            f"found no simple index at {root}simple/ or {root}+simple/ to check for files already there",
            hint="pass --simple-url with the index's simple URL",
        )

    def sha256_of(self, wheel: WheelFile) -> str | None:
        """The sha256 of the file of that name on the index, None when it is not there."""
        if self.base is None:
            self.base, page = self._find_base(wheel.project)
        else:
            page = self._read(self.base, wheel.project)
        for package in page.packages if page else ():
            if package.filename == wheel.filename:
                return package.digests.get("sha256") or self._download_sha256(package.url)
        return None

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
