//! The outbox plan without Postgres: what each batch writes, message by message.

use super::*;
use crate::settle::GrantMove;
use crate::test_facts::{entry, grant_in, settled, t, usage_of};
use shared::model::ReversalFact;

fn d(n: i64) -> Decimal {
    Decimal::from(n)
}

fn pool(tenant: &str, ct: &str) -> PoolKey {
    PoolId {
        tenant_id: tenant.into(),
        customer_id: "c".into(),
        resource_id: String::new(),
        credit_type: ct.into(),
    }
}

fn body(m: &NewMessage) -> Value {
    serde_json::from_str(&m.body).unwrap()
}

fn kinds(msgs: &[NewMessage]) -> Vec<&str> {
    msgs.iter().map(|m| m.kind).collect()
}

#[test]
fn the_plan_keeps_only_what_this_transaction_moved() {
    let facts = [
        // Consumes grant 9 of t/credits (moved).
        usage_of("t", 1, settled(vec![entry(Some(9), -5, 0)])),
        // Denied and inserted now: counted; its pool is the moved one.
        usage_of(
            "t",
            2,
            Outcome::Denied {
                credit_type: "credits".into(),
                cost: d(20),
                end_balance: d(0),
                reason: "hard limit".into(),
            },
        ),
        // Unpriced but redelivered (not inserted now): counted by the transaction that did.
        usage_of(
            "t",
            3,
            Outcome::Unpriced {
                reason: "no mapping".into(),
            },
        ),
        // A tenant without endpoints: nothing at all.
        usage_of("u", 4, settled(vec![entry(Some(10), -1, 0)])),
        // Grants in a pool that did not move: still evaluated (funding may change).
        grant_in(7, "other", 50, 50, 50),
        // A scheduled grant adds no funding yet.
        grant_in(8, "other", 30, 60, 30),
        // A give-back in a pool that did not move (a redelivery): dropped.
        LedgerMsg::Reversal(ReversalFact {
            pool: pool("t", "gone"),
            event_uid: Uuid::from_u128(5),
            at: t(100),
            entries: vec![entry(None, 1, 0)],
        }),
        // An activation funds its pool by what entered it plus the overdraft it repaid.
        LedgerMsg::GrantChange(GrantChangeFact {
            change: GrantChange::Activate,
            pool: pool("t", "act"),
            grant_id: Uuid::from_u128(11),
            at: t(70),
            actor: "sweep".into(),
            entries: vec![entry(Some(11), 20, 0)],
            repaid: d(5),
        }),
    ];
    let facts: Vec<&LedgerMsg> = facts.iter().collect();
    let pools = HashMap::from([(
        pool("t", "credits"),
        PoolMove {
            balance: d(-5),
            ..PoolMove::default()
        },
    )]);
    let grants = HashMap::from([(
        ("t".to_owned(), Uuid::from_u128(9)),
        GrantMove {
            delta: d(-4),
            ..GrantMove::default()
        },
    )]);
    let new_usage = HashSet::from([Uuid::from_u128(1), Uuid::from_u128(2)]);
    let moved = Moved {
        pools: &pools,
        grants: &grants,
        new_usage: &new_usage,
    };
    let plan = BatchPlan::new(&facts, &HashSet::from(["t".to_owned()]), &moved);

    let batch = |moved, granted, grant_facts| PoolBatch {
        moved: d(moved),
        granted: d(granted),
        grant_facts,
    };
    assert_eq!(
        plan.pools.into_iter().collect::<Vec<_>>(),
        [
            (pool("t", "act"), batch(0, 25, true)),
            (pool("t", "credits"), batch(-5, 0, false)),
            (pool("t", "other"), batch(0, 50, true)),
        ]
    );
    // The grant's move is the settle path's, not the sum of the fact's entries.
    assert_eq!(
        plan.consumed.into_iter().collect::<Vec<_>>(),
        [(("t".to_owned(), Uuid::from_u128(9)), (pool("t", "credits"), d(-4)))]
    );
    assert_eq!(
        plan.rejected,
        [Rejected {
            pool: pool("t", "credits"),
            key: "k2",
            uid: Uuid::from_u128(2),
            denied: true,
        }]
    );
    let event = |g: u128, at: i64, event| GrantEventAt {
        tenant: "t".into(),
        grant: Uuid::from_u128(g),
        at: t(at),
        event,
    };
    assert_eq!(
        plan.grant_events,
        [
            event(7, 50, GrantEvent::Granted),
            event(8, 50, GrantEvent::Granted),
            event(11, 70, GrantEvent::Changed(GrantChange::Activate, d(-20))),
        ]
    );
}

