//! Lists: the page size and the opaque cursor every list of the API uses.

use base64::Engine;

use crate::error::ApiError;

/// The page size of a list: 50 by default, 1 to 1000.
pub(crate) fn limit(l: Option<i64>) -> Result<i64, ApiError> {
    match l {
        None => Ok(50),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid("limit", "out_of_range", "must be between 1 and 1000")),
    }
}

/// An opaque cursor (`after`) back into the key it encodes.
pub(crate) fn decode_cursor<T: std::str::FromStr>(c: &Option<String>) -> Result<Option<T>, ApiError> {
    let Some(c) = c else { return Ok(None) };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .map(Some)
        .ok_or_else(|| ApiError::invalid("after", "invalid_cursor", "not a cursor this API returned"))
}

/// The opaque cursor of a list's last key.
pub(crate) fn encode_cursor(v: impl ToString) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}
