"""Package downloads: the per-agent URL an offer carries, and the view serving the bytes.

The URL is the only credential: a token signed with the server's secret (a Django
TimestampSigner) naming the file and the agent it was offered to, valid for
OPAMP_PACKAGE_URL_SECONDS. The view also checks that the file is still in that agent's
desired set, so a URL outlives neither its expiry nor the assignment. Anything else
(a forged or expired token, another file, a path that is not a token) is a plain 404:
nothing is listable and nothing tells what exists.

Served from the storage in chunks (never read whole), with one-range Range requests
(206 / 416), HEAD, an exact Content-Length and the file's SHA-256 as its ETag, so an agent
resumes a cut download where it stopped.

Behind nginx (the production profile), OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX names an
`internal` nginx location aliasing the packages directory: the view checks the token as
above, then answers with X-Accel-Redirect to the file under that prefix and nginx sends
the bytes itself (Range, HEAD, sendfile), so no server process holds a connection, a
thread or a file for a download's duration.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO
from urllib.parse import quote, urlsplit

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core import signing
from django.db import connection
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from rollouts.models import PackageFile
from rollouts.package_assignments import agent_package_facts_by_uid, package_definitions
from rollouts.package_files import CHUNK_BYTES, open_package_file, package_storage_directory

SALT = "rollouts.package-download"
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def download_token(*, file_id: int, instance_uid: uuid.UUID) -> str:
    return signing.TimestampSigner(salt=SALT).sign_object({"f": file_id, "a": instance_uid.hex})


@dataclass(frozen=True)
class DownloadGrant:
    file_id: int
    instance_uid: uuid.UUID


def read_download_token(token: str, *, max_age: float | None = None) -> DownloadGrant | None:
    """The grant a token carries, or None when it is forged, malformed or expired."""
    age = settings.OPAMP_PACKAGE_URL_SECONDS if max_age is None else max_age
    try:
        data = signing.TimestampSigner(salt=SALT).unsign_object(token, max_age=age)
        return DownloadGrant(file_id=int(data["f"]), instance_uid=uuid.UUID(hex=str(data["a"])))
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        return None


def download_base_url(endpoint: str) -> str:
    """Scheme and host downloads are served on: the setting, else the OpAMP endpoint's
    (ws -> http, wss -> https)."""
    if settings.OPAMP_PACKAGE_DOWNLOAD_BASE_URL:
        return str(settings.OPAMP_PACKAGE_DOWNLOAD_BASE_URL).rstrip("/")
    parts = urlsplit(endpoint or "http://localhost")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme or "http")
    return f"{scheme}://{parts.netloc}"


def download_url(*, base: str, file_id: int, instance_uid: uuid.UUID) -> str:
    token = download_token(file_id=file_id, instance_uid=instance_uid)
    return base + reverse("package-download", kwargs={"token": token})


def granted_file(grant: DownloadGrant) -> PackageFile | None:
    """The file, if it is in the granted agent's desired package set now."""
    facts = agent_package_facts_by_uid(grant.instance_uid)
    if facts is None:
        return None
    desired = facts.desired(package_definitions())
    if not any(package.file.file_id == grant.file_id for package in desired.packages.values()):
        return None
    return PackageFile.objects.filter(pk=grant.file_id).first()


def byte_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """(first, last) of a single satisfiable range; None: serve the whole file (no header,
    several ranges or a syntax we do not take); False: unsatisfiable (416)."""
    found = _RANGE.match(header.strip()) if header else None
    if found is None:
        return None
    first_text, last_text = found.groups()
    if not first_text:
        if not last_text:
            return None
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            return False
        return max(0, size - suffix), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if last_text and last < first:
        return None  # syntactically invalid: ignored, as RFC 9110 says
    if first >= size:
        return False
    return first, min(last, size - 1)


async def _chunks(handle: IO[bytes], start: int, length: int) -> AsyncIterator[bytes]:
    """The bytes, one chunk at a time. Asynchronous: Django's ASGI handler reads a
    synchronous iterator whole into memory before sending any of it."""
    read = sync_to_async(handle.read, thread_sensitive=False)
    try:
        await sync_to_async(handle.seek, thread_sensitive=False)(start)
        left = length
        while left > 0:
            data = await read(min(CHUNK_BYTES, left))
            if not data:
                break
            left -= len(data)
            yield data
    finally:
        await sync_to_async(handle.close, thread_sensitive=False)()


def _describe(response: HttpResponseBase, file: PackageFile) -> HttpResponseBase:
    """The headers an agent needs whoever sends the bytes: its If-Range repeats the ETag."""
    response["Content-Type"] = "application/octet-stream"
    response["ETag"] = f'"{file.sha256}"'
    response["Cache-Control"] = "private, no-store"
    return response


def _accel_redirect(file: PackageFile) -> HttpResponse | None:
    """The hand-over to nginx, when it serves package files (None: the app streams them).

    Only a local directory can be aliased by nginx. Another storage backend (an object
    store) has no path nginx could open, and reaching it from nginx would need that
    store's credentials and signing in nginx: its files keep streaming through the app.
    """
    prefix = settings.OPAMP_PACKAGE_DOWNLOAD_ACCEL_PREFIX
    if not prefix or package_storage_directory() is None:
        return None
    response = HttpResponse()
    # nginx unescapes the URI and refuses one with `..` segments; stored names are
    # `<package>/<hex>` anyway (rollouts.package_files).
    response["X-Accel-Redirect"] = prefix + quote(file.storage_name, safe="/")
    _describe(response, file)
    return response


@require_http_methods(["GET", "HEAD"])
def package_download(request: HttpRequest, token: str) -> HttpResponseBase:
    grant = read_download_token(token)
    file = granted_file(grant) if grant is not None else None
    if file is None:
        raise Http404
    if (handed_over := _accel_redirect(file)) is not None:
        return handed_over
    etag = f'"{file.sha256}"'
    wanted = byte_range(request.headers.get("Range", ""), file.size)
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:
        wanted = None  # the agent's partial copy is of other bytes: send the whole file
    if wanted is False:
        refused = HttpResponse(status=416)
        refused["Content-Range"] = f"bytes */{file.size}"
        return refused
    start, last = wanted if isinstance(wanted, tuple) else (0, file.size - 1)
    length = last - start + 1
    status = 206 if isinstance(wanted, tuple) else 200
    if request.method == "HEAD":
        response: HttpResponseBase = HttpResponse(status=status)
    else:
        handle = open_package_file(file.storage_name)
        response = StreamingHttpResponse(_chunks(handle, start, length), status=status)
        # The stream needs no database, and Django gives the request's connection back only
        # when the response is done: 2,000 agents downloading at once held as many
        # connections and starved the pool (every session's query then failed). Inside a
        # transaction (a test's) the connection is the transaction's and stays.
        if not connection.in_atomic_block:
            connection.close()
    _describe(response, file)
    response["Content-Length"] = str(length)
    response["Accept-Ranges"] = "bytes"
    if status == 206:
        response["Content-Range"] = f"bytes {start}-{last}/{file.size}"
    return response
