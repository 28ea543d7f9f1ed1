"""A real S3-compatible server on 127.0.0.1 for tests: moto's standalone server (`moto[server]`, a dev
dependency), started in this process, with a bucket and fake credentials in the environment (which Ray
nodes started afterwards inherit).

    with s3_server() as s3:
        storage = JobStorage.open(s3.uri("prefixd"))   # s3://prefixd-test/prefixd?endpoint_override=...
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "fake-test-access-key",
    "AWS_SECRET_ACCESS_KEY": "fake-test-secret-key-0042",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3:
    endpoint: str
    """http://127.0.0.1:PORT"""
    bucket: str

    def uri(self, key: str = "") -> str:
        """s3://bucket/key with this server as its endpoint."""
        path = f"/{key.strip('/')}" if key.strip("/") else ""
        return f"s3://{self.bucket}{path}?endpoint_override={self.endpoint}"


@contextmanager
def s3_server(bucket: str = "prefixd-test") -> Iterator[S3]:
    """The server, its bucket, and CREDENTIALS set in os.environ (restored on exit)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        for name, value in CREDENTIALS.items():
            mp.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            pafs.S3FileSystem(
                endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
            ).create_dir(bucket)
            yield S3(endpoint=f"http://{host}:{port}", bucket=bucket)
        finally:
            server.stop()
