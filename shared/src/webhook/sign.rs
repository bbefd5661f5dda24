//! Standard Webhooks signatures. A secret is `whsec_` + base64 of random bytes; the key is the
//! decoded bytes. Each attempt is signed over `<webhook-id>.<webhook-timestamp>.<body>` with
//! HMAC-SHA256 and sent as `webhook-signature: v1,<base64>`; several signatures (a secret and
//! the one it replaced, during rotation) are separated by spaces, and a receiver accepts the
//! message if any of them verifies.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

pub const SECRET_PREFIX: &str = "whsec_";
/// How far a `webhook-timestamp` may be from the receiver's clock (the spec's default).
pub const DEFAULT_TOLERANCE_S: i64 = 300;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("the secret is not whsec_ followed by base64")]
    BadSecret,
    #[error("a webhook-id, webhook-timestamp or webhook-signature header is missing")]
    MissingHeader,
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is too far from now")]
    TimestampOutOfTolerance,
    #[error("no signature matches")]
    NoMatch,
}

/// A new random secret: 24 bytes (192 bits), as Svix issues them.
pub fn new_secret() -> String {
    let mut key = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// The HMAC key of a secret. The prefix is optional, as in the reference libraries.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, SignError> {
    let b64 = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    match STANDARD.decode(b64) {
        Ok(k) if !k.is_empty() => Ok(k),
        _ => Err(SignError::BadSecret),
    }
}

fn mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// `v1,<base64 HMAC-SHA256 of id.timestamp.body>` under one secret.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, SignError> {
    let key = secret_key(secret)?;
    let tag = mac(&key, id, timestamp, body).finalize().into_bytes();
    Ok(format!("v1,{}", STANDARD.encode(tag)))
}

/// The `webhook-signature` header value: one signature per secret, space separated.
pub fn signature_header<S: AsRef<str>>(
    secrets: &[S],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SignError> {
    let sigs = secrets
        .iter()
        .map(|s| sign(s.as_ref(), id, timestamp, body))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(sigs.join(" "))
}

/// What a receiver does: the timestamp is within `tolerance_s` of `now`, and one of the `v1`
/// signatures in `header` is the HMAC of the message under `secret` (compared in constant time).
pub fn verify(
    secret: &str,
    id: &str,
    timestamp: &str,
    header: &str,
    body: &[u8],
    now: i64,
    tolerance_s: i64,
) -> Result<(), SignError> {
    if id.is_empty() || timestamp.is_empty() || header.is_empty() {
        return Err(SignError::MissingHeader);
    }
    let ts: i64 = timestamp.parse().map_err(|_| SignError::BadTimestamp)?;
    if (now - ts).abs() > tolerance_s {
        return Err(SignError::TimestampOutOfTolerance);
    }
    let key = secret_key(secret)?;
    for part in header.split(' ') {
        let Some(sig) = part.strip_prefix("v1,") else {
            continue;
        };
        let Ok(given) = STANDARD.decode(sig) else {
            continue;
        };
        if mac(&key, id, ts, body).verify_slice(&given).is_ok() {
            return Ok(());
        }
    }
    Err(SignError::NoMatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn the_standard_webhooks_test_vector() {
        // The vector the reference libraries (standard-webhooks, svix) test against: what we
        // send is what their verifiers accept.
        assert_eq!(sign(SECRET, ID, TS, BODY).unwrap(), EXPECTED);
        assert_eq!(sign(&SECRET[6..], ID, TS, BODY).unwrap(), EXPECTED, "prefix optional");
        assert_eq!(verify(SECRET, ID, &TS.to_string(), EXPECTED, BODY, TS, 300), Ok(()));
    }

    #[test]
    fn verification_refuses_what_it_must() {
        let ts = TS.to_string();
        let v = |secret: &str, id: &str, ts: &str, header: &str, body: &[u8], now: i64| {
            verify(secret, id, ts, header, body, now, DEFAULT_TOLERANCE_S)
        };
        assert_eq!(
            v(SECRET, ID, &ts, EXPECTED, b"{\"test\": 1}", TS),
            Err(SignError::NoMatch)
        );
        assert_eq!(v(SECRET, "msg_other", &ts, EXPECTED, BODY, TS), Err(SignError::NoMatch));
        assert_eq!(v(SECRET, ID, "1614265331", EXPECTED, BODY, TS), Err(SignError::NoMatch));
        let other = new_secret();
        assert_eq!(v(&other, ID, &ts, EXPECTED, BODY, TS), Err(SignError::NoMatch));
        assert_eq!(
            v(SECRET, ID, &ts, EXPECTED, BODY, TS + 301),
            Err(SignError::TimestampOutOfTolerance)
        );
        assert_eq!(
            v(SECRET, ID, &ts, EXPECTED, BODY, TS - 301),
            Err(SignError::TimestampOutOfTolerance)
        );
        assert_eq!(v(SECRET, ID, "soon", EXPECTED, BODY, TS), Err(SignError::BadTimestamp));
        assert_eq!(v(SECRET, ID, &ts, "", BODY, TS), Err(SignError::MissingHeader));
        // A v2 (asymmetric) or garbled entry is skipped, not fatal.
        assert_eq!(
            v(SECRET, ID, &ts, &format!("v1a,xyz v1,!!! {EXPECTED}"), BODY, TS),
            Ok(())
        );
        assert_eq!(v("whsec_", ID, &ts, EXPECTED, BODY, TS), Err(SignError::BadSecret));
    }

    #[test]
    fn during_rotation_both_secrets_verify() {
        let old = new_secret();
        let new = new_secret();
        assert_ne!(old, new);
        assert!(new.starts_with(SECRET_PREFIX));
        assert_eq!(secret_key(&new).unwrap().len(), 24);
        let header = signature_header(&[&new, &old], ID, TS, BODY).unwrap();
        assert_eq!(header.split(' ').count(), 2);
        for s in [&old, &new] {
            assert_eq!(verify(s, ID, &TS.to_string(), &header, BODY, TS, 300), Ok(()));
        }
        assert_eq!(
            verify(&new_secret(), ID, &TS.to_string(), &header, BODY, TS, 300),
            Err(SignError::NoMatch)
        );
    }
}
