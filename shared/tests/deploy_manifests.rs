//! The deployment files, checked statically: no Docker engine or Kubernetes cluster runs in CI.
//!
//! - Kubernetes: each overlay of `deploy/k8s/overlays` is rendered with `kubectl kustomize`
//!   and the output is checked for the properties a production deploy relies on (probes on the
//!   metrics port, resources, non-root, a PodDisruptionBudget per Deployment, HPAs capped at the
//!   partition count the topics Job creates, secrets only by reference, the setup Jobs ordered
//!   before the services; prod: the PrometheusRule equal to the rule files, a PodMonitor, the
//!   dashboards).
//! - Compose: `docker-compose -f deploy/compose/compose.yaml config` must accept the file, and
//!   the rendered config has the broker, the one-shot jobs and two ledger-writers.
//! - The Dockerfile: multi-stage, a non-root final stage, the `--help` smoke, a `.dockerignore`
//!   that keeps `target` and `.git` out of the context.
//!
//! `kubectl` or `docker-compose` missing: the test fails when `CI=true` (deploy/local/test
//! installs docker-compose; kubectl is on the machine image), and prints a skip line otherwise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

const SERVICES: [&str; 3] = ["ingest", "rater", "ledger-writer"];
/// Env vars that hold credentials: set from a Secret by reference, never as a literal.
const SECRET_ENV: [&str; 4] = ["DATABASE_URL", "REDIS_URL", "INGEST_ADMIN_TOKEN", "KAFKA_OPTIONS"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every document of a YAML stream, as JSON values (all our keys are strings).
fn yaml_docs(text: &str) -> Vec<Value> {
    yaml_serde::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Run `program args` in the workspace root and return its stdout. `None` (after a skip line)
/// when the program is not installed and CI is not set; a panic when it fails.
fn run_tool(program: &str, args: &[&str]) -> Option<String> {
    match Command::new(program).args(args).current_dir(root()).output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{program} is not installed and CI=true: CI must run this check (deploy/local/test installs docker-compose; kubectl comes with the machine image)"
            );
            println!("SKIP: {program} is not installed; the deployment check is skipped");
            None
        }
        Err(e) => panic!("{program}: {e}"),
        Ok(out) => {
            assert!(
                out.status.success(),
                "{program} {args:?} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8(out.stdout).expect("UTF-8 output"))
        }
    }
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

fn of_kind<'a>(docs: &'a [Value], k: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    docs.iter().filter(move |d| kind(d) == k)
}

/// `selector.matchLabels` (and `In` expressions) select a pod with `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let labels_match = selector["matchLabels"]
        .as_object()
        .map(|m| m.iter().all(|(k, v)| &labels[k] == v))
        .unwrap_or(true);
    let exprs_match = selector["matchExpressions"]
        .as_array()
        .map(|es| {
            es.iter().all(|e| {
                let have = &labels[e["key"].as_str().unwrap_or("")];
                let values = e["values"].as_array().cloned().unwrap_or_default();
                match e["operator"].as_str() {
                    Some("In") => values.contains(have),
                    Some("NotIn") => !values.contains(have),
                    Some("Exists") => !have.is_null(),
                    Some("DoesNotExist") => have.is_null(),
                    _ => false,
                }
            })
        })
        .unwrap_or(true);
    let nonempty = selector["matchLabels"].as_object().is_some_and(|m| !m.is_empty())
        || selector["matchExpressions"].as_array().is_some_and(|e| !e.is_empty());
    nonempty && labels_match && exprs_match
}

/// The `app.kubernetes.io/name` of a Deployment's pods.
fn service_of(deployment: &Value) -> &str {
    deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        .as_str()
        .unwrap_or("")
}

fn env_value<'a>(container: &'a Value, var: &str) -> Option<&'a Value> {
    container["env"].as_array()?.iter().find(|e| e["name"] == var)
}

/// The containers of every pod template in the output (Deployments and Jobs).
fn pod_templates(docs: &[Value]) -> impl Iterator<Item = (&Value, &Value)> {
    docs.iter()
        .filter(|d| matches!(kind(d), "Deployment" | "Job"))
        .map(|d| (d, &d["spec"]["template"]))
}

fn container_command(c: &Value) -> String {
    let words = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|w| w.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let mut all = words(&c["command"]);
    all.extend(words(&c["args"]));
    all.join(" ")
}

