//! AWS, wherever Slipway calls it (the ECS target, the SQS trigger): the
//! `[aws]` table, and with the `aws` feature the SDK's configuration every
//! client is built from (the standard credential chain, ring as the only
//! TLS crypto, a timeout on every call) and errors in a person's words.

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::config::{Problem, ProblemKind};

/// `[aws]` as written: where Slipway reaches AWS. Credentials come from
/// the standard chain (environment, profile, web identity, a container or
/// instance role), never from the config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Aws {
    pub region: Option<String>,
    /// One URL for every AWS API (tests, compatible services).
    pub endpoint: Option<String>,
}

/// The keys of `[aws]`, for the unknown-key check and the docs.
pub const KEYS: &[&str] = &["region", "endpoint"];

#[derive(Deserialize)]
pub(crate) struct RawAws {
    region: Option<Spanned<String>>,
    endpoint: Option<Spanned<String>>,
}

/// `[aws]`; problems each at its place.
pub(crate) fn read(raw: RawAws, problems: &mut Vec<Problem>) -> Aws {
    let mut aws = Aws::default();
    if let Some(r) = raw.region {
        let ok = !r.get_ref().is_empty() && r.get_ref().chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            aws.region = Some(r.get_ref().clone());
        } else {
            problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(r.span()), format!("{:?} is not an AWS region", r.get_ref()))
                    .label("not a region")
                    .hint("e.g. region = \"eu-west-1\""),
            );
        }
    }
    if let Some(e) = raw.endpoint {
        match reqwest::Url::parse(e.get_ref()) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => aws.endpoint = Some(e.get_ref().trim_end_matches('/').to_string()),
            _ => problems.push(
                Problem::new(ProblemKind::InvalidValue, Some(e.span()), format!("`endpoint` {:?} is not an http(s) URL", e.get_ref()))
                    .label("not a URL")
                    .hint("e.g. endpoint = \"http://127.0.0.1:5000\""),
            ),
        }
    }
    aws
}

#[cfg(feature = "aws")]
pub use sdk::*;

#[cfg(feature = "aws")]
mod sdk {
    use std::time::Duration;

    // The SDK's shared types (credentials, errors, responses) are the same
    // in every service crate; these are named through the SQS one.
    use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

    use super::Aws;

    /// Bounds on one call: connecting, one attempt, the whole call with
    /// its retries.
    #[derive(Debug, Clone, Copy)]
    pub struct Timeouts {
        pub connect: Duration,
        pub attempt: Duration,
        pub operation: Duration,
    }

    /// The SDK's configuration for `aws`: its region (else `fallback`, else
    /// the chain's), its endpoint, the HTTPS client on ring, the standard
    /// credential chain, and these timeouts.
    pub async fn sdk_config(aws: &Aws, fallback: Option<&str>, t: Timeouts) -> aws_config::SdkConfig {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(t.connect)
            .operation_attempt_timeout(t.attempt)
            .operation_timeout(t.operation)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http).timeout_config(timeouts);
        if let Some(r) = aws.region.as_deref().or(fallback) {
            loader = loader.region(aws_config::Region::new(r.to_string()));
        }
        if let Some(e) = &aws.endpoint {
            loader = loader.endpoint_url(e.clone());
        }
        loader.load().await
    }

    /// An AWS call's failure, for code and people.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct CallError {
        /// AWS's error code, when AWS answered with one.
        pub code: Option<String>,
        /// The call never got an answer (network, timeout, an unreadable one).
        pub unanswered: bool,
        /// No credentials were found in the chain.
        pub no_credentials: bool,
        /// "`what`: …", without the SDK's debug dump.
        pub message: String,
    }

    /// `e`, from the call `what` ("describing task definition …").
    pub fn call_error<E>(what: &str, e: SdkError<E, aws_sdk_sqs::config::http::HttpResponse>) -> CallError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match &e {
            SdkError::ServiceError(s) => {
                let err = s.err();
                let code = err.code().unwrap_or("error").to_string();
                let message = format!("{what}: {code}: {}", err.message().unwrap_or(""));
                CallError { code: Some(code), unanswered: false, no_credentials: false, message }
            }
            // An answer that is not AWS's JSON (a proxy's or a server's error
            // page): its status, not its body.
            SdkError::ResponseError(r) => CallError {
                code: None,
                unanswered: true,
                no_credentials: false,
                message: format!("{what}: an unreadable answer, HTTP {}", r.raw().status().as_u16()),
            },
            _ => {
                // The chain's own words.
                let mut chain: Vec<String> = Vec::new();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    let text = s.to_string();
                    if !text.is_empty() && text != "other" && !chain.iter().any(|c| c.contains(&text)) {
                        chain.push(text);
                    }
                    source = s.source();
                }
                if chain.iter().any(|c| c.contains("loading credentials") || c.contains("no providers in chain provided credentials")) {
                    let last = chain.last().cloned().unwrap_or_default();
                    return CallError {
                        code: None,
                        unanswered: false,
                        no_credentials: true,
                        message: format!(
                            "{what}: no AWS credentials (the standard chain: AWS_ACCESS_KEY_ID, a profile, web identity, a container or instance role): {last}"
                        ),
                    };
                }
                let why = if chain.is_empty() { e.to_string() } else { chain.join(": ") };
                CallError { code: None, unanswered: true, no_credentials: false, message: format!("{what}: AWS did not answer: {why}") }
            }
        }
    }
}
