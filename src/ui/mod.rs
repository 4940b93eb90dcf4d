//! The dashboard: a page, a stylesheet and a script, embedded in the
//! binary and served at `/` (and `/ui/…`). Everything the page shows or
//! does goes through the public API under `/api/v1` with the token the
//! user pasted, so it can never do what that token could not.
//!
//! Sign-in is cookie-free: the token lives in the tab's `sessionStorage`
//! and travels only in an `Authorization` header that the script sets, so
//! a page on another site cannot make the browser send it (no CSRF), and
//! it never appears in a URL. The strict Content-Security-Policy below
//! (scripts only from this origin, nothing inline) is what keeps a stored
//! string from ever running as script; the script itself inserts API data
//! as text only. Design notes: `docs/design/dashboard.md`.
//!
//! **Architecture Invariant:** the dashboard's handlers serve fixed bytes
//! and read no state; there is no endpoint for the page alone.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");
const ICON: &str = include_str!("icon.svg");

/// What a page of this origin may load and do: its own files and API,
/// nothing inline, no frames (no clickjacking of the approve button).
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                      form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The paths this module answers, none of which needs a token (the page
/// holds no data; the API it calls checks the token on every request).
pub fn is_public(path: &str) -> bool {
    path == "/" || path == "/ui" || path.starts_with("/ui/")
}

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { file(INDEX, "text/html; charset=utf-8") }))
        .route("/ui", get(|| async { file(INDEX, "text/html; charset=utf-8") }))
        .route("/ui/", get(|| async { file(INDEX, "text/html; charset=utf-8") }))
        .route("/ui/app.js", get(|| async { file(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/ui/style.css", get(|| async { file(STYLE, "text/css; charset=utf-8") }))
        .route("/ui/icon.svg", get(|| async { file(ICON, "image/svg+xml") }))
}

fn file(body: &'static str, content_type: &'static str) -> Response {
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // A new binary serves new files at the same paths: revalidate.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_files() {
        for line in INDEX.lines().filter(|l| l.contains("src=") || l.contains("href=")) {
            for attr in ["src=\"", "href=\""] {
                if let Some(rest) = line.split(attr).nth(1) {
                    let url = rest.split('"').next().unwrap_or_default();
                    assert!(url.starts_with("/ui/") || url.starts_with('#'), "{url} in index.html: the policy allows only this origin's /ui files");
                }
            }
        }
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="), "inline script or style would be refused by the policy");
    }

    #[test]
    fn the_script_never_writes_html_from_strings() {
        // API data (job names, log lines, reasons) goes in as text only.
        for bad in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"] {
            assert!(!SCRIPT.contains(bad), "app.js uses {bad}");
        }
        assert!(!SCRIPT.contains("localStorage"), "the token is kept for the browser session only (sessionStorage)");
    }

    #[test]
    fn public_paths_are_the_dashboards_own() {
        assert!(is_public("/") && is_public("/ui/app.js") && is_public("/ui"));
        assert!(!is_public("/api/v1/deployments") && !is_public("/uix"));
    }
}
