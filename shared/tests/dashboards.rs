//! The dashboards and alert rules as files: every metric they name belongs to a service (each
//! service's `tests/metric_names.rs` then checks its own against its catalogue), the boards
//! are well-formed, and every alert has a runbook section in the README.

#[path = "support/metric_refs.rs"]
mod metric_refs;

use std::collections::BTreeSet;

const SERVICES: [&str; 3] = ["ingest_", "rater_", "ledger_writer_"];

#[test]
fn the_parser_finds_metric_names_and_nothing_else() {
    use metric_refs::metric_names;
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(ingest_http_request_duration_seconds_bucket{status=~"5.."}[$__rate_interval])))"#
        ),
        ["ingest_http_request_duration_seconds_bucket"]
    );
    assert_eq!(
        names("(sum by (job, topic) (rater_consumer_lag_messages) > 20000 and on (job) sum(deriv(x_total[10m])) > 0) or vector(0)"),
        ["rater_consumer_lag_messages", "x_total"]
    );
    assert_eq!(names(r#"up{job=~"ingest|rater"} == 0"#), ["up"]);
    assert_eq!(
        names("sum without (instance) (a) / ignoring (le) group_left (b) c"),
        ["a", "c"]
    );
    assert_eq!(names("1e-9 + 0.5 * Inf"), Vec::<String>::new());
}

#[test]
fn every_metric_named_belongs_to_a_service() {
    let refs = metric_refs::referenced();
    assert!(
        refs.len() >= 30,
        "only {} metric names found: is the parser broken?",
        refs.len()
    );
    let foreign: Vec<_> = refs
        .iter()
        .filter(|(n, _)| *n != "up" && !SERVICES.iter().any(|p| n.starts_with(p)))
        .collect();
    assert!(foreign.is_empty(), "metrics of no service: {foreign:#?}");
    // Every service is on the boards.
    for p in SERVICES {
        assert!(
            refs.keys().any(|n| n.starts_with(p)),
            "no {p}* metric on any board or rule"
        );
    }
}

#[test]
fn dashboards_are_well_formed() {
    let dir = metric_refs::deploy_dir().join("grafana/dashboards");
    let mut uids = BTreeSet::new();
    for f in std::fs::read_dir(&dir).unwrap() {
        let f = f.unwrap().path();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let uid = v["uid"].as_str().unwrap_or_else(|| panic!("{}: no uid", f.display()));
        assert!(uids.insert(uid.to_owned()), "uid {uid} used twice");
        assert!(v["title"].as_str().is_some_and(|t| !t.is_empty()));
        let panels = v["panels"].as_array().unwrap();
        let mut ids = BTreeSet::new();
        for p in panels {
            assert!(ids.insert(p["id"].as_u64().unwrap()), "{}: panel id twice", f.display());
            let w = p["gridPos"]["w"].as_u64().unwrap();
            let x = p["gridPos"]["x"].as_u64().unwrap();
            assert!(x + w <= 24, "{}: panel {} wider than the grid", f.display(), p["title"]);
            if p["type"] != "row" {
                let targets = p["targets"].as_array().unwrap();
                assert!(
                    !targets.is_empty(),
                    "{}: panel {} has no query",
                    f.display(),
                    p["title"]
                );
                for t in targets {
                    assert_eq!(
                        t["datasource"]["uid"],
                        "${datasource}",
                        "{}: {}",
                        f.display(),
                        p["title"]
                    );
                }
            }
        }
    }
    assert!(uids.contains("credits-overview"));
}

#[test]
fn every_alert_has_a_runbook_in_the_readme() {
    let readme = std::fs::read_to_string(metric_refs::deploy_dir().join("../README.md")).unwrap();
    let rules = metric_refs::expressions();
    let alerts: Vec<&str> = rules
        .iter()
        .filter(|(at, _)| at.ends_with(".yml") || at.contains(".yml: "))
        .map(|(at, _)| at.split(": ").nth(1).unwrap())
        .collect();
    assert!(alerts.len() >= 5, "alerts found: {alerts:?}");
    for a in alerts {
        assert!(
            readme.contains(&format!("\n#### {a}\n")),
            "README.md has no \"#### {a}\" section under \"Operating it\""
        );
        let rules_text = std::fs::read_dir(metric_refs::deploy_dir().join("prometheus/rules"))
            .unwrap()
            .map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
            .collect::<String>();
        assert!(
            rules_text.contains(&format!("runbook: README.md#{}", a.to_ascii_lowercase())),
            "{a} has no runbook annotation pointing at its README section"
        );
    }
}
