//! Stripe webhook signatures, checked over the raw body before anything parses it.
//!
//! Stripe signs each delivery with the endpoint's secret and sends
//! `Stripe-Signature: t=TIMESTAMP,v1=HEX[,v1=HEX…][,v0=…]`: each `v1` is the hex HMAC-SHA256,
//! keyed with a signing secret, of `TIMESTAMP.BODY`. During a secret rotation a delivery
//! carries one `v1` per live secret, and we may hold the old and the new secret: any match
//! between the two sets is enough. A timestamp further than [`TOLERANCE_S`] from now (either
//! way) is refused, so a captured delivery cannot be replayed later. [`verify`] is a pure
//! function of its inputs (the clock is a parameter), bounded in the work a header can cause,
//! and compares in constant time.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

/// How far a signature's timestamp may be from now, seconds (Stripe's own default).
pub const TOLERANCE_S: i64 = 300;

/// The longest header looked at; a real one holds a few signatures.
pub const MAX_HEADER_BYTES: usize = 4096;

/// The most `v1` signatures compared.
pub const MAX_SIGNATURES: usize = 16;

/// Why a delivery's signature does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is not `t=…,v1=…`")]
    Malformed,
    #[error("the signature's timestamp is more than {TOLERANCE_S} s from now")]
    Expired,
    #[error("no signature matches the body with the endpoint's secrets")]
    Mismatch,
}

impl SignatureError {
    /// The stable code the API answers with.
    pub fn code(self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::Expired => "signature_expired",
            SignatureError::Mismatch => "signature_mismatch",
        }
    }
}

/// Checks `header` (the `Stripe-Signature` value) against `body` with each of `secrets`, at
/// Unix time `now`; answers the signed timestamp.
pub fn verify<S: AsRef<[u8]>>(header: &str, body: &[u8], secrets: &[S], now: i64) -> Result<i64, SignatureError> {
    if header.trim().is_empty() {
        return Err(SignatureError::Missing);
    }
    if header.len() > MAX_HEADER_BYTES {
        return Err(SignatureError::Malformed);
    }
    let mut timestamp: Option<(&str, i64)> = None;
    let mut signatures: Vec<[u8; 32]> = Vec::new();
    for item in header.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(SignatureError::Malformed);
        };
        let value = value.trim();
        match key.trim() {
            "t" => {
                let digits = !value.is_empty() && value.len() <= 12 && value.bytes().all(|b| b.is_ascii_digit());
                let parsed = value.parse::<i64>().ok().filter(|_| digits).ok_or(SignatureError::Malformed)?;
                if timestamp.replace((value, parsed)).is_some() {
                    return Err(SignatureError::Malformed);
                }
            }
            "v1" => {
                if signatures.len() >= MAX_SIGNATURES {
                    return Err(SignatureError::Malformed);
                }
                // Another scheme's value, or not hex: it cannot match, but others may.
                if let Some(signature) = decode_hex(value) {
                    signatures.push(signature);
                }
            }
            // `v0` (Stripe's test scheme) and anything newer: not ours to check.
            _ => {}
        }
    }
    let Some((text, at)) = timestamp else {
        return Err(SignatureError::Malformed);
    };
    if signatures.is_empty() {
        return Err(SignatureError::Mismatch);
    }
    if now.abs_diff(at) > TOLERANCE_S.unsigned_abs() {
        return Err(SignatureError::Expired);
    }
    let mut matched = Choice::from(0);
    for secret in secrets {
        let expected = sign_raw(secret.as_ref(), text, body);
        for signature in &signatures {
            matched |= expected.ct_eq(signature);
        }
    }
    if bool::from(matched) { Ok(at) } else { Err(SignatureError::Mismatch) }
}

