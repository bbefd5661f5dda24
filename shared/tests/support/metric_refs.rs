//! The metric names the Grafana dashboards (`deploy/grafana/dashboards/*.json`) and the
//! Prometheus rules (`deploy/prometheus/rules/*.yml`) refer to, read from the files themselves.
//! Each service's `tests/metric_names.rs` includes this file (`#[path]`) and checks the names
//! with its prefix against its catalogue, so a metric renamed in a catalogue, or misspelt in a
//! board, fails a test instead of leaving an empty panel or an alert that never fires.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no *.{ext} in {}", dir.display());
    out
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Every PromQL expression, with where it is: ("overview.json: <panel title>", expr).
pub fn expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for f in files(&deploy_dir().join("grafana/dashboards"), "json") {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        json_exprs(&v, &name(&f), &mut out);
    }
    for f in files(&deploy_dir().join("prometheus/rules"), "yml") {
        yaml_exprs(&std::fs::read_to_string(&f).unwrap(), &name(&f), &mut out);
    }
    out
}

fn json_exprs(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(o) => {
            let at = match o.get("title").and_then(|t| t.as_str()) {
                Some(t) => format!("{}: {t}", at.split(':').next().unwrap_or(at)),
                None => at.to_owned(),
            };
            if let Some(e) = o.get("expr").and_then(|e| e.as_str()) {
                out.push((at.clone(), e.to_owned()));
            }
            for x in o.values() {
                json_exprs(x, &at, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_exprs(x, at, out)),
        _ => {}
    }
}

/// The `expr:` of each rule (inline or a `|` block), named by its alert or record.
fn yaml_exprs(text: &str, file: &str, out: &mut Vec<(String, String)>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut rule = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start();
        let indent = line.len() - t.len();
        for k in ["- alert:", "- record:"] {
            if let Some(n) = t.strip_prefix(k) {
                rule = n.trim().to_owned();
            }
        }
        if let Some(rest) = t.strip_prefix("expr:") {
            let rest = rest.trim();
            let expr = if rest.starts_with('|') || rest.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let nt = next.trim_start();
                    if !nt.is_empty() && next.len() - nt.len() <= indent {
                        break;
                    }
                    block.push(nt);
                    i += 1;
                }
                block.join("\n")
            } else {
                rest.trim_matches(|c| c == '"' || c == '\'').to_owned()
            };
            out.push((format!("{file}: {rule}"), expr));
        }
        i += 1;
    }
}

/// The metric names in a PromQL expression: identifiers left once string literals, label
/// matchers `{...}`, ranges `[...]`, grouping label lists (`by (...)`, `on (...)`, ...),
/// function and aggregation names, keywords and numbers are taken out.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    // Blank out strings, {...} and [...].
    let mut flat = String::with_capacity(expr.len());
    let (mut quote, mut depth) = (None::<char>, 0i32);
    for c in expr.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            flat.push(' ');
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            _ if depth == 0 => {
                flat.push(c);
                continue;
            }
            _ => {}
        }
        flat.push(' ');
    }
    // Tokens: identifiers (letters, digits, '_', ':') and single punctuation characters.
    let mut tokens: Vec<String> = Vec::new();
    let mut cur = String::new();
    for c in flat.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' || (c == '.' && !cur.is_empty()) {
            cur.push(c);
        } else {
            if !cur.is_empty() {
                tokens.push(std::mem::take(&mut cur));
            }
            if !c.is_whitespace() {
                tokens.push(c.to_string());
            }
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    const GROUPING: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
    const KEYWORDS: [&str; 7] = ["and", "or", "unless", "bool", "offset", "inf", "nan"];
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].as_str();
        let next = tokens.get(i + 1).map(String::as_str);
        if GROUPING.contains(&t.to_ascii_lowercase().as_str()) {
            // Skip the label list that follows, if any.
            if next == Some("(") {
                while i < tokens.len() && tokens[i] != ")" {
                    i += 1;
                }
            }
        } else if t.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && !KEYWORDS.contains(&t.to_ascii_lowercase().as_str())
            && !matches!(next, Some("(") | Some("by") | Some("without"))
        {
            names.insert(t.to_owned());
        }
        i += 1;
    }
    names
}

/// Every metric name referred to, with the places that use it.
pub fn referenced() -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (at, expr) in expressions() {
        for n in metric_names(&expr) {
            out.entry(n).or_default().push(at.clone());
        }
    }
    out
}

/// The names with `prefix` that are not in `catalogue` (histogram series `_bucket`, `_sum` and
/// `_count` count as their histogram), with where they are used; and how many were checked.
pub fn unknown(prefix: &str, catalogue: &[(String, &str)]) -> (Vec<(String, Vec<String>)>, usize) {
    let known = |n: &str| {
        catalogue.iter().any(|(c, kind)| {
            c == n
                || (*kind == "histogram"
                    && ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| n.strip_suffix(s) == Some(c.as_str())))
        })
    };
    let mut checked = 0;
    let mut missing = Vec::new();
    for (n, at) in referenced() {
        if n.starts_with(prefix) {
            checked += 1;
            if !known(&n) {
                missing.push((n, at));
            }
        }
    }
    (missing, checked)
}

/// Habit 9 of `../shared/style.md` on a catalogue (`shared::telemetry::described`): one
/// description per name, `<prefix>...`, `_total` on counters only, units in the name.
pub fn check_conventions(prefix: &str, cat: &[shared::telemetry::Described]) {
    let mut seen = BTreeSet::new();
    for d in cat {
        assert!(seen.insert(&d.name), "{} described twice", d.name);
        assert!(d.name.starts_with(prefix), "{} lacks the {prefix} prefix", d.name);
        assert!(!d.description.is_empty(), "{} has no description", d.name);
        assert_eq!(
            d.kind == "counter",
            d.name.ends_with("_total"),
            "{}: counters, and only counters, end in _total",
            d.name
        );
        if d.unit == Some("seconds") {
            assert!(
                d.name.ends_with("_seconds"),
                "{} is in seconds: name it *_seconds",
                d.name
            );
        }
        if d.kind == "histogram" {
            assert!(
                ["_seconds", "_messages", "_bytes"].iter().any(|u| d.name.ends_with(u)),
                "{}: a histogram names its unit",
                d.name
            );
        }
    }
}
