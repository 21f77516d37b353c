//! The auth file (`server.auth_file`): principals and roles, read into a [`Table`]. Anything the
//! file does not say right — an unknown key or verb, a role no principal can find, a token hash
//! that is not 64 hex digits, two principals with one token — is refused with a message that
//! names it, at start and on every reload (a reload that fails keeps the table in force).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;

use super::rules::{Allow, Pattern, verbs_of};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    principal: Vec<PrincipalDoc>,
    #[serde(default)]
    role: Vec<RoleDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalDoc {
    name: String,
    tenant: String,
    #[serde(default)]
    roles: Vec<String>,
    token_sha256: Option<String>,
    client_cert_cn: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleDoc {
    name: String,
    #[serde(default)]
    allow: Vec<AllowDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowDoc {
    verbs: Vec<String>,
    models: Option<Vec<String>>,
    queues: Option<Vec<String>>,
}

/// A known caller.
#[derive(Debug, PartialEq, Eq)]
pub struct Principal {
    /// Shown in audit records and as a job's owner.
    pub name: String,
    /// Rate limits, quotas and job visibility are per tenant.
    pub tenant: String,
    /// SHA-256 of its bearer token.
    pub token_sha256: Option<[u8; 32]>,
    /// The common name (or a DNS name) of its mTLS client certificate.
    pub client_cert_cn: Option<String>,
    /// Its roles' entries, together.
    pub allows: Vec<Allow>,
}

/// The principals of one auth file, ready to authenticate against.
#[derive(Debug, Default)]
pub struct Table {
    pub principals: Vec<Arc<Principal>>,
}

/// Names of principals and tenants: what can be shown in a log line, an event attribute and a
/// job record without quoting.
fn check_name(what: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} '{value}' must be 1-128 letters, digits, '-', '_', '.' or '@'"
        ))
    }
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn patterns(
    role: &str,
    entry: usize,
    key: &str,
    list: Option<Vec<String>>,
) -> Result<Option<Vec<Pattern>>, String> {
    let at = || format!("role '{role}', allow entry {}: {key}", entry + 1);
    let Some(list) = list else { return Ok(None) };
    if list.is_empty() {
        return Err(format!(
            "{} is empty, which matches nothing; leave the key out to mean every one",
            at()
        ));
    }
    list.iter()
        .map(|p| Pattern::parse(p).map_err(|e| format!("{}: {e}", at())))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

impl Table {
    /// Reads an auth file's text; the error names what is wrong (and, for TOML errors, where).
    pub fn parse(text: &str) -> Result<Table, String> {
        let doc: FileDoc = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut roles: BTreeMap<String, Vec<Allow>> = BTreeMap::new();
        for role in doc.role {
            check_name("role name", &role.name)?;
            let mut allows = Vec::with_capacity(role.allow.len());
            for (i, a) in role.allow.into_iter().enumerate() {
                if a.verbs.is_empty() {
                    return Err(format!(
                        "role '{}', allow entry {}: verbs is empty",
                        role.name,
                        i + 1
                    ));
                }
                let mut verbs = 0;
                for v in &a.verbs {
                    verbs |= verbs_of(v)
                        .map_err(|e| format!("role '{}', allow entry {}: {e}", role.name, i + 1))?;
                }
                allows.push(Allow {
                    verbs,
                    models: patterns(&role.name, i, "models", a.models)?,
                    queues: patterns(&role.name, i, "queues", a.queues)?,
                });
            }
            if roles.insert(role.name.clone(), allows).is_some() {
                return Err(format!("role '{}' is defined twice", role.name));
            }
        }
        let mut names = BTreeSet::new();
        let mut tokens = BTreeMap::new();
        let mut certs = BTreeMap::new();
        let mut principals = Vec::with_capacity(doc.principal.len());
        for p in doc.principal {
            check_name("principal name", &p.name)?;
            let at = |what: String| format!("principal '{}': {what}", p.name);
            check_name("tenant", &p.tenant).map_err(at)?;
            if !names.insert(p.name.clone()) {
                return Err(format!("principal '{}' is defined twice", p.name));
            }
            let token = match &p.token_sha256 {
                Some(hex) => Some(hex32(&hex.to_ascii_lowercase()).ok_or_else(|| {
                    at(
                        "token_sha256 is not 64 hex digits (the SHA-256 of the token; \
                        `veraltheim auth hash-token` prints it)"
                            .into(),
                    )
                })?),
                None => None,
            };
            if token.is_none() && p.client_cert_cn.is_none() {
                return Err(at(
                    "give token_sha256 or client_cert_cn: it has no way to authenticate".into(),
                ));
            }
            if let Some(t) = token
                && let Some(other) = tokens.insert(t, p.name.clone())
            {
                return Err(at(format!(
                    "its token_sha256 is also principal '{other}''s"
                )));
            }
            if let Some(cn) = &p.client_cert_cn {
                if cn.is_empty() {
                    return Err(at("client_cert_cn is empty".into()));
                }
                if let Some(other) = certs.insert(cn.clone(), p.name.clone()) {
                    return Err(at(format!(
                        "its client_cert_cn '{cn}' is also principal '{other}''s"
                    )));
                }
            }
            let mut allows = Vec::new();
            for r in &p.roles {
                let role = roles.get(r).ok_or_else(|| {
                    at(format!(
                        "no role named '{r}' (roles: {})",
                        roles.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                })?;
                allows.extend(role.iter().cloned());
            }
            principals.push(Arc::new(Principal {
                name: p.name,
                tenant: p.tenant,
                token_sha256: token,
                client_cert_cn: p.client_cert_cn,
                allows,
            }));
        }
        Ok(Table { principals })
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules::{Resource, Verb, grants};
    use super::*;

    const HASH_A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const HASH_B: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    fn example() -> String {
        format!(
            r#"
[[principal]]
name = "alice"
tenant = "search"
roles = ["user"]
token_sha256 = "{HASH_A}"

[[principal]]
name = "ops"
tenant = "platform"
roles = ["admin"]
client_cert_cn = "ops.example.com"

[[role]]
name = "user"
allow = [
  {{ verbs = ["infer", "read"], models = ["identity", "minilm*"] }},
  {{ verbs = ["jobs.submit", "jobs.read", "jobs.cancel"], queues = ["default"] }},
]

[[role]]
name = "admin"
allow = [{{ verbs = ["*"] }}]
"#
        )
    }

    fn refused(text: &str) -> String {
        Table::parse(text).expect_err("the file is refused")
    }

    #[test]
    fn the_issue_example_reads_with_its_rights() {
        let t = Table::parse(&example()).unwrap();
        assert_eq!(t.principals.len(), 2);
        let alice = &t.principals[0];
        assert_eq!(
            (alice.name.as_str(), alice.tenant.as_str()),
            ("alice", "search")
        );
        assert_eq!(alice.token_sha256.unwrap()[0], 0x9f);
        assert!(grants(
            &alice.allows,
            Verb::Infer,
            &Resource::Model("minilm")
        ));
        assert!(!grants(
            &alice.allows,
            Verb::ModelsAdmin,
            &Resource::Model("minilm")
        ));
        let ops = &t.principals[1];
        assert_eq!(ops.client_cert_cn.as_deref(), Some("ops.example.com"));
        assert!(grants(&ops.allows, Verb::SystemAdmin, &Resource::Server));
    }

    #[test]
    fn unknown_keys_and_verbs_are_refused_by_name() {
        let e = refused(&example().replace("token_sha256", "token"));
        assert!(e.contains("unknown field `token`"), "{e}");
        let e = refused(&example().replace("\"infer\", \"read\"", "\"infer\", \"reed\""));
        assert!(
            e.contains("unknown verb 'reed'") && e.contains("role 'user'"),
            "{e}"
        );
        let e = refused(&example().replace("queues = [\"default\"]", "queue = [\"default\"]"));
        assert!(e.contains("unknown field `queue`"), "{e}");
        let e = refused("[[principals]]\nname = \"x\"\n");
        assert!(e.contains("unknown field `principals`"), "{e}");
    }

    #[test]
    fn mistakes_are_refused_with_what_is_wrong() {
        let e = refused(&example().replace("roles = [\"user\"]", "roles = [\"usr\"]"));
        assert!(
            e.contains("principal 'alice'") && e.contains("no role named 'usr'"),
            "{e}"
        );
        let e = refused(&example().replace(HASH_A, "abc"));
        assert!(e.contains("64 hex digits"), "{e}");
        let e = refused(&example().replace(HASH_A, &"zz".repeat(32)));
        assert!(e.contains("64 hex digits"), "{e}");
        let e = refused(&example().replace("client_cert_cn = \"ops.example.com\"", ""));
        assert!(
            e.contains("principal 'ops'") && e.contains("no way to authenticate"),
            "{e}"
        );
        let e = refused(&example().replace("tenant = \"search\"", "tenant = \"a b\""));
        assert!(e.contains("tenant 'a b'"), "{e}");
        let e = refused(&example().replace("name = \"ops\"", "name = \"alice\""));
        assert!(e.contains("'alice' is defined twice"), "{e}");
        let twin = format!(
            "{}\n[[principal]]\nname = \"bob\"\ntenant = \"t\"\ntoken_sha256 = \"{HASH_A}\"\n",
            example()
        );
        let e = refused(&twin);
        assert!(
            e.contains("principal 'bob'") && e.contains("also principal 'alice'"),
            "{e}"
        );
        let e = refused(&example().replace("models = [\"identity\", \"minilm*\"]", "models = []"));
        assert!(e.contains("models is empty"), "{e}");
        let e = refused(&example().replace("\"minilm*\"", "\"mini*lm\""));
        assert!(e.contains("'mini*lm'"), "{e}");
        let e = refused(&example().replace("verbs = [\"*\"]", "verbs = []"));
        assert!(
            e.contains("role 'admin'") && e.contains("verbs is empty"),
            "{e}"
        );
        // Upper-case hex is the same hash.
        let t = Table::parse(&example().replace(HASH_A, &HASH_B.to_uppercase())).unwrap();
        assert_eq!(t.principals[0].token_sha256.unwrap()[0], 0x60);
    }
}
