//! Every outgoing HTTP client is built here: reqwest with TLS from rustls
//! on the `ring` crypto provider (not aws-lc, whose C build is heavy), and
//! server certificates checked by rustls-platform-verifier against the
//! system's roots (on Linux the CA bundle of `ca-certificates`, or the PEM
//! file named by `SSL_CERT_FILE` / directories in `SSL_CERT_DIR`).
//!
//! reqwest is built with `rustls-no-provider`, so it panics when a client
//! is built before a provider is installed: [`init`] installs ring, and
//! [`builder`] and [`client`] call it first.

use std::sync::Once;

use reqwest::{Client, ClientBuilder};

/// Install ring as rustls' process-wide crypto provider, once. A provider
/// installed before (by an embedding program) is kept: no panic.
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// `reqwest::Client::builder()`, with the crypto provider installed.
pub fn builder() -> ClientBuilder {
    init();
    Client::builder()
}

/// Build a client: `configure` sets timeouts, headers… on a fresh builder.
///
/// A host without any CA certificate (no `ca-certificates`, no
/// `SSL_CERT_FILE`) cannot build the platform verifier; rather than fail
/// plain-HTTP uses too (local health checks, loopback registries), the
/// client then trusts no certificate at all — every https URL fails as an
/// unknown issuer — and a warning says why, once. Nothing here ever skips
/// verification.
pub fn client(configure: impl Fn(ClientBuilder) -> ClientBuilder) -> Result<Client, reqwest::Error> {
    match configure(builder()).build() {
        Ok(c) => Ok(c),
        Err(e) => {
            let without_roots = configure(builder()).tls_certs_only([]).build().map_err(|_| e)?;
            static WARNED: Once = Once::new();
            WARNED.call_once(|| {
                tracing::warn!("no CA certificates found on this system (install ca-certificates, or set SSL_CERT_FILE): every https URL will fail certificate verification");
            });
            Ok(without_roots)
        }
    }
}

/// An error with its causes: reqwest's top line ("error sending
/// request") says little; the cause ("connection refused") is below.
/// A URL as a log line or an error shows it: no user or password, no
/// query (either may carry a token), and with `path` false no path either
/// (a chat service's hook carries its token there). One that does not
/// parse is not shown at all.
pub fn shown_url(url: &str, path: bool) -> String {
    let Ok(mut u) = reqwest::Url::parse(url) else { return "[a URL that is not one]".into() };
    let more = u.query().is_some() || (!path && u.path().len() > 1);
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if !path {
        let _ = u.set_username("");
        let _ = u.set_password(None);
        u.set_path("");
    }
    u.set_query(None);
    let shown = u.to_string();
    let shown = shown.strip_suffix('/').unwrap_or(&shown);
    match (more, path) {
        (false, _) => shown.to_string(),
        (true, true) => format!("{shown}?…"),
        (true, false) => format!("{shown}/…"),
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn init_twice_or_after_another_provider_does_not_panic() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        super::init();
        super::init();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    /// Each place that makes a client, with its own settings, gets one.
    #[test]
    fn a_client_builds_in_every_place_that_makes_one() {
        super::client(|b| b.timeout(Duration::from_secs(1))).expect("plain client");
        crate::notify::http_client().expect("notify client");
        // an https registry
        crate::retention::registry::RegistryClient::for_image("registry.example.org/team/web", &[]).expect("registry client");
        // cli (builds its two clients)
        let c = crate::cli::client::Client::new("https://slipway.example.org", Some("token"));
        assert_eq!(c.base(), "https://slipway.example.org");
        // service manager and artifact downloads
        crate::service::manager::http_client().expect("service manager client");
        crate::service::artifact::http_client().expect("artifact client");
    }
}
