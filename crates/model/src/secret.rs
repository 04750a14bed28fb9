//! Wrappers for anything that must never reach a log, an error message or an audit event:
//! tokens, private keys, operator secrets, upstream credentials, webhook URLs ([`Secret`]),
//! and URLs that may carry a password, such as a store's ([`SecretUrl`], printed through
//! [`redact_url`], the one place a URL loses its password).

use std::fmt;

use zeroize::Zeroize;

/// Holds a secret value. `Debug` and `Display` print `[redacted]`; the bytes are wiped on drop;
/// the value is reachable only through [`Secret::expose`], which makes every use easy to find.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself. Call sites are the audit trail of where secrets go.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Secret(value)
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T: Zeroize> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Secret<String> {
    /// Compares with `other` in time that does not depend on where the bytes differ.
    pub fn constant_time_eq(&self, other: &str) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

/// A URL that may carry a password (a store's): `Debug` and `Display` print it through
/// [`redact_url`], so that it can name the database in a log or an error; the URL itself is
/// reachable only through [`SecretUrl::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretUrl(Secret<String>);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(Secret::new(url.into()))
    }

    /// The URL with its password, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(self.expose()))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(self.expose()))
    }
}

/// `url` with its password replaced by `[redacted]`, so that it can appear in an error or a
/// log: the password of its user information (`postgres://remit:…@db/remit`) and the value of
/// a `password` query parameter (`postgres://db/remit?password=…`, as libpq URLs allow).
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    match authority.rfind('@') {
        Some(at) if authority[..at].contains(':') => {
            let colon = authority[..at].find(':').unwrap_or(at);
            out.push_str(&authority[..=colon]);
            out.push_str("[redacted]");
            out.push_str(&authority[at..]);
        }
        _ => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    let (before_fragment, fragment) = tail.split_at(tail.find('#').unwrap_or(tail.len()));
    match before_fragment.split_once('?') {
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let parameters: Vec<String> = query
                .split('&')
                .map(|parameter| match parameter.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}=[redacted]")
                    }
                    _ => parameter.to_string(),
                })
                .collect();
            out.push_str(&parameters.join("&"));
        }
        None => out.push_str(before_fragment),
    }
    out.push_str(fragment);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://remit:hunter2@db:5432/remit"),
            "postgres://remit:[redacted]@db:5432/remit"
        );
        assert_eq!(
            redact_url("postgres://remit@db/remit"),
            "postgres://remit@db/remit"
        );
        assert_eq!(redact_url("sqlite://remit.db"), "sqlite://remit.db");
        assert_eq!(redact_url("sqlite:remit.db"), "sqlite:remit.db");
        assert_eq!(
            redact_url("mysql://a:b@c:1/d?x=y@z"),
            "mysql://a:[redacted]@c:1/d?x=y@z"
        );
        // A password with an `@` of its own, and one in the query.
        assert_eq!(
            redact_url("postgres://remit:p@ss@db/remit"),
            "postgres://remit:[redacted]@db/remit"
        );
        assert_eq!(
            redact_url("postgres://db/remit?sslmode=require&Password=hunter2#x"),
            "postgres://db/remit?sslmode=require&Password=[redacted]#x"
        );
        assert_eq!(
            redact_url("postgres://db/remit?options=-c%20search_path%3Dremit"),
            "postgres://db/remit?options=-c%20search_path%3Dremit"
        );
    }

    #[test]
    fn a_secret_url_prints_without_its_password() {
        let url = SecretUrl::new("postgres://remit:hunter2@db:5432/remit");
        assert_eq!(
            format!("{url:?}"),
            "\"postgres://remit:[redacted]@db:5432/remit\""
        );
        assert_eq!(
            format!("{url}"),
            "postgres://remit:[redacted]@db:5432/remit"
        );
        assert_eq!(url.expose(), "postgres://remit:hunter2@db:5432/remit");
    }

    #[test]
    fn never_prints_its_value() {
        let secret = Secret::new("hunter2".to_string());
        assert_eq!(format!("{secret:?}"), "[redacted]");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(&secret)), "Some([redacted])");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn compares_in_constant_time() {
        let secret = Secret::new("abc".to_string());
        assert!(secret.constant_time_eq("abc"));
        assert!(!secret.constant_time_eq("abd"));
        assert!(!secret.constant_time_eq("ab"));
    }
}
