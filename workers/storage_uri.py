"""What a storage URI names and how to reach it: parsing, the pyarrow filesystem behind it, and error
messages that name the setting and the fix but never a secret (`workers/storage.py` builds on this).

    normalize("s3://bucket/p?endpoint_override=http://127.0.0.1:9000", "storage")  # checked, canonical form
    fs, path = filesystem("s3://bucket/p?endpoint_override=...", "storage")       # pyarrow S3FileSystem, "bucket/p"
    join("s3://bucket/p?region=eu-west-1", "jobs", "j-1")                        # "s3://bucket/p/jobs/j-1?region=..."
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import pyarrow.fs as pafs

S3_OPTIONS = ("region", "endpoint_override", "scheme")
ACCEPTED = (
    "a local path (or file:///path; a shared filesystem too) or s3://bucket/prefix with optional "
    "?region=...&endpoint_override=host:port&scheme=http|https"
)
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


class StorageError(OSError, ValueError):
    """A storage URI that is malformed (a ValueError), or storage that is unreachable, refuses access or
    lacks its bucket (an OSError, like any failed write); the message names the setting and the URI."""


def is_uri(text: str | os.PathLike) -> bool:
    """Whether `text` is written as a URI (scheme://...) rather than a plain path."""
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(text)) is not None


def is_remote(text: str | os.PathLike) -> bool:
    """Whether `text` names something that is not a local path (a URI other than file://)."""
    return is_uri(text) and not str(text).lower().startswith("file://")


def describe_failure(setting: str, uri: str, what: str, error: BaseException) -> str:
    """One line: the setting, the URI, what failed and the likely fix; secrets in the text are masked."""
    text = scrub(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    hint = ""
    if re.search(r"NETWORK_CONNECTION|connect to server|resolve host|Connection refused|curlCode: (6|7|28)", text):
        endpoint = endpoint_of(uri) or "the AWS default endpoint"
        hint = (
            f"; cannot reach {endpoint}: check endpoint_override in the URI (or AWS_ENDPOINT_URL) and that "
            "the server is up"
        )
    elif re.search(
        r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|Forbidden|credential", text, re.IGNORECASE
    ):
        hint = (
            "; access refused: give credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            "AWS_PROFILE, or an instance role), never in the URI"
        )
    elif re.search(r"NoSuchBucket|bucket does not exist", text, re.IGNORECASE):
        hint = "; the bucket does not exist (create it first)"
    return f"{setting}: cannot {what} {uri}: {text}{hint}"


def scrub(text: str) -> str:
    """`text` with the values of the AWS secret variables masked."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


# ---- URIs ------------------------------------------------------------------------------------------


def normalize(uri: str, setting: str) -> str:
    if not uri.strip():
        raise StorageError(f"{setting}: empty; accepted: {ACCEPTED}")
    if not is_uri(uri):
        return str(Path(uri).expanduser().resolve())
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(
                f"{setting}: {_safe(uri)!r}: a file:// URI names a local path (file:///path); accepted: {ACCEPTED}"
            )
        return str(Path(parts.path).resolve())
    if scheme != "s3":
        raise StorageError(f"{setting}: {_safe(uri)!r}: the scheme {scheme!r} is not accepted; accepted: {ACCEPTED}")
    if "@" in parts.netloc:
        raise StorageError(
            f"{setting}: {_safe(uri)!r}: credentials do not belong in the URI (it is stored and "
            "logged); give them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", parts.netloc or ""):
        raise StorageError(
            f"{setting}: {_safe(uri)!r}: {parts.netloc!r} is not a bucket name (3-63 of a-z 0-9 . -); "
            f"accepted: {ACCEPTED}"
        )
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(options) - set(S3_OPTIONS))
    if unknown:
        raise StorageError(
            f"{setting}: {_safe(uri)!r}: unknown option(s) {', '.join(unknown)}; accepted options: "
            f"{', '.join(S3_OPTIONS)} (credentials go in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
        )
    if options.get("scheme", "https") not in ("http", "https"):
        raise StorageError(f"{setting}: {_safe(uri)!r}: scheme={options['scheme']!r}; accepted: http, https")
    key = "/".join(p for p in parts.path.split("/") if p)
    query = f"?{urlencode(sorted(options.items()), safe=':/')}" if options else ""
    return f"s3://{parts.netloc}{'/' + key if key else ''}{query}"


def join(uri: str, *parts: str) -> str:
    tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    if not tail:
        return uri
    if not is_uri(uri):
        return str(Path(uri, tail))
    head, _, query = uri.partition("?")
    return f"{head.rstrip('/')}/{tail}" + (f"?{query}" if query else "")


def _safe(uri: str) -> str:
    """The URI for an error message: user info before an '@' and the values of unknown options masked."""
    uri = re.sub(r"^([A-Za-z0-9+.-]+://)[^/@]*@", r"\1***@", uri)
    head, sep, query = uri.partition("?")
    masked = [(k, v if k in S3_OPTIONS else "***") for k, v in parse_qsl(query, keep_blank_values=True)]
    return head + (sep + urlencode(masked, safe=":/*") if sep else "")


def endpoint_of(uri: str) -> str | None:
    if not uri.startswith("s3://"):
        return None
    options = dict(parse_qsl(urlsplit(uri).query))
    return (
        options.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )


def filesystem(uri: str, setting: str) -> tuple[pafs.FileSystem, str]:
    if not is_uri(uri):
        return _local_fs(), uri
    parts = urlsplit(uri)
    options = dict(parse_qsl(parts.query))
    problem = _credentials_problem()
    if problem:
        raise StorageError(f"{setting}: {uri}: {problem}")
    try:
        fs = _s3(options.get("region"), endpoint_of(uri), options.get("scheme"))
    except Exception as e:  # noqa: BLE001 - pyarrow's own error types
        raise StorageError(describe_failure(setting, uri, "open", e)) from None
    return fs, f"{parts.netloc}/{parts.path.strip('/')}".rstrip("/")


@lru_cache(maxsize=1)
def _local_fs() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@lru_cache(maxsize=16)
def _s3(region: str | None, endpoint: str | None, scheme: str | None) -> pafs.S3FileSystem:
    """One client per (region, endpoint, scheme) in this process; credentials from the AWS chain."""
    if endpoint and "://" in endpoint:
        given, _, endpoint = endpoint.partition("://")
        scheme = scheme or given
    return pafs.S3FileSystem(
        region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        endpoint_override=endpoint or None,
        scheme=scheme or "https",
        connect_timeout=5,
        request_timeout=60,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )


def _credentials_problem() -> str | None:
    """Why no AWS credentials can be found, when the instance-role lookup is switched off; else None
    (with it on, only a request can tell)."""
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        return None
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return None
    if any(
        os.environ.get(v)
        for v in (
            "AWS_PROFILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        )
    ):
        return None
    files = [
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
        os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config",
    ]
    if any(Path(f).expanduser().is_file() for f in files):
        return None
    return (
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or "
        "AWS_WEB_IDENTITY_TOKEN_FILE); the instance-role lookup is off (AWS_EC2_METADATA_DISABLED=true)"
    )
