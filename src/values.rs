//! Values that travel from payloads, requests and the config into argv,
//! file names, URLs and refspecs: a version, an image digest, an image
//! name, a branch. Each is a type checked once, where it enters
//! ([`Version::parse`] and friends, or serde), so code that holds one
//! never checks it again and cannot be handed an unchecked string.
//!
//! The rules are strict alphabets on purpose: nothing here may ever split
//! into two arguments, climb out of a directory, or start an option.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a value was refused: what it was meant to be, the value (cut to a
/// readable length), and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {rule}")]
pub struct ValueError {
    pub what: &'static str,
    pub value: String,
    pub rule: &'static str,
}

impl ValueError {
    fn new(what: &'static str, value: &str, rule: &'static str) -> Self {
        let value = if value.chars().count() > 80 { format!("{}…", value.chars().take(80).collect::<String>()) } else { value.to_string() };
        ValueError { what, value, rule }
    }
}

macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        // Read-only: a checked value is used as the string it is.
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(s: String) -> Result<Self, ValueError> {
                $name::parse(&s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, ValueError> {
                $name::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

checked_string! {
    /// A version as deployed: an image tag, a release's version. Letters,
    /// digits, `.`, `_`, `-`, `+`, starting with a letter or digit, at most
    /// 128 characters.
    Version
}

checked_string! {
    /// A SHA-256 digest (of an image manifest, of a release tarball): 64
    /// lower-case hex digits, without the `sha256:` prefix.
    Digest
}

checked_string! {
    /// An image name without tag or digest: `[registry[:port]/]path`, the
    /// path's components lower-case letters, digits, `.`, `_`, `-`.
    Image
}

checked_string! {
    /// A git branch from the config or a payload: safe as one argument and
    /// in a refspec (no `..`, not starting with `-`, `/` or `.`).
    Branch
}

impl Version {
    pub fn parse(v: &str) -> Result<Version, ValueError> {
        let ok = !v.is_empty()
            && v.len() <= 128
            && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
            && v.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        if ok {
            Ok(Version(v.to_string()))
        } else {
            Err(ValueError::new("version", v, "letters, digits, '.', '_', '-', '+', starting with a letter or digit, at most 128 characters"))
        }
    }
}

impl Digest {
    /// 64 hex digits, optionally after `sha256:`, in either case (kept
    /// lower-case).
    pub fn parse(s: &str) -> Result<Digest, ValueError> {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            Ok(Digest(hex.to_ascii_lowercase()))
        } else {
            Err(ValueError::new("digest", s, "a SHA-256: 64 hex digits, optionally after \"sha256:\""))
        }
    }
}

impl Image {
    pub fn parse(s: &str) -> Result<Image, ValueError> {
        let bad = |rule| Err(ValueError::new("image", s, rule));
        if s.is_empty() || s.len() > 255 {
            return bad("between 1 and 255 characters");
        }
        if s.contains('@') {
            return bad("no digest: the digest is pinned by Slipway");
        }
        let mut parts: Vec<&str> = s.split('/').collect();
        // A first part with a '.' or ':' (or "localhost") names a registry.
        if parts.len() > 1 && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost") {
            let registry = parts.remove(0);
            if !registry.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':')) {
                return bad("the registry part is a host name with an optional :port");
            }
        }
        let path_ok = parts.iter().all(|p| {
            !p.is_empty()
                && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
                && p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        });
        if path_ok { Ok(Image(s.to_string())) } else { bad("registry/repository without a tag, in lower case (letters, digits, '.', '_', '-')") }
    }
}

impl Branch {
    /// The branch followed when the config names none.
    pub fn main() -> Branch {
        Branch("main".to_string())
    }

    pub fn parse(b: &str) -> Result<Branch, ValueError> {
        let ok = !b.is_empty()
            && b.len() <= 200
            && b.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
            && !b.starts_with(['-', '/', '.'])
            && !b.ends_with(['/', '.'])
            && !b.contains("..")
            && !b.contains("//")
            && !b.ends_with(".lock");
        if ok {
            Ok(Branch(b.to_string()))
        } else {
            Err(ValueError::new(
                "branch",
                b,
                "letters, digits, '.', '_', '-', '/'; not starting with '-', '/' or '.', no '..' or '//', not ending in '/', '.' or '.lock'",
            ))
        }
    }
}

/// A tag read as a semantic version (semver.org), with an optional
/// leading `v` (`v1.2.3`), as `tags = "semver"` means it; `None` if it is
/// not one. Compare with [`semver::Version::cmp_precedence`]: precedence
/// ignores build metadata, which `Ord` on `semver::Version` does not.
pub fn semver(tag: &str) -> Option<semver::Version> {
    semver::Version::parse(tag.strip_prefix('v').unwrap_or(tag)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue14_each_value_is_checked_once_and_says_why_not() {
        for ok in ["1.0", "v2.3.4-rc.1+build.5", "2024_01_01"] {
            assert_eq!(Version::parse(ok).map(|v| v.to_string()), Ok(ok.to_string()));
        }
        for bad in ["", "-rm", "1.0 2", "$(touch x)", "../../etc", ".1", &"9".repeat(129)] {
            let e = Version::parse(bad).expect_err(bad);
            assert_eq!(e.what, "version");
            assert!(e.to_string().starts_with("invalid version "), "{e}");
        }
        let hex = "ab".repeat(32);
        assert_eq!(Digest::parse(&format!("sha256:{}", hex.to_uppercase())).map(String::from), Ok(hex.clone()));
        assert!(Digest::parse("sha256:abc").is_err() && Digest::parse(&"g".repeat(64)).is_err());
        for ok in ["web", "registry.example.org:5000/team/web", "localhost/x", "ghcr.io/a/b-c_d.e"] {
            assert!(Image::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["Web", "reg/web:1.0", "web@sha256:00", "-web", "", "a//b", "bad host!/x"] {
            assert!(Image::parse(bad).is_err(), "{bad}");
        }
        for ok in ["main", "release/1.x", "feature_a-b"] {
            assert!(Branch::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["-x", "/x", "a..b", "a//b", "x.lock", "x/", "a b", ".hidden"] {
            assert!(Branch::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    // serde checks too: a stored or received value cannot skip the rule.
    fn issue14_deserializing_checks_the_rule() {
        assert_eq!(serde_json::from_str::<Version>("\"1.2\"").map(|v| v.to_string()).ok(), Some("1.2".into()));
        let e = serde_json::from_str::<Version>("\"$(x)\"").expect_err("refused");
        assert!(e.to_string().contains("invalid version \"$(x)\""), "{e}");
        assert_eq!(serde_json::to_string(&Digest::parse(&"0".repeat(64)).expect("digest")).expect("json"), format!("\"{}\"", "0".repeat(64)));
    }
}
