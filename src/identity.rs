//! Configured identities (service principals) and how a caller's selector picks one.

use std::fmt;

use crate::credential::ClientCredential;
use crate::resource::Resource;

/// How the token request names the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenApi {
    /// Entra v2 and most OAuth2 servers: `scope=<resource>/.default`.
    V2,
    /// Entra v1 (and ADFS): `resource=<resource>`.
    V1,
}

/// One service principal tokend authenticates as.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    /// Name used in logs, errors and `tokend check`.
    pub name: String,
    /// Application (client) id; also what `client_id=` selects and what responses report.
    pub client_id: String,
    /// Optional object (principal) id, selectable with `object_id=` / `principal_id=`.
    pub object_id: Option<String>,
    /// Optional ARM resource id, selectable with `msi_res_id=` / `mi_res_id=`.
    pub resource_id: Option<String>,
    /// The token endpoint.
    pub token_url: reqwest::Url,
    /// Request style.
    pub api: TokenApi,
    /// The credential.
    pub credential: ClientCredential,
    /// Resources fetched at start and kept fresh forever.
    pub resources: Vec<Resource>,
}

impl Identity {
    /// Whether `other` would make the same token requests (client id, URL, request style, credential).
    pub(crate) fn same_upstream(&self, other: &Identity) -> bool {
        self.client_id == other.client_id
            && self.token_url == other.token_url
            && self.api == other.api
            && self.credential.fingerprint() == other.credential.fingerprint()
    }
}

/// A caller's choice of identity (query parameters `client_id`, `object_id`/`principal_id`,
/// `msi_res_id`/`mi_res_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(clippy::enum_variant_names, reason = "named after the query parameters client_id, object_id, msi_res_id")]
pub(crate) enum Selector {
    /// `client_id=`
    ClientId(String),
    /// `object_id=` or `principal_id=`
    ObjectId(String),
    /// `msi_res_id=` or `mi_res_id=`
    ResourceId(String),
}

impl Selector {
    /// The query parameter family, for error messages.
    pub(crate) fn parameter(&self) -> &'static str {
        match self {
            Self::ClientId(_) => "client_id",
            Self::ObjectId(_) => "object_id",
            Self::ResourceId(_) => "msi_res_id",
        }
    }

    fn value(&self) -> &str {
        match self {
            Self::ClientId(v) | Self::ObjectId(v) | Self::ResourceId(v) => v,
        }
    }

    fn matches(&self, identity: &Identity) -> bool {
        // GUIDs and ARM ids are case-insensitive.
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        match self {
            Self::ClientId(v) => eq(v, &identity.client_id),
            Self::ObjectId(v) => identity.object_id.as_deref().is_some_and(|o| eq(v, o)),
            Self::ResourceId(v) => identity.resource_id.as_deref().is_some_and(|r| eq(v, r)),
        }
    }
}

/// No configured identity answers to a selector (→ 400, never 404).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no configured identity has {parameter} {value:?}")]
pub(crate) struct UnknownIdentity {
    /// The query parameter.
    pub parameter: &'static str,
    /// The value the caller sent (an identifier, not a secret).
    pub value: String,
}

/// The configured identities; the first is the default.
#[derive(Clone)]
pub(crate) struct Identities(Vec<std::sync::Arc<Identity>>);

impl Identities {
    /// Wraps a non-empty list (config validation guarantees it is non-empty).
    pub(crate) fn new(list: Vec<Identity>) -> Self {
        Self(list.into_iter().map(std::sync::Arc::new).collect())
    }

    /// Every identity, default first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &std::sync::Arc<Identity>> {
        self.0.iter()
    }

    /// The identity called `name`.
    pub(crate) fn by_name(&self, name: &str) -> Option<&std::sync::Arc<Identity>> {
        self.0.iter().find(|i| i.name == name)
    }

    /// Picks the identity a caller selected, or the default one.
    pub(crate) fn select(&self, selector: Option<&Selector>) -> Result<&std::sync::Arc<Identity>, UnknownIdentity> {
        let not_found = |s: &Selector| UnknownIdentity { parameter: s.parameter(), value: s.value().to_owned() };
        match selector {
            None => self.0.first().ok_or(UnknownIdentity { parameter: "identity", value: String::new() }),
            Some(s) => self.0.iter().find(|i| s.matches(i)).ok_or_else(|| not_found(s)),
        }
    }
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|i| &i.name)).finish()
    }
}

#[cfg(test)]
pub(crate) fn test_identity(name: &str, client_id: &str) -> Identity {
    Identity {
        name: name.into(),
        client_id: client_id.into(),
        object_id: None,
        resource_id: None,
        token_url: reqwest::Url::parse("http://127.0.0.1:1/t/oauth2/v2.0/token").expect("static url"),
        api: TokenApi::V2,
        credential: ClientCredential::Secret { secret: "s".into(), origin: "test".into() },
        resources: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_by_each_selector_and_defaults_to_first() {
        let mut a = test_identity("a", "11111111-1111-1111-1111-111111111111");
        a.object_id = Some("oid-a".into());
        let mut b = test_identity("b", "22222222-2222-2222-2222-222222222222");
        b.resource_id = Some(
            "/subscriptions/x/resourceGroups/y/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b".into(),
        );
        let ids = Identities::new(vec![a, b]);
        assert_eq!(ids.select(None).map(|i| i.name.as_str()), Ok("a"));
        let by_client = Selector::ClientId("22222222-2222-2222-2222-222222222222".to_uppercase());
        assert_eq!(ids.select(Some(&by_client)).map(|i| i.name.as_str()), Ok("b"));
        assert_eq!(ids.select(Some(&Selector::ObjectId("OID-A".into()))).map(|i| i.name.as_str()), Ok("a"));
        let by_res = Selector::ResourceId(
            "/SUBSCRIPTIONS/x/resourcegroups/y/providers/Microsoft.ManagedIdentity/userAssignedIdentities/b".into(),
        );
        assert_eq!(ids.select(Some(&by_res)).map(|i| i.name.as_str()), Ok("b"));
        assert_eq!(ids.by_name("b").map(|i| i.client_id.as_str()), Some("22222222-2222-2222-2222-222222222222"));
        assert!(ids.by_name("c").is_none());
        let err = ids.select(Some(&Selector::ClientId("nope".into()))).map(|i| i.name.clone());
        assert_eq!(err, Err(UnknownIdentity { parameter: "client_id", value: "nope".into() }));
    }
}
