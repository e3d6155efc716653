//! Role-based access control on a token's claims: rules by method and path, each
//! requiring roles or scopes (any or all of them).

use crate::jwt::{Claims, claim_values};

/// Whether a rule needs any of its values or all of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Need {
    /// One of them is enough.
    #[default]
    Any,
    /// Every one.
    All,
}

/// One rule: the requests it covers and what their token must carry.
#[derive(Clone, Debug, Default)]
pub struct Rule {
    /// Methods it covers (every method when empty).
    pub methods: Vec<http::Method>,
    /// The path prefix it covers (every path when `None`).
    pub path_prefix: Option<String>,
    /// Roles, read from the provider's roles claim.
    pub roles: Vec<String>,
    /// Scopes, read from the provider's scopes claim.
    pub scopes: Vec<String>,
    /// Any or all of the roles, and any or all of the scopes.
    pub need: Need,
}

impl Rule {
    fn covers(&self, method: &http::Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
    }
}

/// A route's rules, tried in order: the first that covers a request decides.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The rules.
    pub rules: Vec<Rule>,
    /// Whether a request no rule covers is allowed (any valid token) or refused.
    pub allow_unmatched: bool,
    /// The claim holding roles (dots go into objects).
    pub roles_claim: String,
    /// The claim holding scopes.
    pub scopes_claim: String,
}

impl Policy {
    /// Whether a token with `claims` may make a `method` request for `path`; when
    /// not, what it lacks.
    pub fn allows(&self, claims: &Claims, method: &http::Method, path: &str) -> Result<(), String> {
        let Some(rule) = self.rules.iter().find(|r| r.covers(method, path)) else {
            return if self.allow_unmatched {
                Ok(())
            } else {
                Err("no rule allows this request".into())
            };
        };
        has(claims, &self.roles_claim, &rule.roles, rule.need, "role")?;
        has(claims, &self.scopes_claim, &rule.scopes, rule.need, "scope")
    }
}

fn has(claims: &Claims, claim: &str, wanted: &[String], need: Need, what: &str) -> Result<(), String> {
    if wanted.is_empty() {
        return Ok(());
    }
    let held = claim_values(claims, claim);
    let holds = |w: &String| held.iter().any(|h| h == w);
    let ok = match need {
        Need::Any => wanted.iter().any(holds),
        Need::All => wanted.iter().all(holds),
    };
    if ok {
        return Ok(());
    }
    let which = if need == Need::All { "every" } else { "a" };
    Err(format!("the token lacks {which} {what} of {}", wanted.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(json: &str) -> Claims {
        serde_json::from_str(json).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            rules: vec![
                Rule {
                    methods: vec![http::Method::DELETE],
                    roles: vec!["admin".into()],
                    ..Rule::default()
                },
                Rule {
                    path_prefix: Some("/orders".into()),
                    scopes: vec!["orders:read".into(), "orders:write".into()],
                    need: Need::All,
                    ..Rule::default()
                },
            ],
            allow_unmatched: true,
            roles_claim: "realm_access.roles".into(),
            scopes_claim: "scope".into(),
        }
    }

    #[test]
    fn the_first_rule_covering_a_request_decides() {
        let p = policy();
        let admin = claims(r#"{"realm_access": {"roles": ["admin"]}, "scope": "orders:read"}"#);
        let user = claims(r#"{"realm_access": {"roles": ["user"]}, "scope": "orders:read orders:write"}"#);
        assert!(p.allows(&admin, &http::Method::DELETE, "/orders/1").is_ok());
        let refused = p.allows(&user, &http::Method::DELETE, "/orders/1").unwrap_err();
        assert!(refused.contains("admin"), "{refused}");
        assert!(p.allows(&user, &http::Method::GET, "/orders/1").is_ok());
        // All of the scopes, not one.
        assert!(p.allows(&admin, &http::Method::GET, "/orders/1").is_err());
        assert!(p.allows(&admin, &http::Method::GET, "/health").is_ok());
    }

    #[test]
    fn unmatched_requests_follow_the_policy() {
        let p = Policy {
            allow_unmatched: false,
            ..policy()
        };
        assert!(p.allows(&claims("{}"), &http::Method::GET, "/health").is_err());
    }
}
