"""A real gateway serving HTTPS for the integration tests: certificates, registered devices, keys.

``HttpsGateway.start()`` makes a throwaway database, migrates it, registers devices and
API keys with the ``vitalgate devices``/``keys`` commands (as an operator would), and runs
``vitalgate run`` with TLS, mutual TLS and MQTT off, waiting for "HTTPS listening.".
Server certificates come from ``trustme``; client certificates from a small CA made here
with ``cryptography`` (trustme cannot put a URI in a SAN).
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .gateway import GatewayProcess, vitalgate
from .services import PostgresCluster, free_port

__all__ = ["ClientCA", "HttpsGateway", "cli", "running_gateway", "UNLIMITED"]


class ClientCA:
    """A CA for device certificates; ``issue()`` writes ``<name>.pem`` (cert + key) under ``directory``."""

    def __init__(self, directory: Path, name: str = "Devices CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem_path = directory / "ca.pem"
        self.pem_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, cn: str | None = None, uri: str | None = None) -> Path:
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme Devices")]
        if cn is not None:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs)).issuer_name(self._cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if uri is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                                            critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        path = self.directory / f"{name}.pem"
        path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        )
        return path


def cli(dsn: str, *args: str, stdin: str | None = None) -> str:
    """Run ``vitalgate ARGS`` against ``dsn``; return stdout (a non-zero exit fails the test)."""
    return vitalgate(dsn, *args, stdin=stdin, timeout=120)


@dataclass
class HttpsGateway:
    """One gateway with HTTPS and mutual TLS on a database of its own."""

    workdir: Path
    dsn: str
    devices: list[str]  # registered with tokens (pulse_oximeter)
    settings: dict[str, str] = field(default_factory=dict)  # more VITALGATE_* settings
    cert_devices: dict[str, str] = field(default_factory=dict)  # device -> --cert-subject ("" = none)
    tokens: dict[str, str] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # name -> key
    port: int = 0
    workers: int = 1
    proc: GatewayProcess | None = None

    def start(self) -> None:
        certs = self.workdir / "certs"
        certs.mkdir(parents=True, exist_ok=True)
        self.server_ca = trustme.CA()
        server = self.server_ca.issue_cert("127.0.0.1", "localhost")
        server.private_key_and_cert_chain_pem.write_to_path(str(certs / "server.pem"))
        self.server_ca.cert_pem.write_to_path(str(certs / "server-ca.pem"))
        self.client_ca = ClientCA(certs / "devices")
        self.other_ca = ClientCA(certs / "other", "Someone else's CA")

        cli(self.dsn, "db", "migrate")
        csv = self.workdir / "devices.csv"
        csv.write_text("".join(f"{d},pulse_oximeter\n" for d in self.devices))
        out = self.workdir / "tokens.csv"
        cli(self.dsn, "devices", "import", str(csv), "--tokens-out", str(out))
        for line in out.read_text().splitlines()[1:]:
            dev, _, token = line.split(",")
            self.tokens[dev] = token
        for dev, subject in self.cert_devices.items():
            cli(self.dsn, "devices", "add", dev, "--profile", "pulse_oximeter",
                *(("--cert-subject", subject) if subject else ()))
        self.keys["read"] = cli(self.dsn, "keys", "add", "dashboard", "--scope", "telemetry:read").strip()
        self.keys["admin"] = cli(self.dsn, "keys", "add", "operator", "--scope", "admin").strip()

        self.port = free_port()
        self.proc = GatewayProcess(
            self.workdir / "gw" / "gateway.log", database_url=self.dsn,
            env={
                "VITALGATE_MQTT_ENABLED": "false",
                "VITALGATE_AUTH_REQUIRE_REGISTRATION": "true",
                "VITALGATE_HTTP_ENABLED": "true",
                "VITALGATE_HTTP_PORT": str(self.port),
                "VITALGATE_HTTP_TLS_CERT": str(certs / "server.pem"),
                "VITALGATE_HTTP_TLS_KEY": str(certs / "server.pem"),
                "VITALGATE_HTTP_TLS_CLIENT_CA": str(self.client_ca.pem_path),
                **self.settings,
            },
            args=["--workers", str(self.workers)] if self.workers > 1 else [],
            ready_line="HTTPS listening.",
            subscriptions=self.workers,  # one line per worker
        )
        self.proc.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def ssl_context(self, client_cert: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.workdir / "certs" / "server-ca.pem"))
        if client_cert is not None:
            ctx.load_cert_chain(str(client_cert))
        return ctx

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.alive():
            return self.proc.terminate(60)
        return None


# Test clients post far faster than a device may: lift the per-device rate limit.
UNLIMITED = {"VITALGATE_HTTP_RATE_LIMIT_PER_S": "10000", "VITALGATE_HTTP_RATE_LIMIT_BURST": "10000"}


@contextmanager
def running_gateway(cluster: PostgresCluster, name: str, devices: Sequence[str], *, workers: int = 1,
                    settings: Mapping[str, str] = UNLIMITED) -> Iterator[HttpsGateway]:
    """An HTTPS gateway on a new database of ``cluster`` with ``devices`` registered, for a
    test module; on exit it must stop with status 0 (its log tail otherwise), and the
    database is dropped."""
    db = f"{name}_{time.monotonic_ns() % 10**8}"
    dsn = cluster.create_database(db)
    g = HttpsGateway(Path(tempfile.mkdtemp(prefix=f"vitalgate-{name}-")), dsn, list(devices), workers=workers,
                     settings=dict(settings))
    try:
        g.start()
        yield g
        assert g.stop() == 0, g.proc.log_tail() if g.proc else ""
    finally:
        g.stop()
        cluster.drop_database(db)