/// The partition count the topics Job creates the input and ledger topics with.
fn topic_partitions(docs: &[Value]) -> Result<u64, String> {
    let job = of_kind(docs, "Job")
        .find(|j| {
            j["spec"]["template"]["spec"]["containers"][0]["command"]
                .to_string()
                .contains("create-topics.sh")
        })
        .ok_or("no Job runs create-topics.sh")?;
    let c = &job["spec"]["template"]["spec"]["containers"][0];
    env_value(c, "TOPIC_PARTITIONS")
        .and_then(|e| e["value"].as_str())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("Job {} sets no numeric TOPIC_PARTITIONS", name(job)))
}

/// Every property the overlay must have; the problems found, all of them.
fn check_overlay(overlay: &str, docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut fail = |p: String| problems.push(format!("{overlay}: {p}"));

    let partitions = topic_partitions(docs).unwrap_or_else(|e| {
        fail(e);
        0
    });

    // --- Deployments: one per service, probes, resources, non-root, PDB -----------------------
    let deployments: Vec<&Value> = of_kind(docs, "Deployment").collect();
    for service in SERVICES {
        if !deployments.iter().any(|d| service_of(d) == service) {
            fail(format!("no Deployment for {service}"));
        }
    }
    for d in &deployments {
        let dn = name(d);
        let pod = &d["spec"]["template"]["spec"];
        let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
        let containers = pod["containers"].as_array().cloned().unwrap_or_default();
        if containers.is_empty() {
            fail(format!("Deployment {dn} has no containers"));
        }
        for c in &containers {
            let cn = format!("{dn}/{}", c["name"].as_str().unwrap_or("?"));
            let metrics_port = c["ports"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == "metrics"))
                .map(|p| p["containerPort"].clone());
            let Some(metrics_port) = metrics_port else {
                fail(format!("{cn} has no port named metrics"));
                continue;
            };
            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                let get = &c[probe]["httpGet"];
                let on_metrics = get["port"] == "metrics" || get["port"] == metrics_port;
                if get["path"] != path || !on_metrics {
                    fail(format!("{cn}: {probe} is not GET {path} on the metrics port ({get})"));
                }
            }
            for field in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    if c["resources"][field][res].is_null() {
                        fail(format!("{cn}: no resources.{field}.{res}"));
                    }
                }
            }
            let non_root =
                c["securityContext"]["runAsNonRoot"] == true || pod["securityContext"]["runAsNonRoot"] == true;
            if !non_root {
                fail(format!("{cn}: runAsNonRoot is not set"));
            }
            let sc = &c["securityContext"];
            let drops_all = sc["capabilities"]["drop"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == "ALL"));
            if sc["readOnlyRootFilesystem"] != true || sc["allowPrivilegeEscalation"] != false || !drops_all {
                fail(format!(
                    "{cn}: securityContext wants readOnlyRootFilesystem, no privilege escalation, drop ALL ({sc})"
                ));
            }
        }
        if !of_kind(docs, "PodDisruptionBudget").any(|p| selects(&p["spec"]["selector"], pod_labels)) {
            fail(format!("no PodDisruptionBudget selects the pods of {dn}"));
        }
    }

    // --- HPAs: rater and ledger-writer, never more replicas than partitions ----------------------
    for service in ["rater", "ledger-writer"] {
        let Some(d) = deployments.iter().find(|d| service_of(d) == service) else {
            continue;
        };
        let hpa = of_kind(docs, "HorizontalPodAutoscaler").find(|h| {
            h["spec"]["scaleTargetRef"]["kind"] == "Deployment"
                && h["spec"]["scaleTargetRef"]["name"].as_str() == Some(name(d))
        });
        let Some(hpa) = hpa else {
            fail(format!("no HorizontalPodAutoscaler scales {}", name(d)));
            continue;
        };
        let max = hpa["spec"]["maxReplicas"].as_u64().unwrap_or(u64::MAX);
        let min = hpa["spec"]["minReplicas"].as_u64().unwrap_or(1);
        if max > partitions {
            fail(format!(
                "HPA {} allows {max} replicas, more than the {partitions} partitions the topics Job creates (the rest would idle)",
                name(hpa)
            ));
        }
        if min > max {
            fail(format!("HPA {}: minReplicas {min} > maxReplicas {max}", name(hpa)));
        }
    }

    // --- secrets by reference --------------------------------------------------------------------
    for s in of_kind(docs, "Secret") {
        fail(format!(
            "Secret {} is in the output: secrets are created by the operator and referenced",
            name(s)
        ));
    }
    for (owner, template) in pod_templates(docs) {
        let containers = template["spec"]["containers"].as_array().cloned().unwrap_or_default();
        for c in &containers {
            for var in SECRET_ENV {
                if let Some(e) = env_value(c, var) {
                    if e["valueFrom"]["secretKeyRef"]["name"].as_str().is_none() || !e["value"].is_null() {
                        fail(format!("{} sets {var} without a secretKeyRef", name(owner)));
                    }
                }
            }
            for from in c["envFrom"].as_array().cloned().unwrap_or_default() {
                if let Some(cm) = from["configMapRef"]["name"].as_str() {
                    if !of_kind(docs, "ConfigMap").any(|m| name(m) == cm) {
                        fail(format!(
                            "{} reads ConfigMap {cm}, which is not in the output",
                            name(owner)
                        ));
                    }
                }
            }
        }
    }
    for m in of_kind(docs, "ConfigMap") {
        for var in SECRET_ENV {
            if !m["data"][var].is_null() {
                fail(format!("ConfigMap {} holds {var}: it belongs in the Secret", name(m)));
            }
        }
    }

    // --- the setup Jobs, ordered before the services ----------------------------------------------
    let migrate = of_kind(docs, "Job").find(|j| {
        j["spec"]["template"]["spec"]["containers"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| container_command(c) == "ledger-writer migrate"))
    });
    match migrate {
        None => fail("no Job runs `ledger-writer migrate`".into()),
        Some(job) => {
            let wave = job["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]
                .as_str()
                .and_then(|w| w.parse::<i64>().ok());
            let setup = job["metadata"]["labels"]["app.kubernetes.io/component"] == "setup";
            if !wave.is_some_and(|w| w < 0) || !setup {
                fail(format!(
                    "Job {} is not ordered before the services (a negative argocd sync-wave and the setup label that deploy/k8s/apply selects)",
                    name(job)
                ));
            }
        }
    }
    problems
}

