//! Input rules shared by every endpoint: ids, amounts, timestamps, dimensions. Each failure
//! names its field.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use shared::amount::{to_fixed, AmountError};

use crate::error::ApiError;

/// Ids: 1-128 chars of `[A-Za-z0-9._:@-]`.
pub fn id_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'))
}

pub fn id(field: &str, s: &str) -> Result<(), ApiError> {
    if id_ok(s) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "invalid_id",
            "must be 1-128 characters of A-Z a-z 0-9 . _ : @ -",
        ))
    }
}

/// A decimal amount given as a string (or a JSON number), checked against the credit type's
/// places and the 2^53 fixed-point bound.
pub fn amount(field: &str, v: &Value, decimals: u32, allow_zero: bool) -> Result<Decimal, ApiError> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => {
            return Err(ApiError::invalid(
                field,
                "invalid_amount",
                "must be a decimal string such as \"12.5\"",
            ))
        }
    };
    let d = match Decimal::from_str(text.trim()).or_else(|_| Decimal::from_scientific(text.trim())) {
        Ok(d) => d,
        // A well-formed number too large (or too fine) for any decimal.
        Err(_) if looks_numeric(text.trim()) => {
            return Err(ApiError::invalid(field, "too_large", "is too large for an amount"))
        }
        Err(_) => {
            return Err(ApiError::invalid(
                field,
                "invalid_amount",
                "must be a decimal string such as \"12.5\"",
            ))
        }
    };
    if d.is_zero() && !allow_zero {
        return Err(ApiError::invalid(field, "invalid_amount", "must be greater than zero"));
    }
    match to_fixed(d, decimals) {
        Ok(_) => Ok(d.normalize()),
        Err(AmountError::Negative) => Err(ApiError::invalid(field, "invalid_amount", "must not be negative")),
        Err(e @ AmountError::TooPrecise(_)) => Err(ApiError::invalid(field, "too_precise", e.to_string())),
        Err(e @ AmountError::TooLarge(_)) => Err(ApiError::invalid(field, "too_large", e.to_string())),
    }
}

/// Digits with an optional sign, point and exponent: a number, if not one a decimal can hold.
fn looks_numeric(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (m, e) = s.split_once(['e', 'E']).unwrap_or((s, "0"));
    let e = e.strip_prefix(['+', '-']).unwrap_or(e);
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    let m_ok = match m.split_once('.') {
        Some((a, b)) => digits(a) && digits(b),
        None => digits(m),
    };
    m_ok && digits(e)
}

pub fn timestamp(field: &str, v: &Value) -> Result<DateTime<Utc>, ApiError> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .filter(|t| t.timestamp() >= 0)
        .ok_or_else(|| {
            ApiError::invalid(
                field,
                "invalid_timestamp",
                "must be an RFC 3339 time such as 2026-01-31T12:00:00Z",
            )
        })
}

/// Dimensions: a flat object of strings and numbers, at most 64 keys of at most 128 chars.
pub fn dimensions(field: &str, v: &Value) -> Result<serde_json::Map<String, Value>, ApiError> {
    let Value::Object(map) = v else {
        return Err(ApiError::invalid(
            field,
            "invalid_dimensions",
            "must be an object of strings and numbers",
        ));
    };
    if map.len() > 64 {
        return Err(ApiError::invalid(field, "too_many_dimensions", "at most 64 dimensions"));
    }
    for (k, val) in map {
        if k.is_empty() || k.len() > 128 {
            return Err(ApiError::invalid(
                &format!("{field}.{k}"),
                "invalid_dimension",
                "names are 1-128 characters",
            ));
        }
        match val {
            Value::String(s) if s.len() <= 1024 => {}
            Value::Number(_) => {}
            _ => {
                return Err(ApiError::invalid(
                    &format!("{field}.{k}"),
                    "invalid_dimension",
                    "must be a string (at most 1024 chars) or a number",
                ))
            }
        }
    }
    Ok(map.clone())
}