fn sign_raw(secret: &[u8], timestamp: &str, body: &[u8]) -> [u8; 32] {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        // HMAC takes keys of any length; this cannot happen.
        return [0; 32];
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The `v1` signature Stripe would send for `body` at `timestamp` (lowercase hex).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    sign_raw(secret, &timestamp.to_string(), body).iter().map(|byte| format!("{byte:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        let high = char::from(pair[0]).to_digit(16)?;
        let low = char::from(pair[1]).to_digit(16)?;
        *slot = u8::try_from(high * 16 + low).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"whsec_current_0123456789";
    const OLD: &[u8] = b"whsec_previous_0123456789";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;
    const NOW: i64 = 1_764_400_000;

    fn header(t: i64, signatures: &[String]) -> String {
        let mut header = format!("t={t}");
        for signature in signatures {
            header.push_str(&format!(",v1={signature}"));
        }
        header
    }

    #[test]
    fn a_signature_of_the_body_with_the_secret_holds() {
        let good = header(NOW, &[sign(SECRET, NOW, BODY)]);
        assert_eq!(verify(&good, BODY, &[SECRET], NOW), Ok(NOW));
        // Within the tolerance either way, and with a v0 and spaces beside it.
        let spaced = format!("t={}, v0=abc, v1={}", NOW - 299, sign(SECRET, NOW - 299, BODY));
        assert_eq!(verify(&spaced, BODY, &[SECRET], NOW), Ok(NOW - 299));
    }

    #[test]
    fn another_body_secret_or_timestamp_does_not() {
        let good = sign(SECRET, NOW, BODY);
        assert_eq!(
            verify(&header(NOW, std::slice::from_ref(&good)), b"{}", &[SECRET], NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify(&header(NOW, std::slice::from_ref(&good)), BODY, &[OLD], NOW), Err(SignatureError::Mismatch));
        assert_eq!(
            verify(&header(NOW + 1, std::slice::from_ref(&good)), BODY, &[SECRET], NOW),
            Err(SignatureError::Mismatch)
        );
        let upper = good.to_uppercase();
        assert_eq!(verify(&header(NOW, &[upper]), BODY, &[SECRET], NOW), Ok(NOW), "hex in either case");
        let flipped = format!("{}{}", &good[..63], if good.ends_with('0') { '1' } else { '0' });
        assert_eq!(verify(&header(NOW, &[flipped]), BODY, &[SECRET], NOW), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_stale_or_future_timestamp_is_refused() {
        let stale = NOW - TOLERANCE_S - 1;
        assert_eq!(
            verify(&header(stale, &[sign(SECRET, stale, BODY)]), BODY, &[SECRET], NOW),
            Err(SignatureError::Expired)
        );
        let future = NOW + TOLERANCE_S + 1;
        assert_eq!(
            verify(&header(future, &[sign(SECRET, future, BODY)]), BODY, &[SECRET], NOW),
            Err(SignatureError::Expired)
        );
    }

    #[test]
    fn during_a_rotation_any_secret_matches_any_signature() {
        let both = header(NOW, &[sign(OLD, NOW, BODY), sign(SECRET, NOW, BODY)]);
        assert_eq!(verify(&both, BODY, &[SECRET], NOW), Ok(NOW), "the new secret alone");
        assert_eq!(verify(&both, BODY, &[OLD], NOW), Ok(NOW), "the old secret alone");
        let new_only = header(NOW, &[sign(SECRET, NOW, BODY)]);
        assert_eq!(verify(&new_only, BODY, &[OLD, SECRET], NOW), Ok(NOW), "we hold both");
    }

    #[test]
    fn malformed_headers_are_refused_without_panicking() {
        let good = sign(SECRET, NOW, BODY);
        assert_eq!(verify("", BODY, &[SECRET], NOW), Err(SignatureError::Missing));
        for bad in [
            "garbage".to_owned(),
            format!("v1={good}"),
            format!("t=,v1={good}"),
            format!("t=-5,v1={good}"),
            format!("t=99999999999999999999,v1={good}"),
            format!("t={NOW},t={NOW},v1={good}"),
            format!("t={NOW},v1={good},"),
            "x".repeat(MAX_HEADER_BYTES + 1),
            header(NOW, &vec![good.clone(); MAX_SIGNATURES + 1]),
        ] {
            assert_eq!(verify(&bad, BODY, &[SECRET], NOW), Err(SignatureError::Malformed), "{bad:.80}");
        }
        for unmatched in [format!("t={NOW}"), format!("t={NOW},v1=zz"), format!("t={NOW},v1=é{}", &good[2..])] {
            assert_eq!(verify(&unmatched, BODY, &[SECRET], NOW), Err(SignatureError::Mismatch), "{unmatched}");
        }
        let no_secrets: [&[u8]; 0] = [];
        assert_eq!(verify(&header(NOW, &[good]), BODY, &no_secrets, NOW), Err(SignatureError::Mismatch));
    }
}
