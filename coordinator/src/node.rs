//! Which node this coordinator is: the one place the node id comes from (the node registry,
//! `cluster.rs`, and its traces' resource and spans carry it).

use std::sync::OnceLock;

static ID: OnceLock<String> = OnceLock::new();

/// Sets this node's id from the configuration (`cluster.node_id`; `None`: the host name).
/// Called once by `serve`, before anything reads [`node_id`]; a later call changes nothing.
pub fn init(configured: Option<&str>) -> &'static str {
    ID.get_or_init(|| match configured {
        Some(id) => id.to_string(),
        None => default_id(),
    })
}

/// This node's id: `cluster.node_id` (`--node-id`), else the host name, or `"unknown"` when
/// the system will not say. Read once.
pub fn node_id() -> &'static str {
    ID.get_or_init(default_id)
}

fn default_id() -> String {
    hostname().unwrap_or_else(|| "unknown".to_string())
}

/// The host name, if the system says.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    // POSIX leaves the name unterminated when it was cut; then the whole buffer is the name.
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_node_id_is_the_host_name() {
        let id = super::node_id();
        assert!(!id.is_empty());
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        if !hostname.is_empty() {
            assert_eq!(id, hostname);
        }
    }
}
