"""TLS certificates and SuperNode key pairs for one federation (needs only ``cryptography``).

    # the coordinating centre, once: a CA, the SuperLink's certificate, one key pair per site
    python docker/make_certs.py federation --out certs --server-name superlink \\
        --server-name fl.example.org --server-ip 10.0.0.5 --site hospital-a --site hospital-b

    # a hospital that keeps its private key at home: make the pair there, send only the .pub
    python docker/make_certs.py site-key --out my-keys --site hospital-d

    # a new server certificate from the existing CA (new host names, or before it expires)
    python docker/make_certs.py server-cert --out certs --server-name superlink --force

Layout under ``--out`` (private keys 0600, everything else 0644; each file written
atomically: a crash leaves the old file or the new one, never half of one)::

    ca/ca.crt, ca/ca.key            the federation's CA; keep ca.key offline
    superlink/ca.crt, server.crt, server.key   mount read-only into the server containers
    keys/<site>.pub                 public keys the SuperLink registers (only these may join)
    sites/<site>/ca.crt, auth.key, auth.pub    give to that hospital (auth.key never leaves it)

TLS authenticates the SuperLink to the sites (the sites check its certificate against
ca.crt). Sites authenticate with their EC P-384 key pair: the SuperLink only accepts a
SuperNode whose public key was registered (``docker/entrypoint.py register``). The site
keys are not signed by the CA, so a hospital can make its own pair (``site-key``).
The certificate of the SuperLink always also names ``localhost`` and ``127.0.0.1``:
the ServerApp process and the health check reach the SuperLink there inside its container.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# docker/deployment/ (the one site-name pattern) and common/ (atomic writes), also when loaded by path
for _folder in (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from deployment.settings import SITE_NAME  # noqa: E402

from common.atomic import atomic_write  # noqa: E402

CURVE = ec.SECP384R1  # Flower accepts NIST curves for SuperNode keys; P-384 as in its docs
ALWAYS_DNS = ("localhost",)
ALWAYS_IP = ("127.0.0.1",)


class CertError(ValueError):
    """A request the script refuses; the message names the file or option at fault."""


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` set before the file becomes visible."""
    atomic_write(path, lambda fh: fh.write(data), binary=True, mode=mode)


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertError(f"{', '.join(existing)} already exist(s); refusing to overwrite keys or certificates "
                        "(pass --force to replace them, or choose another --out)")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str],
                     ips: list[str], days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink with every given DNS name and IP as SAN."""
    dns = list(dict.fromkeys([*names, *ALWAYS_DNS]))
    try:
        addrs = [ipaddress.ip_address(ip) for ip in dict.fromkeys([*ips, *ALWAYS_IP])]
    except ValueError as exc:
        raise CertError(f"--server-ip: {exc}") from None
    key = ec.generate_private_key(CURVE())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([*(x509.DNSName(n) for n in dns),
                                                    *(x509.IPAddress(a) for a in addrs)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                     crl_sign=False, content_commitment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_site_key(site: str) -> tuple[bytes, bytes]:
    """A SuperNode's key pair in the OpenSSH formats ``flower-supernode`` and ``flwr`` read."""
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" {site}\n".encode()


def check_site(site: str) -> str:
    if not SITE_NAME.match(site):
        raise CertError(f"--site {site!r}: use 1-63 letters, digits, '.', '_' or '-' (it names files and the "
                        "SuperNode)")
    return site


def write_site_key(out: Path, site: str, force: bool, ca_cert: bytes | None = None) -> list[Path]:
    folder = out / "sites" / site if ca_cert is not None else out
    priv, pub = folder / "auth.key", folder / "auth.pub"
    targets = [priv, pub] + ([folder / "ca.crt"] if ca_cert is not None else [])
    _refuse_existing(targets, force)
    private, public = make_site_key(site)
    write_atomic(priv, private, 0o600)
    write_atomic(pub, public, 0o644)
    if ca_cert is not None:
        write_atomic(folder / "ca.crt", ca_cert, 0o644)
    return targets


def write_server(out: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, names: list[str],
                 ips: list[str], days: int, force: bool) -> list[Path]:
    folder = out / "superlink"
    targets = [folder / "server.key", folder / "server.crt", folder / "ca.crt"]
    _refuse_existing(targets, force)
    key, cert = make_server_cert(ca_key, ca_cert, names, ips, days)
    write_atomic(targets[0], _pem_key(key), 0o600)
    write_atomic(targets[1], _pem_cert(cert), 0o644)
    write_atomic(targets[2], _pem_cert(ca_cert), 0o644)
    return targets


