"""Key material for a deployment: a CA, TLS server certificates, SuperNode and identity keys.

Everything is made with ``cryptography`` and written in the formats the consumers read:

- **TLS** (every SuperLink: the cloud and each edge): a private CA (EC P-384 key, self-signed
  certificate, ``CA:TRUE``) signs one server certificate per SuperLink whose subject
  alternative names are the host names / IP addresses the SuperLink is reached at. Flower's
  ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile`` take PEM files; a
  SuperNode verifies the server with ``--root-certificates ca.pem``.
- **SuperNode authentication** (flwr 1.41): an EC key on a NIST curve (P-384 here, as
  Flower's docs use), the private key in OpenSSH format (``flower-supernode
  --auth-supernode-private-key`` reads it with ``load_ssh_private_key``), the public key as
  an OpenSSH line (``flwr supernode register <pub>`` reads it with ``load_ssh_public_key``).
- **Secure-aggregation identity**: an Ed25519 key (:class:`fedlora.secure.keys.IdentityKey`)
  as PKCS#8 PEM; its raw 32-byte public key goes into the cloud's registry.

Private keys are written with mode 0600 (created with that mode, never widened).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


@dataclass(frozen=True)
class CertifiedKey:
    """A private key and the certificate for it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedlora deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def make_ca(common_name: str = "fedlora deployment CA", days: int = 3650) -> CertifiedKey:
    """A new CA: EC P-384 key and a self-signed certificate that may sign server certificates."""
    key = ec.generate_private_key(CURVE)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return CertifiedKey(key, cert)


def san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    """Subject alternative names for host names and IP addresses (IPs as IPAddress entries)."""
    out: list[x509.GeneralName] = []
    for host in hosts:
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise ValueError(f"{host!r} is not a host name or IP address")
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def issue_server_cert(ca: CertifiedKey, common_name: str, hosts: list[str], days: int = 825) -> CertifiedKey:
    """A TLS server certificate signed by ``ca`` for ``hosts`` (the SANs clients check)."""
    if not hosts:
        raise ValueError(f"server certificate for {common_name!r} needs at least one host name or IP address")
    key = ec.generate_private_key(CURVE)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, data_encipherment=False, key_agreement=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san_entries(hosts)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA384())
    )
    return CertifiedKey(key, cert)


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Raise unless ``cert`` is signed by ``ca_cert`` and currently valid (a one-level chain)."""
    cert.verify_directly_issued_by(ca_cert)
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(f"certificate {cert.subject.rfc4514_string()} is not valid now")


def cert_hosts(cert: x509.Certificate) -> list[str]:
    """The SANs of ``cert`` as strings (IPs and DNS names)."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName)


def make_supernode_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode authentication key (EC P-384) as flwr 1.41 expects."""
    return ec.generate_private_key(CURVE)


def make_identity_key() -> ed25519.Ed25519PrivateKey:
    """A secure-aggregation identity (Ed25519); wrap with ``fedlora.secure.keys.IdentityKey``."""
    return ed25519.Ed25519PrivateKey.generate()


# -- file formats ------------------------------------------------------------------------

def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted (TLS server keys, identity keys)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    """OpenSSH private key format (``flower-supernode --auth-supernode-private-key``)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def ssh_public(key: ec.EllipticCurvePrivateKey, comment: str = "") -> bytes:
    """One OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA... comment``)."""
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode() if comment else b"") + b"\n"


def write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start (no window where it is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, PRIVATE_MODE)  # umask cannot have widened it, but be explicit


def write_public(path: Path, data: bytes, mode: int = PUBLIC_MODE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_pem_key(path: Path):
    return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)


def load_ssh_key(path: Path):
    return serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)


def load_ssh_public(path: Path):
    return serialization.load_ssh_public_key(Path(path).read_bytes())
