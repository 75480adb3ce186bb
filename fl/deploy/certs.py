"""TLS certificates and SuperNode keys for a Flower deployment, made with `cryptography`.

Three kinds of files, each usable on its own on real machines (see docs/deploy.md):

- a certificate authority (`ca.crt`, `ca.key`): SuperNodes and the `flwr` CLI trust it
  (`--root-certificates`, `root-certificates` in `$FLWR_HOME/config.toml`);
- the SuperLink's server certificate (`server.pem`, `server.key`), signed by the CA, valid for the
  subject alternative names the SuperNodes dial (default `localhost` and `127.0.0.1`);
- one ECDSA P-384 key pair per SuperNode in OpenSSH format (`<name>`, `<name>.pub`): the SuperLink
  owner registers the public key (`flwr supernode register <name>.pub`), the node keeps the private
  key (`flower-supernode --auth-supernode-private-key <name>`).

Private keys are written with mode 0600. Nothing here talks to the network.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


@dataclass(frozen=True)
class ServerCerts:
    """The files a TLS SuperLink needs (`--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`)."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKeys:
    """A SuperNode's key pair: `private` for the node, `public` for `flwr supernode register`."""

    private: Path
    public: Path


def _write(path: Path, data: bytes, *, secret: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if secret:
        os.chmod(path, 0o600)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))


def create_ca(out_dir: str | Path, *, common_name: str = "fedlora CA", days: int = 365) -> tuple[Path, Path]:
    """Write a self-signed CA (`ca.crt`, `ca.key`) into `out_dir`. Returns (cert, key) paths."""
    if days < 1:
        raise ValueError(f"`days` must be positive, got {days}.")
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = _validity(builder, days).sign(key, hashes.SHA384())
    return (
        _write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM)),
        _write(out / CA_KEY, _key_pem(key), secret=True),
    )


def _san_entries(sans: Sequence[str]) -> list[x509.GeneralName]:
    if not sans:
        raise ValueError("A server certificate needs at least one subject alternative name (host name or IP).")
    entries: list[x509.GeneralName] = []
    for san in sans:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            entries.append(x509.DNSName(san))
    return entries


def create_server_cert(
    out_dir: str | Path,
    *,
    ca_cert: str | Path,
    ca_key: str | Path,
    sans: Sequence[str] = DEFAULT_SANS,
    days: int = 365,
) -> ServerCerts:
    """Write the SuperLink's certificate and key (`server.pem`, `server.key`), signed by the CA.

    `sans` are the names and IP addresses SuperNodes and the `flwr` CLI use to reach the SuperLink
    (each is an IP SAN when it parses as an IP address, else a DNS SAN). A SuperLink on `0.0.0.0`
    also talks to its own ServerApp process over `127.0.0.1`, so keep `127.0.0.1` in the list.
    """
    if days < 1:
        raise ValueError(f"`days` must be positive, got {days}.")
    out = Path(out_dir)
    entries = _san_entries(sans)
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key} is not an ECDSA private key (made by create_ca).")
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(str(sans[0])))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(entries), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    cert = _validity(builder, days).sign(signer, hashes.SHA384())
    return ServerCerts(
        ca_cert=Path(ca_cert),
        cert=_write(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM)),
        key=_write(out / SERVER_KEY, _key_pem(key), secret=True),
    )


def create_node_keys(out_dir: str | Path, name: str) -> NodeKeys:
    """Write a SuperNode's ECDSA P-384 key pair in OpenSSH format: `<name>` (private) and `<name>.pub`."""
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return NodeKeys(
        private=_write(out / name, private, secret=True),
        public=_write(out / f"{name}.pub", public + f" {name}\n".encode()),
    )


def create_federation_credentials(
    out_dir: str | Path,
    *,
    num_nodes: int,
    sans: Sequence[str] = DEFAULT_SANS,
    days: int = 365,
) -> tuple[ServerCerts, list[NodeKeys]]:
    """CA + server certificate in `out_dir`, and keys `node-0 … node-{n-1}` in `out_dir/nodes`."""
    if num_nodes < 0:
        raise ValueError(f"`num_nodes` must be >= 0, got {num_nodes}.")
    ca_cert, ca_key = create_ca(out_dir, days=days)
    server = create_server_cert(out_dir, ca_cert=ca_cert, ca_key=ca_key, sans=sans, days=days)
    nodes = [create_node_keys(Path(out_dir) / "nodes", f"node-{i}") for i in range(num_nodes)]
    return server, nodes


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m fl.deploy.certs --out DIR --nodes N [--san NAME ...]`: credentials for a real deployment."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fl.deploy.certs", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for ca.*, server.* and nodes/")
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make (node-0, node-1, ...)")
    parser.add_argument(
        "--san", action="append", help=f"host name or IP of the SuperLink (repeat; default: {' '.join(DEFAULT_SANS)})"
    )
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates")
    args = parser.parse_args(argv)
    server, nodes = create_federation_credentials(
        args.out, num_nodes=args.nodes, sans=args.san or DEFAULT_SANS, days=args.days
    )
    print(f"SuperLink: --ssl-ca-certfile {server.ca_cert} --ssl-certfile {server.cert} --ssl-keyfile {server.key}")
    for keys in nodes:
        print(f"{keys.private.name}: register {keys.public}; the node uses --auth-supernode-private-key {keys.private}")
    print(f"Give SuperNodes and the flwr CLI {server.ca_cert} (never {Path(args.out) / CA_KEY}).")


if __name__ == "__main__":
    main()