def federation(out: Path, names: list[str], ips: list[str], sites: list[str], days: int, ca_days: int,
               force: bool) -> list[Path]:
    """CA, server certificate and one key pair per site; returns the files written."""
    sites = [check_site(s) for s in sites]
    if len(set(sites)) != len(sites):
        raise CertError(f"--site: a site is named twice in {sites}")
    ca_dir = out / "ca"
    planned = [ca_dir / "ca.key", ca_dir / "ca.crt", out / "superlink" / "server.key"]
    planned += [out / "keys" / f"{s}.pub" for s in sites] + [out / "sites" / s / "auth.key" for s in sites]
    _refuse_existing(planned, force)
    ca_key, ca_cert = make_ca(f"luna-fl federation CA ({names[0]})", ca_days)
    write_atomic(ca_dir / "ca.key", _pem_key(ca_key), 0o600)
    write_atomic(ca_dir / "ca.crt", _pem_cert(ca_cert), 0o644)
    written = [ca_dir / "ca.key", ca_dir / "ca.crt"]
    written += write_server(out, ca_key, ca_cert, names, ips, days, force=True)
    for site in sites:
        written += write_site_key(out, site, force=True, ca_cert=_pem_cert(ca_cert))
        pub = out / "keys" / f"{site}.pub"
        write_atomic(pub, (out / "sites" / site / "auth.pub").read_bytes(), 0o644)
        written.append(pub)
    return written


def load_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = out / "ca" / "ca.key", out / "ca" / "ca.crt"
    for p in (key_path, cert_path):
        if not p.is_file():
            raise CertError(f"{p}: no such file; make the CA first with `make_certs.py federation --out {out}`")
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{key_path}: not an EC private key")
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="docker/make_certs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def server_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--server-name", action="append", required=True,
                       help="DNS name the sites use to reach the SuperLink (repeat for several; the first is the CN)")
        q.add_argument("--server-ip", action="append", default=[], help="IP address the sites use (repeatable)")
        q.add_argument("--days", type=int, default=398, help="validity of the server certificate (default 398)")

    f = sub.add_parser("federation", help="CA + server certificate + one key pair per --site")
    f.add_argument("--out", type=Path, required=True, help="folder to write into")
    server_opts(f)
    f.add_argument("--site", action="append", default=[], help="a hospital's name (repeat per site)")
    f.add_argument("--ca-days", type=int, default=1825, help="validity of the CA (default 1825 = 5 years)")
    f.add_argument("--force", action="store_true", help="replace existing files (a new CA: every site needs it)")

    s = sub.add_parser("site-key", help="one SuperNode key pair (auth.key 0600, auth.pub)")
    s.add_argument("--out", type=Path, required=True, help="folder for auth.key and auth.pub")
    s.add_argument("--site", required=True, help="the hospital's name (written as the key's comment)")
    s.add_argument("--force", action="store_true", help="replace an existing key pair")

    c = sub.add_parser("server-cert", help="a new server certificate from the CA in --out/ca")
    c.add_argument("--out", type=Path, required=True, help="the folder made by `federation`")
    server_opts(c)
    c.add_argument("--force", action="store_true", help="replace the existing server certificate")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        for opt in ("days", "ca_days"):
            if getattr(args, opt, 1) < 1:
                raise CertError(f"--{opt.replace('_', '-')} must be at least 1, got {getattr(args, opt)}")
        if args.command == "federation":
            if not args.site:
                raise CertError("--site: name at least one hospital")
            written = federation(args.out, args.server_name, args.server_ip, args.site, args.days, args.ca_days,
                                 args.force)
        elif args.command == "site-key":
            written = write_site_key(args.out, check_site(args.site), args.force)
        else:
            ca_key, ca_cert = load_ca(args.out)
            written = write_server(args.out, ca_key, ca_cert, args.server_name, args.server_ip, args.days,
                                   args.force)
    except CertError as exc:
        print(f"make_certs.py: error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"{oct(path.stat().st_mode & 0o777)[2:]} {path}")
    if args.command == "federation":
        print(f"\nKeep {args.out / 'ca' / 'ca.key'} offline. Give each hospital its folder under "
              f"{args.out / 'sites'}; mount {args.out / 'superlink'} and {args.out / 'keys'} on the server.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
