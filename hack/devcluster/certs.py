"""The local cluster's PKI: one CA, serving and client certificates, the service-account key.

Keys are ECDSA P-256 (fast to generate, accepted by every component). Files are created once
and reused, so kubeconfigs and service-account tokens stay valid across restarts.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=3650)
CA_NAME = "vllm-operator-local-ca"


@dataclass(frozen=True)
class Identity:
    """A client certificate's subject: the user name and its groups."""

    user: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path

    def exists(self) -> bool:
        return self.cert.is_file() and self.key.is_file()


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an ECDSA key; remove the certs folder to regenerate it")
    return key


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Authority:
    """A CA kept as ``ca.crt``/``ca.key`` in a folder; it signs everything else in that folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pair = KeyPair(folder / "ca.crt", folder / "ca.key")
        if not self.pair.exists():
            self._create()
        self._key = _load_key(self.pair.key)
        self._cert = x509.load_pem_x509_certificate(self.pair.cert.read_bytes())

    def _create(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = _new_key()
        name = _name(CA_NAME)
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_key(key, self.pair.key)
        self.pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, subject: x509.Name, *, server_names: tuple[str, ...] = (),
              client: bool = False) -> KeyPair:
        """``<stem>.crt``/``<stem>.key`` signed by this CA, created unless present."""
        pair = KeyPair(self.folder / f"{stem}.crt", self.folder / f"{stem}.key")
        if pair.exists():
            return pair
        key = _new_key()
        now = datetime.datetime.now(datetime.UTC)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
        )
        if server_names:
            alternatives: list[x509.GeneralName] = []
            for entry in server_names:
                try:
                    alternatives.append(x509.IPAddress(ipaddress.ip_address(entry)))
                except ValueError:
                    alternatives.append(x509.DNSName(entry))
            builder = builder.add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        _write_key(key, pair.key)
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pair

    def server(self, stem: str, common_name: str, names: tuple[str, ...], *, client: bool = False) -> KeyPair:
        return self.issue(stem, _name(common_name), server_names=names, client=client)

    def client(self, stem: str, identity: Identity) -> KeyPair:
        return self.issue(stem, _name(identity.user, identity.groups), client=True)


def service_account_key(folder: Path) -> KeyPair:
    """The key the API server signs service-account tokens with (``sa.key``) and its public half."""
    pair = KeyPair(folder / "sa.pub", folder / "sa.key")
    if not pair.exists():
        folder.mkdir(parents=True, exist_ok=True)
        key = _new_key()
        _write_key(key, pair.key)
        pair.cert.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    return pair
