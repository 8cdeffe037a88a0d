"""deploy/tls.md's recipe, run as written: deploy/make-certs.sh makes the CA and certificates
with openssl, and a server started with them and deploy/acl.example.toml gives each identity
exactly the rights the example says. The client side verifies strictly (VERIFY_X509_STRICT,
Python 3.13's default), so the recipe's certificates also pass newer verifiers."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import servers
from test_store_support import Packets

from jobserver.protocol import PacketType as T

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
IDENTITIES = ("webapp", "image-worker", "ops")
MAKE_CERTS_TIMEOUT = 60.0
"""Seconds for openssl to make a 3072-bit CA key and four 2048-bit keys: about a second
normally; generous for a loaded CI machine."""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed (Debian package openssl)")
    folder = tmp_path_factory.mktemp("certs")
    subprocess.run(
        ["sh", str(DEPLOY / "make-certs.sh"), "DNS:localhost,IP:127.0.0.1", *IDENTITIES],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=MAKE_CERTS_TIMEOUT,
    )
    return folder


def tls_packets(port: int, certs: Path, identity: str) -> Packets:
    context = ssl.create_default_context(cafile=certs / "ca.pem")
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(certs / f"{identity}.pem", certs / f"{identity}.key")
    packets = Packets(port)
    packets.sock = context.wrap_socket(packets.sock, server_hostname="localhost")
    return packets


def test_the_recipe_makes_what_the_doc_lists(certs: Path):
    made = {path.name for path in certs.iterdir()}
    for name in ("ca", "server", *IDENTITIES):
        assert {f"{name}.pem", f"{name}.key"} <= made
    assert (certs / "ca.key").stat().st_mode & 0o077 == 0  # private keys: owner only


def test_the_example_acl_gives_each_identity_its_rights(start_jobserver, certs: Path):
    tls_port = servers.free_port()
    server = start_jobserver(
        "--store", "memory", "--listen", "127.0.0.1",
        "--tls-port", str(tls_port),
        "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
        "--tls-ca", str(certs / "ca.pem"),
        "--acl", str(DEPLOY / "acl.example.toml"), "--loopback-identity", "ops",
    )  # fmt: skip
    with (
        tls_packets(tls_port, certs, "webapp") as webapp,
        tls_packets(tls_port, certs, "image-worker") as worker,
    ):
        handle = webapp.submit(T.SUBMIT_JOB_BG, b"resize", b"u1", b"a.png")
        webapp.submit(T.SUBMIT_JOB_BG, b"thumbnail_small", b"u2", b"b.png")
        code, _text = webapp.request(T.SUBMIT_JOB_BG, b"billing", b"", b"x", expect=T.ERROR)
        assert code == b"PERMISSION_DENIED"
        code, _text = worker.request(T.SUBMIT_JOB_BG, b"resize", b"", b"x", expect=T.ERROR)
        assert code == b"PERMISSION_DENIED"
        worker.send(T.CAN_DO, b"resize")
        assigned_handle, function, payload = worker.request(T.GRAB_JOB, expect=T.JOB_ASSIGN)
        assert (assigned_handle, function, payload) == (handle, b"resize", b"a.png")
        worker.send(T.WORK_COMPLETE, handle, b"")
    # ops over loopback plaintext (--loopback-identity ops): admin, and every function listed
    status = servers.admin(server.address, "status")
    assert b"thumbnail_small\t1\t0\t0" in status
    assert servers.admin(server.address, "cancel job nonexistent").startswith(b"ERR UNKNOWN_JOB")
    log = server.stderr_text()
    assert "identity 'webapp' may not submit jobs of 'billing'" in log
    assert "identity 'image-worker' may not submit jobs of 'resize'" in log