/// The groups of every rule file in deploy/prometheus/rules, in file name order.
fn rule_groups() -> Value {
    let dir = root().join("deploy/prometheus/rules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/prometheus/rules")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    files.sort();
    let mut groups = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("rule file");
        let doc: Value = yaml_serde::from_str(&text).expect("rule file YAML");
        groups.extend(doc["groups"].as_array().cloned().unwrap_or_default());
    }
    Value::Array(groups)
}

/// What only prod has: the monitoring component.
fn check_monitoring(docs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let rules: Vec<&Value> = of_kind(docs, "PrometheusRule").collect();
    match rules.as_slice() {
        [rule] => {
            if rule["spec"]["groups"] != rule_groups() {
                problems.push(
                    "prod: the PrometheusRule differs from deploy/prometheus/rules: run deploy/k8s/components/monitoring/sync-rules".into(),
                );
            }
        }
        _ => problems.push(format!("prod: {} PrometheusRules, want 1", rules.len())),
    }
    for d in of_kind(docs, "Deployment") {
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        let scraped = of_kind(docs, "PodMonitor").any(|m| {
            selects(&m["spec"]["selector"], labels)
                && m["spec"]["podMetricsEndpoints"]
                    .as_array()
                    .is_some_and(|es| es.iter().any(|e| e["port"] == "metrics"))
        }) || of_kind(docs, "ServiceMonitor").any(|m| {
            of_kind(docs, "Service").any(|s| {
                selects(&m["spec"]["selector"], &s["metadata"]["labels"])
                    && s["spec"]["selector"]
                        .as_object()
                        .is_some_and(|sel| sel.iter().all(|(k, v)| &labels[k] == v))
            })
        });
        if !scraped {
            problems.push(format!("prod: no PodMonitor or ServiceMonitor scrapes {}", name(d)));
        }
        // The alert rules select by job: it must be the service's name.
        if let Some(m) = of_kind(docs, "PodMonitor").find(|m| selects(&m["spec"]["selector"], labels)) {
            if m["spec"]["jobLabel"] != "app.kubernetes.io/name" {
                problems.push(format!(
                    "prod: PodMonitor {} does not take the job from app.kubernetes.io/name (the rules select job=~\"ingest|rater|ledger-writer\")",
                    name(m)
                ));
            }
        }
    }
    // Every board of deploy/grafana/dashboards, unchanged, in a ConfigMap Grafana's sidecar loads.
    let boards: BTreeMap<String, Value> = of_kind(docs, "ConfigMap")
        .filter(|m| m["metadata"]["labels"]["grafana_dashboard"] == "1")
        .flat_map(|m| m["data"].as_object().cloned().unwrap_or_default())
        .collect();
    let dir = root().join("deploy/grafana/dashboards");
    for entry in std::fs::read_dir(&dir).expect("deploy/grafana/dashboards") {
        let path = entry.expect("dir entry").path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if !file.ends_with(".json") {
            continue;
        }
        match boards.get(&file).and_then(Value::as_str) {
            None => problems.push(format!(
                "prod: dashboard {file} is in no ConfigMap labelled grafana_dashboard: \"1\" (list it in deploy/grafana/kustomization.yaml)"
            )),
            Some(text) => {
                if text != std::fs::read_to_string(&path).expect("dashboard") {
                    problems.push(format!("prod: the ConfigMap's {file} differs from the file"));
                }
            }
        }
    }
    problems
}

