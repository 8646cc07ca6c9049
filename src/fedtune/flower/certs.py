"""Certificates and keys for a test deployment: a CA, the SuperLink's TLS certificate, and one
authentication key pair per SuperNode.

Flower needs TLS material but ships no tool to make it (its examples call ``openssl`` from a shell
script); this module does the same with the ``cryptography`` library that Flower itself depends on,
so ``fedtune deploy certs`` works wherever fedtune is installed. For production, use certificates
from your organisation's CA; the files have the same roles:

* ``ca.crt``: the CA certificate every SuperNode (``--root-certificates``) and the submitting
  user (``root-certificates`` in the Flower connection) use to verify the SuperLink;
* ``server.pem`` / ``server.key``: the SuperLink's certificate (its subject alternative names
  list every address SuperNodes dial, plus loopback for the SuperLink's own SuperExec) and key;
* ``<name>`` / ``<name>.pub``: a SuperNode's authentication key pair (ECDSA P-384, OpenSSH
  format, as ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  read them). The private key stays on the organisation's machine; the public key is registered
  with the SuperLink.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from fedtune.errors import FedtuneError
from fedtune.utils import atomic_write_bytes

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def _san(hosts: list[str]):
    from cryptography import x509

    names = []
    for h in dict.fromkeys([*hosts, *LOOPBACK]):  # ordered, no duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_certificates(out: Path, hosts: list[str], *, days: int = 365, overwrite: bool = False) -> dict[str, Path]:
    """Create ``ca.crt``/``ca.key`` and a SuperLink certificate ``server.pem``/``server.key``
    valid for ``hosts`` (IP addresses or DNS names) and loopback. Returns the paths by role."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    paths = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key",
             "server_cert": out / "server.pem", "server_key": out / "server.key"}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FedtuneError(f"{existing[0]} already exists; use --overwrite to replace the certificates in {out}")
    now = dt.datetime.now(dt.timezone.utc)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    nopass = serialization.NoEncryption()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(paths["ca_cert"], ca_cert.public_bytes(pem))
    _write_private(paths["ca_key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass))
    atomic_write_bytes(paths["server_cert"], cert.public_bytes(pem))
    _write_private(paths["server_key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopass))
    return paths


def make_node_keys(out: Path, names: list[str], *, overwrite: bool = False) -> dict[str, tuple[Path, Path]]:
    """One ECDSA P-384 key pair per SuperNode, in OpenSSH format: ``<name>`` and ``<name>.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    result = {}
    for name in names:
        priv, pub = out / name, out / f"{name}.pub"
        if (priv.exists() or pub.exists()) and not overwrite:
            raise FedtuneError(f"{priv} already exists; use --overwrite to replace it")
        key = ec.generate_private_key(ec.SECP384R1())
        out.mkdir(parents=True, exist_ok=True)
        _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
        atomic_write_bytes(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                              serialization.PublicFormat.OpenSSH) + b"\n")
        result[name] = (priv, pub)
    return result
