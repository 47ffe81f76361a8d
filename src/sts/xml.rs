//! The STS Query API's XML bodies: the `GetWebIdentityToken` result and `ErrorResponse`.

use super::{ApiError, XML_NAMESPACE};

/// Escapes text for an XML element.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `GetWebIdentityTokenResponse`; `expiration` is ISO 8601 UTC.
pub fn token_response(token: &str, expiration: &str, request_id: &str) -> String {
    format!(
        "<GetWebIdentityTokenResponse xmlns=\"{XML_NAMESPACE}\">\n\
         \x20 <GetWebIdentityTokenResult>\n\
         \x20   <WebIdentityToken>{}</WebIdentityToken>\n\
         \x20   <Expiration>{}</Expiration>\n\
         \x20 </GetWebIdentityTokenResult>\n\
         \x20 <ResponseMetadata>\n\
         \x20   <RequestId>{}</RequestId>\n\
         \x20 </ResponseMetadata>\n\
         </GetWebIdentityTokenResponse>\n",
        escape(token),
        escape(expiration),
        escape(request_id)
    )
}

/// `ErrorResponse` with `Type` (`Sender` / `Receiver`), `Code` and `Message`.
pub fn error_response(error: &ApiError, request_id: &str) -> String {
    format!(
        "<ErrorResponse xmlns=\"{XML_NAMESPACE}\">\n\
         \x20 <Error>\n\
         \x20   <Type>{}</Type>\n\
         \x20   <Code>{}</Code>\n\
         \x20   <Message>{}</Message>\n\
         \x20 </Error>\n\
         \x20 <RequestId>{}</RequestId>\n\
         </ErrorResponse>\n",
        error.fault_type(),
        escape(error.code),
        escape(&error.message),
        escape(request_id)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shape_escapes_text() {
        let e = ApiError::new(400, "ValidationError", "Value 'a<b' at 'x' & more");
        let xml = error_response(&e, "rid");
        assert!(
            xml.starts_with("<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">")
        );
        assert!(xml.contains("<Type>Sender</Type>"));
        assert!(xml.contains("<Code>ValidationError</Code>"));
        assert!(
            xml.contains("<Message>Value &apos;a&lt;b&apos; at &apos;x&apos; &amp; more</Message>")
        );
        assert!(xml.contains("<RequestId>rid</RequestId>"));
    }

    #[test]
    fn token_shape() {
        let xml = token_response("a.b.c", "2026-04-19T12:00:00Z", "rid");
        assert!(xml.contains(
            "<GetWebIdentityTokenResult>\n    <WebIdentityToken>a.b.c</WebIdentityToken>\n    <Expiration>2026-04-19T12:00:00Z</Expiration>"
        ));
        assert!(xml.contains("<ResponseMetadata>\n    <RequestId>rid</RequestId>"));
    }
}
