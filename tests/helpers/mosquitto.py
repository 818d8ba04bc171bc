"""A real mosquitto for the fleet tests and benchmarks, with mutual TLS and an ACL file.

    from helpers.mosquitto import Pki, Mosquitto, mqtt_client

    pki = Pki(tmp_path / "pki")                       # a CA, a server certificate (127.0.0.1)
    broker = Mosquitto(tmp_path / "broker", pki=pki, acl=acl_lines({"dev1": ["g"]}, operator="operator"))
    broker.start()
    client = mqtt_client(broker, "dev1")              # a connected paho client whose certificate CN is dev1
    ...
    broker.stop()

With ``pki`` the broker listens for TLS only, ``require_certificate true`` and
``use_identity_as_username true``: a client's username is its certificate's CN, which the
ACL's ``%u`` patterns and ``user`` lines name.  Without ``pki`` it listens in the clear and
allows anonymous clients (the ACL, when given, still applies: to the client's username).
Retained messages persist in the broker's directory across ``stop``/``start`` (``restart``).
The ``tls_broker`` and ``plain_broker`` fixtures stop the broker at the end of the test.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest

from conftest import free_port, wait_for

__all__ = ["MOSQUITTO", "Pki", "Mosquitto", "mqtt_client", "tls_broker", "plain_broker"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Pki:
    """A test CA (EC P-256) in ``directory``: ``ca.pem``, the server's ``server.pem``/
    ``server.key`` (for 127.0.0.1 and localhost), and client certificates on demand
    (``client(name)``: CN = name)."""

    def __init__(self, directory: Path) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, NameOID
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgebus test fleet CA")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._ca_name = name
        self._ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                 content_commitment=False, key_encipherment=False,
                                                 data_encipherment=False, key_agreement=False,
                                                 encipher_only=False, decipher_only=False), critical=True)
                    .sign(self._ca_key, hashes.SHA256()))
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self._ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert, self.server_key = self._issue("server", server=True)

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) files of a client whose CN is ``name`` (made once)."""
        cert = self.dir / f"{name}.pem"
        if cert.exists():
            return cert, self.dir / f"{name}.key"
        return self._issue(name)

    def _issue(self, name: str, server: bool = False) -> tuple[Path, Path]:
        import ipaddress

        x509, oid = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(oid.COMMON_NAME, name)])).issuer_name(self._ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self._ca_key, self._hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(self._ser.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(self._ser.Encoding.PEM, self._ser.PrivateFormat.PKCS8,
                                               self._ser.NoEncryption()))
        os.chmod(key_path, 0o600)
        return cert_path, key_path


class Mosquitto:
    """One mosquitto process on a free port of 127.0.0.1 (``port``), its files in ``directory``."""

    def __init__(self, directory: Path, *, pki: Pki | None = None, acl: Iterable[str] | None = None,
                 port: int | None = None, extra: str = "") -> None:
        if not os.path.exists(MOSQUITTO):
            pytest.skip("mosquitto is not installed (make test installs it)")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.acl_file = directory / "acl"
        self.conf = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        lines = [f"listener {self.port} 127.0.0.1", "persistence true", f"persistence_location {directory}/",
                 "autosave_interval 1", f"log_dest file {self.log}", "log_type error", "log_type warning",
                 "log_type notice", "max_queued_messages 100000"]
        if os.geteuid() == 0:  # as root it would switch to user mosquitto, who cannot read tmp_path
            lines.append("user root")
        if pki is not None:
            lines += [f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}",
                      "require_certificate true", "use_identity_as_username true", "allow_anonymous false"]
        else:
            lines += ["allow_anonymous true"]
        if acl is not None:
            self.acl_file.write_text("\n".join(acl) + "\n")
            lines.append(f"acl_file {self.acl_file}")
        self.conf.write_text("\n".join(lines) + "\n" + extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.unlink(missing_ok=True)
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        # listening, and catching SIGHUP (set_acl's reload; before its handler is set it would end it)
        wait_for(lambda: self.proc.poll() is not None or (_catches_sighup(self.proc.pid) and _listening(self.port)),
                 20, "mosquitto to listen")
        if self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited ({self.proc.returncode}): {self.log_text()[-2000:]}")

    def stop(self) -> None:
        """Stop it (SIGTERM: it saves its retained messages) and wait for it to exit."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def set_acl(self, lines: Iterable[str]) -> None:
        """Replace the ACL file and make the running broker reload it (SIGHUP)."""
        self.acl_file.write_text("\n".join(lines) + "\n")
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client_settings(self, name: str) -> dict[str, Any]:
        """The broker's part of a fleet service's settings for device ``name``: host, port and
        (with a PKI) the TLS files."""
        settings: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.pki is not None:
            cert, key = self.pki.client(name)
            settings.update(tls_ca=str(self.pki.ca), tls_cert=str(cert), tls_key=str(key))
        return settings


def _catches_sighup(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) & (1 << (signal.SIGHUP - 1)))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def mqtt_client(broker: Mosquitto, name: str, *, connect: bool = True, timeout: float = 20) -> Any:
    """A paho client (MQTT 3.1.1) for ``name`` (its certificate's CN with a PKI; its client id
    and username without), its network loop started and, with ``connect``, connected (waits
    for the CONNACK).  Close it with ``client.loop_stop(); client.disconnect()``."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{name}-{os.getpid()}-{id(broker)}",
                         clean_session=True)
    if broker.pki is not None:
        cert, key = broker.pki.client(name)
        client.tls_set(ca_certs=str(broker.pki.ca), certfile=str(cert), keyfile=str(key),
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    else:
        client.username_pw_set(name)
    if connect:
        connected = threading.Event()
        client.on_connect = lambda c, u, f, rc, p=None: connected.set()
        client.connect(broker.host, broker.port, keepalive=30)
        client.loop_start()
        if not connected.wait(timeout):
            client.loop_stop()
            raise AssertionError(f"{name} got no CONNACK from mosquitto in {timeout}s: {broker.log_text()[-1000:]}")
    return client


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started mosquitto with mutual TLS (``broker.pki``) and an ACL file from
    ``protocols.fleet.acl_lines`` with no devices and user ``operator`` allowed everything;
    ``broker.set_acl`` replaces it."""
    from protocols.fleet import acl_lines

    broker = Mosquitto(tmp_path / "mosquitto", pki=Pki(tmp_path / "pki"), acl=acl_lines({}, operator="operator"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started mosquitto in the clear, anonymous clients allowed, no ACL."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
