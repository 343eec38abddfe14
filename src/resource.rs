//! Resources: what a caller asks a token for, normalised into a cache key.
//!
//! A resource is the same resource whether it arrived percent-encoded or raw (the query decoder has
//! already undone the encoding) and whether or not it carries a trailing `/.default`. A trailing slash
//! *is* significant: Entra echoes the requested spelling in `aud`, so
//! `https://management.core.windows.net/` is asked for as scope `https://management.core.windows.net//.default`.

use std::fmt;

/// Longest resource we accept; real resource URIs are far shorter.
const MAX_LEN: usize = 2048;

/// A normalised resource identifier (an App ID URI, a URL or a GUID).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Resource(String);

/// Why a resource was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ResourceError {
    /// Empty after normalisation.
    #[error("resource is empty")]
    Empty,
    /// Longer than [`MAX_LEN`].
    #[error("resource is longer than {MAX_LEN} bytes")]
    TooLong,
    /// Contains whitespace or a control character.
    #[error("resource contains whitespace or a control character")]
    BadCharacter,
}

impl Resource {
    /// Normalises a decoded resource: strips one trailing `/.default`, keeps everything else as spelt.
    pub(crate) fn parse(raw: &str) -> Result<Self, ResourceError> {
        let trimmed = raw.strip_suffix("/.default").unwrap_or(raw);
        if trimmed.is_empty() {
            return Err(ResourceError::Empty);
        }
        if trimmed.len() > MAX_LEN {
            return Err(ResourceError::TooLong);
        }
        if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ResourceError::BadCharacter);
        }
        Ok(Self(trimmed.to_owned()))
    }

    /// The normalised spelling (no `/.default`).
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The Entra v2 scope for this resource: `<resource>/.default`.
    pub(crate) fn scope(&self) -> String {
        format!("{}/.default", self.0)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Resource({:?})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_table() {
        let cases = [
            ("https://storage.azure.com", "https://storage.azure.com", "https://storage.azure.com/.default"),
            ("https://storage.azure.com/", "https://storage.azure.com/", "https://storage.azure.com//.default"),
            ("https://storage.azure.com/.default", "https://storage.azure.com", "https://storage.azure.com/.default"),
            (
                "https://management.core.windows.net//.default",
                "https://management.core.windows.net/",
                "https://management.core.windows.net//.default",
            ),
            ("api://my-app", "api://my-app", "api://my-app/.default"),
            (
                "00000003-0000-0000-c000-000000000000",
                "00000003-0000-0000-c000-000000000000",
                "00000003-0000-0000-c000-000000000000/.default",
            ),
        ];
        for (raw, norm, scope) in cases {
            let r = Resource::parse(raw).expect(raw);
            assert_eq!(r.as_str(), norm, "{raw}");
            assert_eq!(r.scope(), scope, "{raw}");
        }
    }

    #[test]
    fn encoded_and_raw_spellings_are_one_key() {
        let encoded: String = form_urlencoded::parse(b"resource=https%3A%2F%2Fstorage.azure.com%2F")
            .map(|(_, v)| v.into_owned())
            .collect();
        assert_eq!(Resource::parse(&encoded), Resource::parse("https://storage.azure.com/"));
    }

    #[test]
    fn refuses_bad_resources() {
        assert_eq!(Resource::parse(""), Err(ResourceError::Empty));
        assert_eq!(Resource::parse("/.default"), Err(ResourceError::Empty));
        assert_eq!(Resource::parse("https://a b"), Err(ResourceError::BadCharacter));
        assert_eq!(Resource::parse("https://a\n"), Err(ResourceError::BadCharacter));
        assert_eq!(Resource::parse(&"a".repeat(3000)), Err(ResourceError::TooLong));
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn parse_never_panics_and_scope_round_trips(raw in ".{0,200}") {
            if let Ok(r) = Resource::parse(&raw) {
                prop_assert_eq!(Resource::parse(&r.scope()), Ok(r.clone()));
                prop_assert!(!r.as_str().ends_with("/.default"));
            }
        }
    }
}
