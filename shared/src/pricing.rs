//! Pricing: a pure function from (mapping versions, event) to a cost. No I/O.
//!
//! An event is priced by the newest mapping version whose `effective_at` is at or before the
//! event's own timestamp, so a price change never reprices past events. The quantity is the
//! numeric dimension the mapping names, 1 when the mapping names none or the event does not
//! send it (absent or `null`: seed 003, "defaults to 1 if you don't send it"); a quantity that
//! is sent but is not a number, or is negative, is an error (`unpriced`). Cost = quantity x credits_per_unit, rounded to
//! the credit type's places half away from zero.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::amount::{round_cost, to_fixed};
use crate::model::Dimensions;

/// One version of a feature's credit mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct MappingVersion {
    pub effective_at: DateTime<Utc>,
    pub credit_type: String,
    pub credits_per_unit: Decimal,
    pub quantity_dimension: Option<String>,
    /// The credit type's decimal places.
    pub decimals: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Price<'a> {
    Priced {
        credit_type: &'a str,
        decimals: u32,
        cost: Decimal,
        fixed: i64,
    },
    Unpriced(&'static str),
}

/// Price one event. `versions` is sorted by `effective_at` ascending.
pub fn price<'a>(versions: &'a [MappingVersion], ts: DateTime<Utc>, dims: &Dimensions) -> Price<'a> {
    let idx = versions.partition_point(|v| v.effective_at <= ts);
    let Some(m) = idx.checked_sub(1).map(|i| &versions[i]) else {
        return Price::Unpriced(if versions.is_empty() {
            "no_mapping"
        } else {
            "no_mapping_at_time"
        });
    };
    let quantity = match &m.quantity_dimension {
        None => Decimal::ONE,
        Some(dim) => match dims.get(dim) {
            None | Some(serde_json::Value::Null) => Decimal::ONE,
            // serde_json keeps numbers as their text (arbitrary_precision): no float on the way.
            Some(serde_json::Value::Number(n)) => {
                match Decimal::from_str(&n.to_string()).or_else(|_| Decimal::from_scientific(&n.to_string())) {
                    Ok(q) if q.is_sign_negative() && !q.is_zero() => return Price::Unpriced("quantity_negative"),
                    Ok(q) => q,
                    // A JSON number that no decimal can hold.
                    Err(_) => return Price::Unpriced("cost_too_large"),
                }
            }
            Some(_) => return Price::Unpriced("quantity_not_a_number"),
        },
    };
    let Some(raw) = quantity.checked_mul(m.credits_per_unit) else {
        return Price::Unpriced("cost_too_large");
    };
    let cost = round_cost(raw, m.decimals);
    match to_fixed(cost, m.decimals) {
        Ok(fixed) => Price::Priced {
            credit_type: &m.credit_type,
            decimals: m.decimals,
            cost,
            fixed,
        },
        Err(_) => Price::Unpriced("cost_too_large"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(s, 0).unwrap()
    }

    fn v(at: i64, cpu: &str, dim: Option<&str>) -> MappingVersion {
        MappingVersion {
            effective_at: t(at),
            credit_type: "ai".into(),
            credits_per_unit: Decimal::from_str(cpu).unwrap(),
            quantity_dimension: dim.map(Into::into),
            decimals: 2,
        }
    }

    fn dims(v: serde_json::Value) -> Dimensions {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn version_in_force_at_event_time() {
        let vs = [v(100, "10", None), v(200, "20", None)];
        let d = Dimensions::new();
        assert_eq!(price(&vs, t(50), &d), Price::Unpriced("no_mapping_at_time"));
        assert!(matches!(price(&vs, t(100), &d), Price::Priced { fixed: 1000, .. }));
        assert!(matches!(price(&vs, t(199), &d), Price::Priced { fixed: 1000, .. }));
        assert!(matches!(price(&vs, t(200), &d), Price::Priced { fixed: 2000, .. }));
        assert_eq!(price(&[], t(200), &d), Price::Unpriced("no_mapping"));
    }

    #[test]
    fn quantity_from_dimension_without_float() {
        let vs = [v(0, "0.01", Some("tokens"))];
        let p = price(&vs, t(1), &dims(json!({"tokens": 150})));
        assert_eq!(
            p,
            Price::Priced {
                credit_type: "ai",
                decimals: 2,
                cost: Decimal::from_str("1.50").unwrap(),
                fixed: 150
            }
        );
        // 0.1 + 0.2 style values stay exact.
        let vs = [v(0, "1", Some("q"))];
        assert!(matches!(
            price(&vs, t(1), &dims(json!({"q": 0.3}))),
            Price::Priced { fixed: 30, .. }
        ));
        // Rounded half away from zero to the credit type's places.
        let vs = [v(0, "0.001", Some("q"))];
        assert!(matches!(
            price(&vs, t(1), &dims(json!({"q": 5}))),
            Price::Priced { fixed: 1, .. }
        ));
    }

    #[test]
    fn a_quantity_not_sent_is_one() {
        let vs = [v(0, "2", Some("tokens"))];
        for d in [
            Dimensions::new(),
            dims(json!({"other": 5})),
            dims(json!({"tokens": null})),
        ] {
            assert!(
                matches!(price(&vs, t(1), &d), Price::Priced { fixed: 200, .. }),
                "{d:?}"
            );
        }
    }

    #[test]
    fn unusable_quantity_is_unpriced_with_a_reason() {
        let vs = [v(0, "1", Some("tokens"))];
        assert_eq!(
            price(&vs, t(1), &dims(json!({"tokens": "x"}))),
            Price::Unpriced("quantity_not_a_number")
        );
        assert_eq!(
            price(&vs, t(1), &dims(json!({"tokens": -1}))),
            Price::Unpriced("quantity_negative")
        );
        assert_eq!(
            price(&vs, t(1), &dims(json!({"tokens": 1e300}))),
            Price::Unpriced("cost_too_large")
        );
    }
}