fn render(overlay: &str) -> Option<Vec<Value>> {
    let dir = format!("deploy/k8s/overlays/{overlay}");
    run_tool("kubectl", &["kustomize", &dir]).map(|out| yaml_docs(&out))
}

#[test]
fn every_overlay_renders_with_the_production_properties() {
    let overlays_dir = root().join("deploy/k8s/overlays");
    let mut overlays: Vec<String> = std::fs::read_dir(&overlays_dir)
        .expect("deploy/k8s/overlays")
        .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
        .collect();
    overlays.sort();
    assert!(overlays.contains(&"dev".to_owned()) && overlays.contains(&"prod".to_owned()));
    let mut problems = Vec::new();
    for overlay in &overlays {
        let Some(docs) = render(overlay) else { return };
        problems.extend(check_overlay(overlay, &docs));
        if overlay == "prod" {
            problems.extend(check_monitoring(&docs));
            let ingest = of_kind(&docs, "Deployment").find(|d| service_of(d) == "ingest");
            if ingest.is_none_or(|d| d["spec"]["replicas"].as_u64() != Some(3)) {
                problems.push("prod: ingest does not run 3 replicas".into());
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_property_checks_catch_a_broken_manifest() {
    // The checks above must be able to fail: break each property on a rendered overlay.
    let Some(docs) = render("prod") else { return };
    assert!(check_overlay("prod", &docs).is_empty());
    let deployment = |docs: &[Value], service: &str| -> usize {
        docs.iter()
            .position(|d| kind(d) == "Deployment" && service_of(d) == service)
            .expect("deployment")
    };
    let breakages: [(&str, fn(&mut Vec<Value>, usize)); 6] = [
        ("readinessProbe", |docs, i| {
            docs[i]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = Value::Null;
        }),
        ("resources.limits.memory", |docs, i| {
            docs[i]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] = Value::Null;
        }),
        ("runAsNonRoot", |docs, i| {
            docs[i]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] = Value::Bool(false);
        }),
        ("PodDisruptionBudget", |docs, _| {
            docs.retain(|d| kind(d) != "PodDisruptionBudget" || !name(d).contains("ledger-writer"));
        }),
        ("more than the", |docs, _| {
            for d in docs.iter_mut().filter(|d| kind(d) == "HorizontalPodAutoscaler") {
                d["spec"]["maxReplicas"] = Value::from(17);
            }
        }),
        ("without a secretKeyRef", |docs, i| {
            docs[i]["spec"]["template"]["spec"]["containers"][0]["env"][0] =
                serde_json::json!({"name": "DATABASE_URL", "value": "postgres://u:p@db/credits"});
        }),
    ];
    for (expect, breakage) in breakages {
        let mut broken = docs.clone();
        let i = deployment(&broken, "ledger-writer");
        breakage(&mut broken, i);
        let problems = check_overlay("prod", &broken);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "breaking {expect} went unnoticed: {problems:?}"
        );
    }
    let mut no_migrate = docs.clone();
    no_migrate.retain(|d| !(kind(d) == "Job" && name(d).contains("migrate")));
    assert!(check_overlay("prod", &no_migrate)
        .iter()
        .any(|p| p.contains("ledger-writer migrate")));
    let mut stale_rules = docs.clone();
    for r in stale_rules.iter_mut().filter(|d| kind(d) == "PrometheusRule") {
        r["spec"]["groups"][0]["rules"][0]["for"] = Value::from("1h");
    }
    assert!(check_monitoring(&stale_rules).iter().any(|p| p.contains("sync-rules")));
}

#[test]
fn compose_file_validates_and_has_the_whole_pipeline() {
    let Some(out) = run_tool("docker-compose", &["-f", "deploy/compose/compose.yaml", "config"]) else {
        return;
    };
    let config: Value = yaml_serde::from_str(&out).expect("docker-compose config output");
    let services = config["services"].as_object().expect("services");
    let command = |s: &Value| -> String {
        match &s["command"] {
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" "),
            Value::String(c) => c.clone(),
            _ => String::new(),
        }
    };
    let mut problems = Vec::new();

    let kafka = &config["services"]["kafka"];
    if !kafka["image"].as_str().is_some_and(|i| i.starts_with("apache/kafka:"))
        || !kafka["environment"]["KAFKA_PROCESS_ROLES"]
            .as_str()
            .is_some_and(|r| r.contains("controller"))
        || kafka["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] != "false"
    {
        problems.push("kafka: want the apache/kafka image in KRaft mode with auto topic creation off".to_owned());
    }

    let topics = services.iter().find(|(_, s)| command(s).contains("create-topics.sh"));
    match topics {
        None => problems.push("no one-shot service runs create-topics.sh".to_owned()),
        Some((_, s)) => {
            // The same partition count as the Kubernetes topics Job.
            let k8s: Vec<Value> = yaml_docs(&read("deploy/k8s/base/topics.yaml"));
            let want = topic_partitions(&k8s).expect("k8s topics job");
            let v = &s["environment"]["TOPIC_PARTITIONS"];
            let have = v.as_u64().or_else(|| v.as_str().and_then(|v| v.parse().ok()));
            if have != Some(want) {
                problems.push(format!("topics: TOPIC_PARTITIONS {have:?}, the k8s Job creates {want}"));
            }
        }
    }
    let migrate = services.iter().find(|(_, s)| command(s) == "ledger-writer migrate");
    if migrate.is_none() {
        problems.push("no one-shot service runs `ledger-writer migrate`".to_owned());
    }
    let writers: Vec<&String> = services
        .iter()
        .filter(|(_, s)| matches!(command(s).as_str(), "ledger-writer" | "ledger-writer run"))
        .map(|(n, _)| n)
        .collect();
    if writers.len() < 2 {
        problems.push(format!("want two ledger-writers, have {writers:?}"));
    }
    // Every pipeline service waits for both one-shot jobs to complete.
    for (n, s) in services {
        let c = command(s);
        let pipeline = ["ingest", "rater", "ledger-writer", "ledger-writer run"].contains(&c.as_str());
        if !pipeline {
            continue;
        }
        for job in [topics.map(|t| t.0), migrate.map(|m| m.0)].into_iter().flatten() {
            if s["depends_on"][job]["condition"] != "service_completed_successfully" {
                problems.push(format!("{n} does not wait for {job} to complete"));
            }
        }
        if s["healthcheck"]["test"].is_null() {
            problems.push(format!("{n} has no healthcheck"));
        }
    }
    if !command(&config["services"]["redis"]).contains("noeviction") {
        problems.push("redis does not run with maxmemory-policy noeviction".to_owned());
    }
    for svc in ["postgres", "redis", "prometheus", "grafana"] {
        if config["services"][svc].is_null() {
            problems.push(format!("no {svc} service"));
        }
    }
    // Prometheus scrapes the compose services under the job names the rules use.
    let prom: Value = yaml_serde::from_str(&read("deploy/compose/prometheus.yml")).expect("prometheus.yml");
    for job in SERVICES {
        let targets: Vec<String> = prom["scrape_configs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|j| j["job_name"] == job)
            .flat_map(|j| j["static_configs"].as_array().cloned().unwrap_or_default())
            .flat_map(|sc| sc["targets"].as_array().cloned().unwrap_or_default())
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        if targets.is_empty() {
            problems.push(format!("deploy/compose/prometheus.yml has no job {job}"));
        }
        for t in targets {
            let host = t.split(':').next().unwrap_or("");
            if !services.contains_key(host) {
                problems.push(format!("prometheus.yml scrapes {t}: no compose service {host}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The Dockerfile's instructions, continuation lines joined, split into stages.
fn dockerfile_stages(text: &str) -> Vec<Vec<String>> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if let Some(part) = trimmed.strip_suffix('\\') {
            current.push_str(part);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            instructions.push(std::mem::take(&mut current));
        }
    }
    let mut stages: Vec<Vec<String>> = Vec::new();
    for i in instructions {
        if i.to_ascii_uppercase().starts_with("FROM ") {
            stages.push(Vec::new());
        }
        if let Some(stage) = stages.last_mut() {
            stage.push(i);
        }
    }
    stages
}

fn check_dockerfile(dockerfile: &str, dockerignore: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let stages = dockerfile_stages(dockerfile);
    if stages.len() < 2 {
        problems.push(format!(
            "Dockerfile: {} stage(s), want a build and a runtime stage",
            stages.len()
        ));
        return problems;
    }
    let builder = stages[..stages.len() - 1].concat().join("\n");
    if !builder.contains("cargo build --release --locked") {
        problems.push("Dockerfile: no `cargo build --release --locked` before the final stage".into());
    }
    let last = &stages[stages.len() - 1];
    let upper = |i: &String| i.to_ascii_uppercase();
    if !last.iter().any(|i| upper(i).starts_with("COPY --FROM=")) {
        problems.push("Dockerfile: the final stage copies nothing from the build stage".into());
    }
    // The last USER of the final stage must be a non-root one.
    match last.iter().rev().find(|i| upper(i).starts_with("USER ")) {
        None => problems.push("Dockerfile: the final stage has no USER (it would run as root)".into()),
        Some(u) => {
            let user = u[5..].trim().split(':').next().unwrap_or("");
            if user == "root" || user == "0" {
                problems.push(format!("Dockerfile: the final stage runs as {user}"));
            }
        }
    }
    let smoke = last.iter().any(|i| {
        upper(i).starts_with("RUN ")
            && ["ingest --help", "rater --help", "ledger-writer --help"]
                .iter()
                .all(|h| i.contains(h))
    });
    if !smoke {
        problems.push("Dockerfile: the final stage does not run the three binaries' --help".into());
    }
    for var in [
        "INGEST_LISTEN",
        "INGEST_METRICS_LISTEN",
        "RATER_METRICS_LISTEN",
        "LEDGER_WRITER_METRICS_LISTEN",
    ] {
        if !last
            .iter()
            .any(|i| upper(i).starts_with("ENV ") && i.contains(&format!("{var}=0.0.0.0:")))
        {
            problems.push(format!("Dockerfile: the final stage does not set {var}=0.0.0.0:PORT"));
        }
    }
    let ignored: Vec<&str> = dockerignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/'))
        .collect();
    for must in ["target", ".git"] {
        if !ignored.contains(&must) {
            problems.push(format!(".dockerignore does not exclude {must}"));
        }
    }
    problems
}

#[test]
fn dockerfile_is_multi_stage_non_root_and_smoke_tested() {
    let dockerfile = read("Dockerfile");
    let dockerignore = read(".dockerignore");
    let problems = check_dockerfile(&dockerfile, &dockerignore);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // And the check can fail.
    let as_root = dockerfile.replace("USER 10001:10001", "USER root");
    assert!(check_dockerfile(&as_root, &dockerignore)
        .iter()
        .any(|p| p.contains("runs as root")));
    let no_user: String = dockerfile
        .lines()
        .filter(|l| !l.starts_with("USER "))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(check_dockerfile(&no_user, &dockerignore)
        .iter()
        .any(|p| p.contains("no USER")));
    let no_smoke = dockerfile.replace("&& ledger-writer --help", "");
    assert!(check_dockerfile(&no_smoke, &dockerignore)
        .iter()
        .any(|p| p.contains("--help")));
    let with_target = dockerignore.replace("\ntarget\n", "\n");
    assert!(check_dockerfile(&dockerfile, &with_target)
        .iter()
        .any(|p| p.contains("target")));
}
