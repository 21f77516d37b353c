//! What the transport knows about the caller, handed to the layers above it as request
//! extensions: the names in a verified client certificate (mutual TLS). The TLS acceptor
//! (`tls.rs`) inserts [`PeerCertNames`]; authentication (`auth`) reads it to find a principal by
//! `client_cert_cn`. Absent on plaintext connections and on TLS without a client certificate.

/// The common name and DNS subject-alternative names of the caller's verified client
/// certificate, common name first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerCertNames(pub Vec<String>);