#[test]
fn unpriced_events_count_in_a_pool_without_credit_type() {
    let facts = [usage_of(
        "t",
        1,
        Outcome::Unpriced {
            reason: "no mapping".into(),
        },
    )];
    let facts: Vec<&LedgerMsg> = facts.iter().collect();
    let (pools, grants) = (HashMap::new(), HashMap::new());
    let new_usage = HashSet::from([Uuid::from_u128(1)]);
    let moved = Moved {
        pools: &pools,
        grants: &grants,
        new_usage: &new_usage,
    };
    let plan = BatchPlan::new(&facts, &HashSet::from(["t".to_owned()]), &moved);
    assert!(plan.pools.is_empty(), "an unpriced event moves no pool");
    assert_eq!(plan.rejected.len(), 1);
    assert_eq!(plan.rejected[0].pool, pool("t", ""));
    assert!(!plan.rejected[0].denied);
}

#[test]
fn rejections_count_per_pool_with_ten_samples() {
    let keys: Vec<String> = (0..12).map(|i| format!("k{i}")).collect();
    let mut rejected: Vec<Rejected> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Rejected {
            pool: pool("t", "credits"),
            key: k.as_str(),
            uid: Uuid::from_u128(i as u128),
            denied: i != 3,
        })
        .collect();
    rejected.push(Rejected {
        pool: pool("t", ""),
        key: "u",
        uid: Uuid::from_u128(99),
        denied: false,
    });
    let per = rejection_counts(&rejected);
    let credits = pool("t", "credits");
    let unpriced = pool("t", "");
    // In key order: '' before 'credits'.
    assert_eq!(per.keys().copied().collect::<Vec<_>>(), [&unpriced, &credits]);
    assert_eq!(per[&unpriced], (0, 1, vec!["u"]));
    let (denied, up, samples) = &per[&credits];
    assert_eq!((*denied, *up), (11, 1));
    assert_eq!(samples, &keys[..10].iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn the_level_path_follows_the_steps_and_ends_at_after() {
    let l = |b, g| Level {
        balance: d(b),
        granted: d(g),
    };
    assert_eq!(level_path(l(10, 10), &[], l(7, 10)), [l(7, 10)]);
    assert_eq!(
        level_path(l(10, 10), &[(d(-9), d(0)), (d(50), d(50)), (d(-3), d(0))], l(47, 60)),
        [l(1, 10), l(51, 60), l(47, 60)]
    );
    // The last level is `after` exactly, whatever the steps add up to.
    assert_eq!(level_path(l(10, 10), &[(d(-1), d(0))], l(8, 10)), [l(8, 10)]);
}

fn pool_read(stored_granted: Option<i64>, fired: &[&str], after: (i64, i64), th: Vec<Threshold>) -> PoolRead {
    PoolRead {
        pool: pool("t", "credits"),
        stored_granted: stored_granted.map(d),
        fired: fired.iter().map(|f| f.to_string()).collect(),
        after: Level {
            balance: d(after.0),
            granted: d(after.1),
        },
        thresholds: th,
    }
}

#[test]
fn pool_thresholds_cross_along_the_batch_path() {
    // A pool at 100 of 100 drains to 5 and is granted 100 more in one batch: 95% used on
    // the way, though neither end is past 90%. It fires and recovers in the same batch.
    let read = pool_read(Some(100), &[], (105, 200), thresholds(&[90], &[]));
    let pools = BTreeMap::from([(
        read.pool.clone(),
        PoolBatch {
            moved: d(5),
            granted: d(100),
            grant_facts: true,
        },
    )]);
    let moved = HashMap::from([(
        read.pool.clone(),
        PoolMove {
            balance: d(5),
            overdraft: d(0),
            steps: vec![(d(-95), d(0)), (d(100), d(100))],
        },
    )]);
    let out = pool_alerts(vec![read.clone()], &pools, &moved, t(500));
    assert_eq!(kinds(&out.msgs), [wh::BALANCE_USAGE_LOW, wh::BALANCE_RECOVERED]);
    let b = body(&out.msgs[0]);
    assert_eq!(b["type"], wh::BALANCE_USAGE_LOW);
    assert_eq!(b["data"]["balance"], "105");
    assert_eq!(b["data"]["granted"], "200");
    assert_eq!(b["data"]["resource_id"], Value::Null);
    assert_eq!(b["data"]["threshold"], json!({"type": "usage_percent", "value": 90}));
    assert_eq!(b["timestamp"], json!(t(500)));
    assert_eq!(out.balances[&read.pool], d(105));
    // Nothing stays fired, but the funding changed: stored.
    assert_eq!(
        out.states,
        [AlertState {
            pool: read.pool.clone(),
            grant: Uuid::nil(),
            level: read.after,
            fired: BTreeSet::new(),
        }]
    );
}

#[test]
fn an_unmoved_pool_with_its_state_stored_writes_nothing() {
    let read = pool_read(Some(200), &["usage_percent:50"], (80, 200), thresholds(&[50], &[]));
    let pools = BTreeMap::from([(read.pool.clone(), PoolBatch::default())]);
    let out = pool_alerts(vec![read.clone()], &pools, &HashMap::new(), t(500));
    assert!(out.msgs.is_empty());
    assert!(out.states.is_empty());
    assert_eq!(out.balances[&read.pool], d(80));
}

#[test]
fn pool_depletion_and_balance_below_fire_and_are_stored() {
    // No stored state: the funding before is what it is now less the batch's grants.
    let read = pool_read(None, &[], (-1, 10), thresholds(&[], &[d(5)]));
    let pools = BTreeMap::from([(
        read.pool.clone(),
        PoolBatch {
            moved: d(-11),
            ..PoolBatch::default()
        },
    )]);
    let out = pool_alerts(vec![read.clone()], &pools, &HashMap::new(), t(500));
    assert_eq!(kinds(&out.msgs), [wh::BALANCE_USAGE_LOW, wh::BALANCE_DEPLETED]);
    assert_eq!(
        body(&out.msgs[0])["data"]["threshold"],
        json!({"type": "balance_below", "value": "5"})
    );
    assert_eq!(body(&out.msgs[1])["data"]["threshold"], json!({"type": "depleted"}));
    let fired: BTreeSet<String> = ["balance_below:5".to_owned(), "depleted".to_owned()].into();
    assert_eq!(out.states.len(), 1);
    assert_eq!(out.states[0].fired, fired);
    assert_eq!(out.states[0].level, read.after);
}

fn grant_read(status: &str, remaining: i64, fired: &[&str]) -> GrantRead {
    GrantRead {
        tenant: "t".into(),
        grant: Uuid::from_u128(9),
        amount: d(100),
        remaining: d(remaining),
        status: status.into(),
        fired: fired.iter().map(|f| f.to_string()).collect(),
        thresholds: thresholds(&[80], &[]),
    }
}

#[test]
fn grant_depletion_fires_once_and_ended_grants_stay_quiet() {
    let pk = pool("t", "credits");
    let consumed = BTreeMap::from([(("t".to_owned(), Uuid::from_u128(9)), (pk.clone(), d(-10)))]);
    let balances = HashMap::from([(pk.clone(), d(42))]);
    // 10 left -> 0 left, usage_percent:80 fired before: only depletion fires.
    let (msgs, states) = grant_alerts(
        vec![grant_read("depleted", 0, &["usage_percent:80"])],
        &consumed,
        &balances,
        t(500),
    );
    assert_eq!(kinds(&msgs), [wh::GRANT_DEPLETED]);
    let b = body(&msgs[0]);
    assert_eq!(b["data"]["balance"], "42");
    assert_eq!(
        b["data"]["grant"],
        json!({"id": Uuid::from_u128(9), "amount": "100", "remaining": "0", "status": "depleted"})
    );
    let fired: BTreeSet<String> = ["depleted".to_owned(), "usage_percent:80".to_owned()].into();
    assert_eq!(
        states,
        [AlertState {
            pool: pk.clone(),
            grant: Uuid::from_u128(9),
            level: Level {
                balance: d(0),
                granted: d(100),
            },
            fired: fired.clone(),
        }]
    );
    // Voided: no message, but the fired set is still stored.
    let (msgs, states) = grant_alerts(
        vec![grant_read("voided", 0, &["usage_percent:80"])],
        &consumed,
        &balances,
        t(500),
    );
    assert!(msgs.is_empty());
    assert_eq!(states[0].fired, fired);
    // Already stored: nothing to write.
    let (msgs, states) = grant_alerts(
        vec![grant_read("depleted", 0, &["usage_percent:80", "depleted"])],
        &consumed,
        &HashMap::new(),
        t(500),
    );
    assert!(msgs.is_empty() && states.is_empty());
}

fn detail(id: u128, status: &str, effective: i64) -> GrantDetail {
    GrantDetail {
        tenant_id: "t".into(),
        id: Uuid::from_u128(id),
        customer_id: "c".into(),
        resource_id: String::new(),
        credit_type: "credits".into(),
        amount: d(100),
        remaining: d(60),
        status: status.into(),
        category: "paid".into(),
        priority: 1,
        cost_amount: Some(Decimal::new(1250, 2)),
        cost_currency: Some("USD".into()),
        effective_at: t(effective),
        expires_at: None,
        display_name: "g".into(),
        description: None,
        metadata: None,
        source: "api".into(),
        created_at: t(50),
        voided_at: None,
    }
}

#[test]
fn grant_messages_have_ids_derived_from_the_grant() {
    let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let event = |g, event| GrantEventAt {
        tenant: "t".into(),
        grant: g,
        at: t(70),
        event,
    };
    let events = [
        event(a, GrantEvent::Granted),
        event(b, GrantEvent::Changed(GrantChange::Expire, d(7))),
        // Its row was not read: nothing.
        event(Uuid::from_u128(3), GrantEvent::Granted),
    ];
    let rows = || vec![detail(1, "active", 900), detail(2, "expired", 50)];
    let balances = HashMap::from([(pool("t", "credits"), d(160))]);
    let msgs = grant_messages(&events, rows(), &balances, t(500));
    assert_eq!(kinds(&msgs), [wh::GRANTED, wh::EXPIRED, wh::GRANT_UPDATED]);
    let derived = |s: String| Uuid::new_v5(&MSG_NS, s.as_bytes());
    assert_eq!(msgs[0].id, derived(format!("credits.granted/t/{a}")));
    assert_eq!(msgs[1].id, derived(format!("credits.expired/t/{b}")));
    assert_eq!(msgs[2].id, derived(format!("credits.grant.updated/expired/t/{b}")));
    // A repeat is the same messages.
    let again = grant_messages(&events, rows(), &balances, t(500));
    assert_eq!(
        again.iter().map(|m| (m.id, &m.body)).collect::<Vec<_>>(),
        msgs.iter().map(|m| (m.id, &m.body)).collect::<Vec<_>>()
    );
    // An active grant not yet effective is shown as scheduled.
    let granted = body(&msgs[0]);
    assert_eq!(granted["timestamp"], json!(t(70)));
    assert_eq!(granted["data"]["balance"], "160");
    assert_eq!(granted["data"]["grant"]["status"], "scheduled");
    assert_eq!(
        granted["data"]["grant"]["cost"],
        json!({"amount": "12.5", "currency": "USD"})
    );
    let expired = body(&msgs[1]);
    assert_eq!(expired["data"]["expired_amount"], "7");
    assert_eq!(expired["data"].get("change"), None);
    let updated = body(&msgs[2]);
    assert_eq!(updated["data"]["change"], "expired");
    assert_eq!(updated["data"].get("expired_amount"), None);
    assert_eq!(updated["data"]["grant"]["status"], "expired");
    // Once effective, the same grant is active.
    let later = grant_messages(&events[..1], rows(), &balances, t(1000));
    assert_eq!(body(&later[0])["data"]["grant"]["status"], "active");
}
