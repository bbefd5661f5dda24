//! Amounts: `rust_decimal` at every edge, fixed-point integers (the credit type's decimal places)
//! inside Redis. Redis Lua numbers are doubles, so every fixed value must stay within 2^53.

use rust_decimal::Decimal;

/// The largest magnitude a fixed-point amount may have: Lua doubles are exact up to 2^53.
pub const MAX_FIXED: i64 = 1 << 53;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("must not be negative")]
    Negative,
    #[error("has more than {0} decimal places")]
    TooPrecise(u32),
    #[error("is too large (the largest is {0})")]
    TooLarge(Decimal),
}

/// `d` as an integer count of 10^-decimals units, refusing what would not be exact.
pub fn to_fixed(d: Decimal, decimals: u32) -> Result<i64, AmountError> {
    if d.is_sign_negative() && !d.is_zero() {
        return Err(AmountError::Negative);
    }
    let n = d.normalize();
    if n.scale() > decimals {
        return Err(AmountError::TooPrecise(decimals));
    }
    let scaled = n
        .checked_mul(Decimal::from(10i64.pow(decimals)))
        .ok_or_else(|| AmountError::TooLarge(max_amount(decimals)))?;
    let v: i128 = scaled.mantissa() / 10i128.pow(scaled.scale());
    if v > i128::from(MAX_FIXED) {
        return Err(AmountError::TooLarge(max_amount(decimals)));
    }
    Ok(v as i64)
}

/// Signed variant for deltas and balances (which may be negative under a soft limit).
pub fn to_fixed_signed(d: Decimal, decimals: u32) -> Result<i64, AmountError> {
    if d.is_sign_negative() {
        to_fixed(-d, decimals).map(|v| -v)
    } else {
        to_fixed(d, decimals)
    }
}

/// The decimal value of a fixed-point integer.
pub fn from_fixed(v: i64, decimals: u32) -> Decimal {
    Decimal::from_i128_with_scale(i128::from(v), decimals)
}

/// The largest amount a credit type with `decimals` places can hold.
pub fn max_amount(decimals: u32) -> Decimal {
    from_fixed(MAX_FIXED, decimals)
}

/// Round a computed cost to the credit type's places: half away from zero, the rule every
/// event is priced by (documented in the README), so the same event always costs the same.
pub fn round_cost(d: Decimal, decimals: u32) -> Decimal {
    d.round_dp_with_strategy(decimals, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::str::FromStr;

    #[test]
    fn exact_round_trip() {
        let d = Decimal::from_str("12.50").unwrap();
        assert_eq!(to_fixed(d, 2), Ok(1250));
        assert_eq!(from_fixed(1250, 2), Decimal::from_str("12.50").unwrap());
        assert_eq!(
            to_fixed(Decimal::from_str("0.001").unwrap(), 2),
            Err(AmountError::TooPrecise(2))
        );
        assert_eq!(
            to_fixed(Decimal::from_str("-1").unwrap(), 2),
            Err(AmountError::Negative)
        );
        assert!(matches!(
            to_fixed(Decimal::from(i64::MAX), 0),
            Err(AmountError::TooLarge(_))
        ));
        assert_eq!(to_fixed(from_fixed(MAX_FIXED, 9), 9), Ok(MAX_FIXED));
        assert!(to_fixed(from_fixed(MAX_FIXED, 9) + from_fixed(1, 9), 9).is_err());
    }

    proptest! {
        #[test]
        fn fixed_round_trips(v in 0i64..MAX_FIXED, dp in 0u32..=9) {
            prop_assert_eq!(to_fixed(from_fixed(v, dp), dp), Ok(v));
        }
    }
}
