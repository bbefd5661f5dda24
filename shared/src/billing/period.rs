//! Billing periods, as pure functions of an anchor and a clock value that the caller passes in
//! (the injected clock: the scheduler and the tests decide what "now" is).
//!
//! Period `n` of an anchor starts at anchor + n x (1 or 12) months, always counted from the
//! anchor, so a subscription started on Jan 31 renews on Feb 28 (29), Mar 31, Apr 30, ... and
//! never drifts to the 28th.

use chrono::{DateTime, Datelike, Months, TimeZone, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cadence {
    Monthly,
    Yearly,
}

impl Cadence {
    pub fn months(self) -> u32 {
        match self {
            Cadence::Monthly => 1,
            Cadence::Yearly => 12,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Cadence::Monthly => "monthly",
            Cadence::Yearly => "yearly",
        }
    }

    pub fn parse(s: &str) -> Option<Cadence> {
        match s {
            "monthly" => Some(Cadence::Monthly),
            "yearly" => Some(Cadence::Yearly),
            _ => None,
        }
    }
}

/// The start of period `n` (n >= 0).
pub fn period_start(anchor: DateTime<Utc>, cadence: Cadence, n: i32) -> DateTime<Utc> {
    let months = cadence.months() * n.max(0) as u32;
    anchor
        .checked_add_months(Months::new(months))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The index of the period that contains `now`, or None before the anchor.
pub fn period_index(anchor: DateTime<Utc>, cadence: Cadence, now: DateTime<Utc>) -> Option<i32> {
    if now < anchor {
        return None;
    }
    let months = (now.year() - anchor.year()) * 12 + now.month() as i32 - anchor.month() as i32;
    let mut n = (months / cadence.months() as i32).max(0);
    while n > 0 && period_start(anchor, cadence, n) > now {
        n -= 1;
    }
    while period_start(anchor, cadence, n + 1) <= now {
        n += 1;
    }
    Some(n)
}

/// The spend period of auto-recharge that contains `now`: a calendar month that starts on
/// `reset_day` (1-28) at 00:00 UTC. Returns (start, end).
pub fn spend_period(reset_day: u32, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let day = reset_day.clamp(1, 28);
    let this = Utc
        .with_ymd_and_hms(now.year(), now.month(), day, 0, 0, 0)
        .single()
        .expect("days 1-28 exist in every month");
    let start = if this <= now { this } else { this - Months::new(1) };
    (start, start + Months::new(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn month_ends_are_clamped_without_drift() {
        let a = t("2024-01-31T10:00:00Z");
        let starts: Vec<String> = (0..5)
            .map(|n| period_start(a, Cadence::Monthly, n).format("%F").to_string())
            .collect();
        assert_eq!(
            starts,
            ["2024-01-31", "2024-02-29", "2024-03-31", "2024-04-30", "2024-05-31"]
        );
        assert_eq!(
            period_start(t("2024-02-29T00:00:00Z"), Cadence::Yearly, 1),
            t("2025-02-28T00:00:00Z")
        );
        assert_eq!(
            period_start(t("2024-02-29T00:00:00Z"), Cadence::Yearly, 4),
            t("2028-02-29T00:00:00Z")
        );
    }

    #[test]
    fn the_index_changes_exactly_at_the_boundary() {
        let a = t("2024-01-31T10:00:00Z");
        let b = t("2024-02-29T10:00:00Z");
        assert_eq!(
            period_index(a, Cadence::Monthly, a - chrono::Duration::seconds(1)),
            None
        );
        assert_eq!(period_index(a, Cadence::Monthly, a), Some(0));
        assert_eq!(
            period_index(a, Cadence::Monthly, b - chrono::Duration::milliseconds(1)),
            Some(0)
        );
        assert_eq!(period_index(a, Cadence::Monthly, b), Some(1));
        assert_eq!(period_index(a, Cadence::Yearly, t("2025-01-31T09:59:59Z")), Some(0));
        assert_eq!(period_index(a, Cadence::Yearly, t("2025-01-31T10:00:00Z")), Some(1));
    }

    #[test]
    fn every_instant_falls_in_the_period_its_index_names() {
        // Ten years of clock values, every 7 h 13 min, against several awkward anchors.
        for anchor in ["2023-01-31T23:59:59Z", "2024-02-29T00:00:00Z", "2024-03-15T12:30:00Z"] {
            let a = t(anchor);
            for cadence in [Cadence::Monthly, Cadence::Yearly] {
                let mut now = a;
                let mut last = 0;
                while now < a + chrono::Duration::days(3650) {
                    let n = period_index(a, cadence, now).unwrap();
                    assert!(period_start(a, cadence, n) <= now && now < period_start(a, cadence, n + 1));
                    assert!(n == last || n == last + 1, "no period skipped at {now}");
                    last = n;
                    now += chrono::Duration::minutes(7 * 60 + 13);
                }
            }
        }
    }

    #[test]
    fn spend_periods_start_on_the_reset_day() {
        let (s, e) = spend_period(1, t("2024-03-15T12:00:00Z"));
        assert_eq!((s, e), (t("2024-03-01T00:00:00Z"), t("2024-04-01T00:00:00Z")));
        let (s, e) = spend_period(20, t("2024-03-15T12:00:00Z"));
        assert_eq!((s, e), (t("2024-02-20T00:00:00Z"), t("2024-03-20T00:00:00Z")));
        let (s, _) = spend_period(15, t("2024-03-15T00:00:00Z"));
        assert_eq!(s, t("2024-03-15T00:00:00Z"));
        let (s, e) = spend_period(1, t("2024-12-31T23:59:59Z"));
        assert_eq!((s, e), (t("2024-12-01T00:00:00Z"), t("2025-01-01T00:00:00Z")));
    }
}
