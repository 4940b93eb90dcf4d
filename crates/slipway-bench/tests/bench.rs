//! `slipway-bench` end to end on a small graph: both schedulers run the
//! same DAG and the report carries the figures the README quotes. (The
//! figures themselves are not asserted: timings belong to the benchmark,
//! not to tests.)

#[test]
fn bench_runs_both_schedulers_on_the_same_graph() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_slipway-bench"))
        .args(["--json", "scheduler", "--jobs", "80", "--width", "10", "--parallelism", "4", "--sleep-min-ms", "10", "--sleep-max-ms", "30", "--seed", "7"])
        .output()
        .expect("run slipway-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {}\n{}", stdout, String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["jobs"], 80);
    assert!(report["max_level_width"].as_u64().unwrap() <= 10);
    assert!(report["noop"]["ninja_secs"].as_f64().unwrap() > 0.0);
    assert!(report["noop"]["ratio"].as_f64().unwrap() > 0.0);
    assert_eq!(report["noop"]["parallelism"], 4);
    let sleep = &report["sleep"];
    // The makespan can never beat the critical path: if it did, the bench
    // or the scheduler would be lying about dependencies.
    assert!(sleep["ratio"].as_f64().unwrap() >= 1.0, "{sleep}");
    assert!(sleep["critical_path_secs"].as_f64().unwrap() > 0.0);
}
