//! OAuth 2.0 and OpenID Connect login providers.
//!
//! In the file, one table per provider:
//!
//! ```toml
//! [oauth.github]
//! client_id = "…"
//! client_secret = "…"          # better: WAVELINE_OAUTH_GITHUB_CLIENT_SECRET
//!
//! [oauth.corp]
//! kind = "oidc"
//! client_id = "…"
//! client_secret = "…"
//! authorize_url = "https://id.example.com/authorize"
//! token_url = "https://id.example.com/token"
//! userinfo_url = "https://id.example.com/userinfo"
//! ```
//!
//! In the environment, `WAVELINE_OAUTH_<NAME>_<FIELD>`: `WAVELINE_OAUTH_GITHUB_CLIENT_ID`.
//! A provider named `github` defaults to GitHub's kind and endpoints; any other is `oidc` and
//! names its endpoints. Endpoints must be `https`, except on loopback addresses.

use std::collections::BTreeMap;
use std::path::Path;

use secrecy::SecretString;
use serde::Serialize;
use url::Url;

use super::ConfigError;

/// Which protocol dialect a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// GitHub's OAuth 2.0: the profile from `userinfo_url`, verified emails from `emails_url`.
    Github,
    /// OpenID Connect: the standard claims (`sub`, `email`, `email_verified`) from the
    /// userinfo endpoint.
    Oidc,
}

/// One configured provider.
#[derive(Debug, Clone)]
pub struct OAuthProvider {
    /// Its name in the routes: `/v1/auth/oauth/{name}/start`.
    pub name: String,
    pub kind: ProviderKind,
    pub client_id: String,
    pub client_secret: SecretString,
    pub authorize_url: Url,
    pub token_url: Url,
    pub userinfo_url: Url,
    /// GitHub only: the account's emails with their verification.
    pub emails_url: Option<Url>,
    /// Space-separated scopes to ask for.
    pub scopes: String,
}

/// The fields of a provider, as written in the file.
pub const FIELDS: [&str; 8] =
    ["kind", "client_id", "client_secret", "authorize_url", "token_url", "userinfo_url", "emails_url", "scopes"];

/// Raw fields by provider: field → (value, where it was set).
pub(super) type RawProviders = BTreeMap<String, BTreeMap<&'static str, (String, String)>>;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Takes `OAUTH_<NAME>_<FIELD>` (the variable without its `WAVELINE_` prefix); `false` when
/// the variable is not one of these.
pub(super) fn from_env(suffix: &str, variable: &str, value: &str, raw: &mut RawProviders) -> bool {
    let Some(rest) = suffix.strip_prefix("OAUTH_") else {
        return false;
    };
    for field in FIELDS {
        let upper = format!("_{}", field.to_ascii_uppercase());
        if let Some(name) = rest.strip_suffix(&upper) {
            let name = name.to_ascii_lowercase();
            if valid_name(&name) {
                raw.entry(name).or_default().insert(field, (value.to_owned(), variable.to_owned()));
                return true;
            }
        }
    }
    false
}

/// Takes the `[oauth]` table of the file.
pub(super) fn from_table(path: &Path, value: toml::Value, raw: &mut RawProviders) -> Result<(), ConfigError> {
    let parse_error = |message: String| ConfigError::Parse { path: path.to_path_buf(), message };
    let toml::Value::Table(providers) = value else {
        return Err(parse_error("`oauth` must be a table of providers: [oauth.NAME]".into()));
    };
    for (name, fields) in providers {
        if !valid_name(&name) {
            return Err(parse_error(format!("oauth provider {name:?}: names are 1 to 32 of a-z, 0-9 and _")));
        }
        let toml::Value::Table(fields) = fields else {
            return Err(parse_error(format!("oauth.{name} must be a table")));
        };
        for (field, value) in fields {
            let Some(known) = FIELDS.iter().find(|known| **known == field) else {
                return Err(parse_error(format!(
                    "oauth.{name}: unknown field `{field}`; the fields are {}",
                    FIELDS.join(", ")
                )));
            };
            let toml::Value::String(text) = value else {
                return Err(parse_error(format!("oauth.{name}.{field} must be a string")));
            };
            let setting = format!("oauth.{name}.{field} (in {})", path.display());
            raw.entry(name.clone()).or_default().insert(known, (text, setting));
        }
    }
    Ok(())
}

/// Checks and completes every provider.
pub(super) fn resolve(raw: RawProviders) -> Result<Vec<OAuthProvider>, ConfigError> {
    raw.into_iter().map(|(name, fields)| provider(name, fields)).collect()
}

