"""rediss:// against a real TLS Redis, with a throw-away CA made by the openssl CLI."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from ratebox import producer, stream
from ratebox.errors import ServerUnavailable

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
OPENSSL = shutil.which("openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL or "openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(where: Path) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it; returns the CA's file."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=ratebox test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=where)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=where)  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.pem",
             cwd=where)  # fmt: skip
    return where / "ca.pem"


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server answering TLS only on a loopback port."""
    if OPENSSL is None or not Path(REDIS_SERVER).exists():
        pytest.skip("openssl or redis-server missing")
    ca = make_certificates(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.pem", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with closing(socket.socket()) as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield port, ca
    finally:
        server.terminate()
        server.wait(15)


def test_rediss_with_the_ca_in_the_url_verifies_and_carries_the_stream(tls_redis, names) -> None:
    port, ca = tls_redis
    client = stream.connect(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}")
    try:
        producer.produce(client, names.stream, 10)
        stream.ensure_group(client, names.stream, names.group)
        read = stream.read(client, names.stream, names.group, "worker_001", 10)
        assert len(read) == 10 and all(fields for _, fields in read)
    finally:
        client.close()


def test_rediss_without_the_ca_is_refused_in_one_line(tls_redis) -> None:
    port, _ = tls_redis
    with pytest.raises(ServerUnavailable) as refused:
        stream.connect(f"rediss://127.0.0.1:{port}/0")
    assert "certificate verify failed" in str(refused.value)
    assert "\n" not in str(refused.value)
