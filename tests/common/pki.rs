//! Certificates for TLS tests, made by the `openssl` command (installed by
//! scripts/test.sh): a CA of the test's own and server certificates for
//! 127.0.0.1 and localhost that it signs. EC P-256 keys, two days valid.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).stdin(Stdio::null()).output().expect("run openssl (scripts/test.sh installs it)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

const EC: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

/// A certificate authority in `dir`: `<name>.pem` (returned) and `<name>.key`.
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (key, pem, subj) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN=Slipway test CA {name}"));
    let rest = [
        "-keyout",
        &key,
        "-out",
        &pem,
        "-days",
        "2",
        "-subj",
        &subj,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ];
    openssl(dir, &[&["req", "-x509"], &EC[..], &rest[..]].concat());
    dir.join(pem)
}

/// A server certificate for 127.0.0.1 and localhost in `dir`, signed by
/// the CA `ca` (made by [`make_ca`]): (`<name>.pem`, `<name>.key`).
pub fn make_server(dir: &Path, ca: &str, name: &str) -> (PathBuf, PathBuf) {
    let (key, csr, pem, ext) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
    std::fs::write(
        dir.join(&ext),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write the extensions");
    openssl(dir, &[&["req"], &EC[..], &["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]].concat());
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    let serial = format!("{}", rand::random::<u32>() | 1);
    openssl(dir, &["x509", "-req", "-in", &csr, "-CA", &ca_pem, "-CAkey", &ca_key, "-set_serial", &serial, "-days", "2", "-extfile", &ext, "-out", &pem]);
    (dir.join(pem), dir.join(key))
}

/// A self-signed certificate for 127.0.0.1 that no CA vouches for:
/// (`<name>.pem`, `<name>.key`).
pub fn make_stranger(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    let leaf =
        ["-addext", "basicConstraints=critical,CA:FALSE", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-addext", "extendedKeyUsage=serverAuth"];
    openssl(dir, &[&["req", "-x509"], &EC[..], &["-keyout", &key, "-out", &pem, "-days", "2", "-subj", "/CN=127.0.0.1"], &leaf[..]].concat());
    (dir.join(pem), dir.join(key))
}