fn provider(name: String, mut fields: BTreeMap<&'static str, (String, String)>) -> Result<OAuthProvider, ConfigError> {
    let missing = |field: &str| ConfigError::Invalid {
        setting: format!(
            "oauth.{name}.{field} (WAVELINE_OAUTH_{}_{})",
            name.to_ascii_uppercase(),
            field.to_ascii_uppercase()
        ),
        expected: "a value".into(),
        got: "nothing".into(),
    };
    let kind = match fields.remove("kind") {
        Some((kind, _)) if kind.trim() == "github" => ProviderKind::Github,
        Some((kind, _)) if kind.trim() == "oidc" => ProviderKind::Oidc,
        Some((kind, setting)) => {
            return Err(ConfigError::Invalid {
                setting,
                expected: "`github` or `oidc`".into(),
                got: format!("{kind:?}"),
            });
        }
        None if name == "github" => ProviderKind::Github,
        None => ProviderKind::Oidc,
    };
    let client_id = fields.remove("client_id").map(|(v, _)| v.trim().to_owned()).filter(|v| !v.is_empty());
    let client_id = client_id.ok_or_else(|| missing("client_id"))?;
    let client_secret = fields.remove("client_secret").map(|(v, _)| SecretString::from(v.trim().to_owned()));
    let client_secret = client_secret.ok_or_else(|| missing("client_secret"))?;
    let github = |url: &str| (kind == ProviderKind::Github).then(|| url.to_owned());
    let mut url = |field: &'static str, default: Option<String>| -> Result<Option<Url>, ConfigError> {
        let (text, setting) = match (fields.remove(field), default) {
            (Some(given), _) => given,
            (None, Some(default)) => (default, String::new()),
            (None, None) => return Ok(None),
        };
        let expected = "an https URL (http only on a loopback address)";
        let url = Url::parse(text.trim()).map_err(|_| ConfigError::Invalid {
            setting: setting.clone(),
            expected: expected.into(),
            got: format!("{text:?}"),
        })?;
        let loopback = matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
            || matches!(url.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback())
            || url.host_str() == Some("localhost");
        if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
            return Err(ConfigError::Invalid { setting, expected: expected.into(), got: format!("{text:?}") });
        }
        Ok(Some(url))
    };
    let authorize_url = url("authorize_url", github("https://github.com/login/oauth/authorize"))?;
    let token_url = url("token_url", github("https://github.com/login/oauth/access_token"))?;
    let userinfo_url = url("userinfo_url", github("https://api.github.com/user"))?;
    let emails_url = url("emails_url", github("https://api.github.com/user/emails"))?;
    let scopes = fields.remove("scopes").map(|(v, _)| v).unwrap_or_else(|| match kind {
        ProviderKind::Github => "read:user user:email".to_owned(),
        ProviderKind::Oidc => "openid email profile".to_owned(),
    });
    Ok(OAuthProvider {
        authorize_url: authorize_url.ok_or_else(|| missing("authorize_url"))?,
        token_url: token_url.ok_or_else(|| missing("token_url"))?,
        userinfo_url: userinfo_url.ok_or_else(|| missing("userinfo_url"))?,
        emails_url,
        name,
        kind,
        client_id,
        client_secret,
        scopes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_come_from_tables_and_variables() {
        let mut raw = RawProviders::new();
        assert!(from_env("OAUTH_GITHUB_CLIENT_ID", "WAVELINE_OAUTH_GITHUB_CLIENT_ID", "id", &mut raw));
        assert!(from_env("OAUTH_GITHUB_CLIENT_SECRET", "WAVELINE_OAUTH_GITHUB_CLIENT_SECRET", "s", &mut raw));
        assert!(!from_env("OAUTH_GITHUB_COLOUR", "WAVELINE_OAUTH_GITHUB_COLOUR", "x", &mut raw));
        assert!(!from_env("QUEUE", "WAVELINE_QUEUE", "x", &mut raw));
        let table: toml::Value = toml::from_str(
            "[corp]\nclient_id = \"c\"\nclient_secret = \"s\"\nauthorize_url = \"https://id.example.com/a\"\n\
             token_url = \"http://127.0.0.1:9/t\"\nuserinfo_url = \"https://id.example.com/u\"\n",
        )
        .expect("toml");
        from_table(Path::new("w.toml"), table, &mut raw).expect("table");
        let providers = resolve(raw).expect("valid");
        assert_eq!(providers.len(), 2);
        let corp = &providers[0];
        assert_eq!((corp.name.as_str(), corp.kind, corp.emails_url.is_none()), ("corp", ProviderKind::Oidc, true));
        assert_eq!(corp.scopes, "openid email profile");
        let github = &providers[1];
        assert_eq!((github.kind, github.client_id.as_str()), (ProviderKind::Github, "id"));
        assert_eq!(github.token_url.as_str(), "https://github.com/login/oauth/access_token");
    }

    #[test]
    fn bad_providers_are_refused_with_the_setting_named() {
        let one = |toml: &str| {
            let mut raw = RawProviders::new();
            from_table(Path::new("w.toml"), toml::from_str(toml).expect("toml"), &mut raw).and_then(|()| resolve(raw))
        };
        let err = one("[corp]\nclient_id = \"c\"\nclient_secret = \"s\"\n").expect_err("no endpoints");
        assert!(err.to_string().contains("oauth.corp.authorize_url"), "{err}");
        let err = one(
            "[gh]\nkind = \"github\"\nclient_id = \"c\"\nclient_secret = \"s\"\ntoken_url = \"http://example.com/t\"\n",
        )
        .expect_err("plain http");
        assert!(err.to_string().contains("https"), "{err}");
        assert!(one("[github]\nclient_secret = \"s\"\n").is_err(), "no client id");
        assert!(one("[github]\nclient_id = \"c\"\nclient_secret = \"s\"\ncolour = \"x\"\n").is_err(), "unknown field");
        assert!(one("[Bad-Name]\nclient_id = \"c\"\n").is_err());
    }
}