/// The first place in `v` holding what Postgres cannot store, with why: U+0000 in a string or a
/// key, or a number beyond `numeric` (over 100 characters, or an exponent beyond +-1000). The
/// path is written like `events[0].dimensions.name`.
pub fn unstorable_at(v: &Value, path: &mut String) -> Option<(String, &'static str)> {
    match v {
        Value::String(s) if s.contains('\0') => Some((path.clone(), "must not contain U+0000 (NUL)")),
        Value::Number(n) if !number_storable(&n.to_string()) => {
            Some((path.clone(), "is a number too large or too long to store"))
        }
        Value::Array(a) => a.iter().enumerate().find_map(|(i, x)| {
            let len = path.len();
            path.push_str(&format!("[{i}]"));
            let r = unstorable_at(x, path);
            path.truncate(len);
            r
        }),
        Value::Object(o) => o.iter().find_map(|(k, x)| {
            let len = path.len();
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&k.replace('\0', "\\u0000"));
            let r = if k.contains('\0') {
                Some((path.clone(), "names must not contain U+0000 (NUL)"))
            } else {
                unstorable_at(x, path)
            };
            path.truncate(len);
            r
        }),
        _ => None,
    }
}

/// A JSON number Postgres `numeric` (and so `jsonb`) holds: at most 100 characters, exponent
/// within +-1000.
fn number_storable(text: &str) -> bool {
    if text.len() > 100 {
        return false;
    }
    match text.split_once(['e', 'E']) {
        None => true,
        Some((_, e)) => e.parse::<i32>().is_ok_and(|e| e.abs() <= 1000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids() {
        assert!(id_ok("c-42"));
        assert!(id_ok("a.b_c:d@e-f"));
        assert!(!id_ok(""));
        assert!(!id_ok("has space"));
        assert!(!id_ok("slash/"));
        assert!(!id_ok(&"x".repeat(129)));
        assert!(id_ok(&"x".repeat(128)));
    }

    #[test]
    fn amounts() {
        assert_eq!(
            amount("a", &json!("12.50"), 2, false).unwrap(),
            Decimal::from_str("12.5").unwrap()
        );
        assert_eq!(
            amount("a", &json!("1.001"), 2, false).unwrap_err().body.code,
            "too_precise"
        );
        assert_eq!(
            amount("a", &json!("-1"), 2, false).unwrap_err().body.code,
            "invalid_amount"
        );
        assert_eq!(
            amount("a", &json!("0"), 2, false).unwrap_err().body.code,
            "invalid_amount"
        );
        assert_eq!(
            amount("a", &json!("1e30"), 2, false).unwrap_err().body.code,
            "too_large"
        );
        assert_eq!(
            amount("a", &json!("abc"), 2, false).unwrap_err().body.field.as_deref(),
            Some("a")
        );
        assert_eq!(
            amount("a", &json!({"x": 1}), 2, false).unwrap_err().body.code,
            "invalid_amount"
        );
    }

    #[test]
    fn unstorable_values_are_found_with_their_path() {
        let at = |v: Value| unstorable_at(&v, &mut String::new()).map(|(p, _)| p);
        assert_eq!(
            at(json!({"dimensions": {"a\u{0}b": "x"}})).as_deref(),
            Some("dimensions.a\\u0000b")
        );
        assert_eq!(
            at(json!({"events": [{}, {"dimensions": {"k": "v\u{0}"}}]})).as_deref(),
            Some("events[1].dimensions.k")
        );
        assert_eq!(
            at(json!({"metadata": {"deep": ["ok", "\u{0}"]}})).as_deref(),
            Some("metadata.deep[1]")
        );
        let huge: Value = serde_json::from_str(r#"{"dimensions": {"n": 1e999999}}"#).unwrap();
        assert_eq!(at(huge).as_deref(), Some("dimensions.n"));
        let fine: Value = serde_json::from_str(r#"{"dimensions": {"n": 1.5e300, "s": "caf\u00e9"}}"#).unwrap();
        assert_eq!(at(fine), None);
    }

    #[test]
    fn dims() {
        assert!(dimensions("d", &json!({"userId": "u-1", "actionTokens": 150})).is_ok());
        assert_eq!(
            dimensions("d", &json!({"a": {"b": 1}}))
                .unwrap_err()
                .body
                .field
                .as_deref(),
            Some("d.a")
        );
        assert!(dimensions("d", &json!([1])).is_err());
        assert!(dimensions("d", &json!({"a": true})).is_err());
    }
}
