//! Secrets kept out of what the worker prints: URLs are shown with their password masked.

/// `url` with its password replaced by `****`; a string that is not a URL is not shown at all,
/// since it could be a secret itself.
pub(crate) fn url(raw: &str) -> String {
    match url::Url::parse(raw) {
        // `scheme:user:password@host…` (the `//` left out, or one `/`) parses, as a path,
        // with the password in it: not shown.
        Ok(parsed) if !parsed.has_authority() => "(not a URL)".to_owned(),
        // `user:2024/s3cret@host` (a password holding `/`, `?` or `#`, not percent-encoded)
        // parses as the host `user`, port 2024, with the password in the path or query.
        Ok(parsed) if stray_at(&parsed) => "(not a URL)".to_owned(),
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Only fails for URLs that cannot have a password, which have none.
                let _ = parsed.set_password(Some("****"));
            }
            // PostgreSQL also takes `password=` (and `sslpassword=`) as parameters.
            if parsed.query_pairs().any(|(k, _)| is_secret(&k)) {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if is_secret(&k) { "****".into() } else { v };
                        (k.into_owned(), v.into_owned())
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "(not a URL)".to_owned(),
    }
}

fn is_secret(key: &str) -> bool {
    // A client key's value is a path, or, given inline, the key itself.
    matches!(key, "password" | "sslpassword" | "sslkey" | "ssl-key")
}

/// Why a URL with an `@` after its host is refused ([`stray_at`]), for either service.
pub(crate) const STRAY_AT: &str = "an `@` after the host: a password holding `/`, `?` or `#` \
     must be percent-encoded (%2F, %3F, %23)";

/// [`stray_at`] for text that does not parse at all: an `@` after the first `/`, `?` or `#`
/// past the scheme's `//` (`postgres://root:pa/ss@host/db` reads `pa` as a port).
pub(crate) fn stray_at_text(text: &str) -> bool {
    text.split_once("://").is_some_and(|(_, rest)| {
        rest.find(['/', '?', '#'])
            .is_some_and(|cut| leading_at(&rest[cut..]))
    })
}

/// Whether an `@` follows an authority without credentials, in the path or before the first
/// parameter's `=`: what is left of credentials whose password holds a `/`, `?` or `#` that
/// was not percent-encoded. An `@` in a parameter's value (`?user=name@server`) is not.
pub(crate) fn stray_at(parsed: &url::Url) -> bool {
    parsed.username().is_empty()
        && parsed.password().is_none()
        && (parsed.path().contains('@')
            || parsed.query().is_some_and(leading_at)
            || parsed.fragment().is_some_and(leading_at))
}

/// Whether `part` holds an `@` before its first parameter's `=` (or `&`): one in a
/// parameter's value (`?name=ops@host`) is not a stray one.
fn leading_at(part: &str) -> bool {
    part.split(['=', '&'])
        .next()
        .is_some_and(|first| first.contains('@'))
}

#[cfg(test)]
mod tests {
    use super::url;

    #[test]
    fn a_url_without_its_slashes_is_not_shown() {
        assert_eq!(url("postgres:root:s3cret@db/credit"), "(not a URL)");
        assert_eq!(url("amqp:worker:s3cret@rabbit:5672/%2f"), "(not a URL)");
        assert_eq!(url("postgres:/root:s3cret@db/credit"), "(not a URL)");
        assert_eq!(url("postgres:///credit"), "postgres:///credit");
    }

    #[test]
    fn passwords_are_masked_and_the_rest_is_kept() {
        assert_eq!(
            url("amqps://worker:s3cret@rabbit.internal:5671/%2f"),
            "amqps://worker:****@rabbit.internal:5671/%2f"
        );
        assert_eq!(
            url("postgres://root:pa%40ss@db:5432/credit?sslmode=verify-full"),
            "postgres://root:****@db:5432/credit?sslmode=verify-full"
        );
        assert_eq!(
            url("postgres://root@127.0.0.1/credit"),
            "postgres://root@127.0.0.1/credit"
        );
        assert_eq!(
            url("postgres://db/credit?user=root&password=s3cret&sslmode=require"),
            "postgres://db/credit?user=root&password=****&sslmode=require"
        );
        assert_eq!(url("//guest:s3cret@host"), "(not a URL)");
        assert_eq!(
            url("postgres://db/credit?sslmode=require&sslcert=c.pem&sslkey=k.pem"),
            "postgres://db/credit?sslmode=require&sslcert=c.pem&sslkey=****"
        );
    }

    /// A password holding `/`, `?` or `#` not percent-encoded leaves it after the host.
    #[test]
    fn a_password_left_in_the_path_or_query_is_not_shown() {
        assert_eq!(
            url("postgres://root:2024/S3CRET@127.0.0.1/db"),
            "(not a URL)"
        );
        assert_eq!(url("amqp://w:2024?S3CRET@rabbit/%2f"), "(not a URL)");
        assert_eq!(url("amqp://w:2024#S3CRET@rabbit/%2f"), "(not a URL)");
        // An `@` in a parameter's value, or after credentials, is the URL's own.
        assert_eq!(
            url("postgres://db/credit?user=root@server&application_name=cw@host1"),
            "postgres://db/credit?user=root@server&application_name=cw@host1"
        );
        assert_eq!(
            url("amqp://w:s3cret@rabbit/v@h"),
            "amqp://w:****@rabbit/v@h"
        );
    }
}
