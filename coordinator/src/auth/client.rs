//! The client side: the bearer token the CLI sends (`--token`, `VERALTHEIM_TOKEN`) and
//! `veraltheim auth hash-token`.

use std::io::Read;

use anyhow::{Context as _, bail};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A connection to the coordinator that sends the caller's token.
pub type Connection = InterceptedService<Channel, Bearer>;

/// `channel` sending `token` (if any) on every call. A token that cannot be sent as metadata
/// (not visible ASCII) is refused here, naming the problem rather than printing the token.
pub fn with_token(channel: Channel, token: Option<&str>) -> anyhow::Result<Connection> {
    let value = match token.map(str::trim).filter(|t| !t.is_empty()) {
        Some(t) => {
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                bail!(
                    "the token (--token or VERALTHEIM_TOKEN) must be visible ASCII without spaces"
                );
            }
            Some(
                format!("Bearer {t}")
                    .parse()
                    .context("the token cannot be sent as gRPC metadata")?,
            )
        }
        None => None,
    };
    Ok(InterceptedService::new(channel, Bearer(value)))
}

/// `veraltheim auth hash-token`: reads a token on stdin (one line; surrounding whitespace is
/// not part of it) and returns the line to paste into a `[[principal]]` of the auth file.
pub fn hash_token_line(input: impl Read) -> anyhow::Result<String> {
    let mut text = String::new();
    input
        .take(64 * 1024)
        .read_to_string(&mut text)
        .context("cannot read the token from stdin")?;
    let token = text.trim();
    if token.is_empty() {
        bail!(
            "no token on stdin: pipe one in, e.g. `openssl rand -hex 32 | tee token | veraltheim auth hash-token`"
        );
    }
    if token.contains(['\n', '\r']) {
        bail!("the token on stdin has several lines; give one token");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("the token must be visible ASCII without spaces (clients send it as metadata)");
    }
    let hash: String = super::sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("token_sha256 = \"{hash}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_token_prints_the_line_to_paste() {
        // SHA-256("test"), a published test vector.
        assert_eq!(
            hash_token_line(&b"test\n"[..]).unwrap(),
            "token_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\""
        );
        assert!(
            hash_token_line(&b"  \n"[..])
                .unwrap_err()
                .to_string()
                .contains("no token")
        );
        assert!(
            hash_token_line(&b"a\nb\n"[..])
                .unwrap_err()
                .to_string()
                .contains("several lines")
        );
        assert!(
            hash_token_line(&b"a b"[..])
                .unwrap_err()
                .to_string()
                .contains("visible ASCII")
        );
    }
}
