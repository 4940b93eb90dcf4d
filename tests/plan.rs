//! Pure planner tests: order, waves, critical path, estimates and their
//! source, selections. Rendered plans are snapshot files.

use std::collections::HashMap;
use std::time::Duration;

use slipway::config;
use slipway::plan::{self, EstimateSource, PlanError, Selection};

fn demo() -> config::Config {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/plan-demo.toml")).unwrap();
    config::parse("slipway.toml", &text).expect("demo config is valid")
}

fn names(p: &plan::Plan, idx: &[usize]) -> Vec<String> {
    idx.iter().map(|i| p.jobs[*i].name.clone()).collect()
}

#[test]
fn demo_plan_from_timeouts() {
    let p = plan::build(&demo(), "staging", &Selection::All, 4, &HashMap::new()).unwrap();
    // Every job comes after what it needs.
    for (i, j) in p.jobs.iter().enumerate() {
        assert!(j.needs.iter().all(|d| *d < i), "{} before its needs", j.name);
        assert_ne!(j.estimate_source, EstimateSource::History);
    }
    assert_eq!(names(&p, &p.critical_path), ["checkout", "migrate-db", "deploy-api", "smoke-test"]);
    assert_eq!(p.estimated_from_history, 0);
    insta::assert_snapshot!(p.render_text());
}

#[test]
fn demo_plan_from_history() {
    let history: HashMap<String, Duration> = [
        ("checkout", 1000),
        ("certificates", 9000),
        ("load-balancer", 1000),
        ("warm-cache", 3000),
        ("migrate-db", 2000),
        ("deploy-api", 2000),
        ("smoke-test", 500),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Duration::from_millis(v)))
    .collect();
    let p = plan::build(&demo(), "staging", &Selection::All, 4, &history).unwrap();
    // With these durations the certificates branch is the long one.
    assert_eq!(names(&p, &p.critical_path), ["checkout", "certificates", "load-balancer", "smoke-test"]);
    assert_eq!(p.critical_path_duration, Duration::from_millis(11_500));
    assert_eq!(p.estimated_duration, Duration::from_millis(11_500));
    assert_eq!(p.estimated_from_history, 7);
    insta::assert_snapshot!(p.render_text());
}

#[test]
fn parallelism_one_serializes_the_estimate() {
    let history: HashMap<String, Duration> = demo().jobs.iter().map(|j| (j.name.clone(), Duration::from_secs(1))).collect();
    let p = plan::build(&demo(), "staging", &Selection::All, 1, &history).unwrap();
    assert_eq!(p.estimated_duration, Duration::from_secs(7));
    assert_eq!(p.critical_path_duration, Duration::from_secs(4));
}

#[test]
fn service_selection_takes_needs_along() {
    let p = plan::build(&demo(), "staging", &Selection::Service { service: "api".into() }, 4, &HashMap::new()).unwrap();
    let all: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(all, ["checkout", "migrate-db", "deploy-api"]);
}

#[test]
fn job_selection_and_its_errors() {
    let p = plan::build(&demo(), "staging", &Selection::Jobs { jobs: vec!["load-balancer".into()] }, 4, &HashMap::new()).unwrap();
    assert_eq!(p.jobs.len(), 3);
    let e = plan::build(&demo(), "staging", &Selection::Jobs { jobs: vec!["load-balanser".into()] }, 4, &HashMap::new()).unwrap_err();
    assert_eq!(e, PlanError::UnknownJob { job: "load-balanser".into(), hint: Some("load-balancer".into()) });
    assert!(e.to_string().contains("did you mean \"load-balancer\""));
    let e = plan::build(&demo(), "qa", &Selection::All, 4, &HashMap::new()).unwrap_err();
    assert!(matches!(e, PlanError::UnknownEnvironment { .. }), "{e}");
    let e = plan::build(&demo(), "staging", &Selection::Service { service: "web".into() }, 4, &HashMap::new()).unwrap_err();
    assert!(matches!(e, PlanError::UnknownService { .. }), "{e}");
}

#[test]
fn environment_filter_and_missing_needs() {
    let c = config::parse(
        "t.toml",
        r#"
[[environment]]
name = "staging"
[[environment]]
name = "production"
[[job]]
name = "prod-only"
command = ["true"]
environments = ["production"]
[[job]]
name = "everywhere"
command = ["true"]
[[job]]
name = "needs-prod"
command = ["true"]
needs = ["prod-only"]
environments = ["staging"]
"#,
    )
    .unwrap();
    let e = plan::build(&c, "staging", &Selection::All, 2, &HashMap::new()).unwrap_err();
    assert_eq!(e, PlanError::NeedNotInEnvironment { job: "needs-prod".into(), need: "prod-only".into(), env: "staging".into() });
    let p = plan::build(&c, "production", &Selection::All, 2, &HashMap::new()).unwrap();
    let all: Vec<&str> = p.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(all, ["everywhere", "prod-only"]);
}

#[test]
fn dot_and_json_outputs() {
    let p = plan::build(&demo(), "staging", &Selection::All, 4, &HashMap::new()).unwrap();
    let dot = p.render_dot();
    assert!(dot.starts_with("digraph slipway {"));
    assert!(dot.contains("\"checkout\" -> \"certificates\";"));
    assert!(dot.contains("\"migrate-db\" -> \"deploy-api\" [style=bold, color=red];"));
    let json: serde_json::Value = serde_json::to_value(&p).unwrap();
    assert_eq!(json["jobs"].as_array().unwrap().len(), 7);
    assert_eq!(json["critical_path_duration"].as_f64().unwrap(), 300.0);
    assert_eq!(json["jobs"][0]["estimate_source"], "timeout");
}

#[test]
fn wide_plan_is_ordered_in_waves() {
    let mut text = String::new();
    for i in 0..1000 {
        text.push_str(&format!("[[job]]\nname = \"j{i}\"\ncommand = [\"true\"]\ntimeout = \"1s\"\n"));
        if i >= 50 {
            let (a, b) = (i - 50, (i * 7) % 50);
            if a == b {
                text.push_str(&format!("needs = [\"j{a}\"]\n"));
            } else {
                text.push_str(&format!("needs = [\"j{a}\", \"j{b}\"]\n"));
            }
        }
    }
    let c = config::parse("wide.toml", &text).unwrap();
    let p = plan::build(&c, "default", &Selection::All, 50, &HashMap::new()).unwrap();
    assert_eq!(p.waves.len(), 20);
    assert!(p.waves.iter().all(|w| w.len() == 50));
    assert_eq!(p.critical_path.len(), 20);
    assert_eq!(p.estimated_duration, Duration::from_secs(20));
}
