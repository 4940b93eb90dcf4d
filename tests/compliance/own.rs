//! The compliance properties of a target that runs its own rollouts (SSH
//! hosts: `Capabilities::own_rollout`). The manager hands such a target the
//! whole rollout and records what it reports; no instance passes through
//! the node, so the properties see the service through its listen address
//! (where the fixture's host answers), through `Target::machines` (what
//! runs where, and its instance ids) and through the store. They promise
//! what the instance properties of `mod.rs` promise, said of the service
//! as a whole, plus the one promise only these targets make: services
//! outlive the node that rolled them out, and the next node adopts them.

use super::*;
use slipway::targets::MachineService;

impl Harness {
    /// The service on every machine of the fixture's tables that runs it.
    /// Every machine must answer.
    async fn on_hosts(&self) -> Vec<MachineService> {
        let machines = self.target.machines(&self.fx.tables()).await;
        assert!(!machines.is_empty(), "the fixture's tables name no machine");
        for m in &machines {
            assert!(m.reachable, "{} does not answer: {:?}", m.name, m.error);
        }
        machines.into_iter().flat_map(|m| m.services).filter(|s| s.environment == self.scope.env && s.service == SERVICE).collect()
    }

    /// Asserts every machine runs `version` on `n` healthy instances; their
    /// ids, sorted.
    async fn assert_on_hosts(&self, version: &str, n: u32) -> Vec<String> {
        let found = self.on_hosts().await;
        assert!(!found.is_empty(), "no machine runs the service");
        let mut ids = Vec::new();
        for s in &found {
            assert_eq!((s.version.as_str(), s.instances, s.healthy), (version, n, n), "on the machine: {s:?}");
            assert_eq!(s.ids.len(), n as usize, "one id per instance: {s:?}");
            ids.extend(s.ids.iter().cloned());
        }
        ids.sort();
        ids
    }
}

/// Rollout 1.0 on 2 instances: succeeded, served through the listen
/// address, 2 healthy instances on the machine, recorded in the store.
pub async fn deploys_and_serves_on_hosts(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("deploys_and_serves_on_hosts", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        let r = h.roll(&m, &spec, "1.0").await;
        r.assert_succeeded();
        assert_serves(spec.listen, "1.0", 4).await;
        let ids = h.assert_on_hosts("1.0", 2).await;
        assert!(ids[0] != ids[1], "two instances, two ids: {ids:?}");
        assert_eq!(h.recorded_version().await.as_deref(), Some("1.0"), "the store records the deployed version");
    })
    .await;
}

/// After 1.0, 3.0 (its /healthz answers 500) is rolled back: the reason
/// carries the check's answer, traffic stays on the very same 1.0
/// instances, the store still says 1.0.
pub async fn unhealthy_version_rolls_back_on_hosts(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("unhealthy_version_rolls_back_on_hosts", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        let before = h.assert_on_hosts("1.0", 2).await;

        let r = h.roll(&m, &spec, "3.0").await;
        r.assert_rolled_back();
        assert!(r.reason().contains("500") && r.reason().contains("broken"), "the reason carries the failed check's answer: {}", r.text());
        assert_serves(spec.listen, "1.0", 4).await;
        assert_eq!(h.assert_on_hosts("1.0", 2).await, before, "with max_unavailable = 0 the running 1.0 instances are never touched");
        assert_eq!(h.recorded_version().await.as_deref(), Some("1.0"), "the store still records 1.0");
    })
    .await;
}

/// A version whose process exits right after it starts (9.0) is rolled
/// back as soon as it exits, not at the health deadline, with the exit
/// code in the reason.
pub async fn crash_during_rollout_rolls_back_on_hosts(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("crash_during_rollout_rolls_back_on_hosts", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        let before = h.assert_on_hosts("1.0", 2).await;

        let r = h.roll(&m, &spec, "9.0").await;
        r.assert_rolled_back();
        assert!(r.reason().contains("exit") && numbers_in(r.reason()).contains(&4), "the reason says the instance exited with code 4: {}", r.text());
        assert!(r.took < HEALTH_DEADLINE, "an exit is noticed when it happens, not at the {HEALTH_DEADLINE:?} health deadline: {}", r.text());
        assert_serves(spec.listen, "1.0", 4).await;
        assert_eq!(h.assert_on_hosts("1.0", 2).await, before, "the running 1.0 instances are untouched");
        assert_eq!(h.recorded_version().await.as_deref(), Some("1.0"));
    })
    .await;
}

/// The version that already runs, with the same spec: "nothing to do",
/// the very same instances; one more instance is not a no-op.
pub async fn same_version_again_is_a_no_op_on_hosts(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("same_version_again_is_a_no_op_on_hosts", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        let before = h.assert_on_hosts("1.0", 2).await;

        let again = h.roll(&m, &spec, "1.0").await;
        again.assert_succeeded();
        assert!(again.lines.iter().any(|l| l.contains("nothing to do")), "{}", again.text());
        assert_eq!(h.assert_on_hosts("1.0", 2).await, before, "the same instances keep running");

        let bigger = ServiceSpec { instances: 3, ..spec.clone() };
        let r = h.roll(&m, &bigger, "1.0").await;
        r.assert_succeeded();
        assert!(!r.lines.iter().any(|l| l.contains("nothing to do")), "a changed spec is rolled out: {}", r.text());
        h.assert_on_hosts("1.0", 3).await;
        assert_serves(spec.listen, "1.0", 3).await;
    })
    .await;
}

/// Under constant load through the listen address: 1.0 → 2.0 (rolling),
/// 2.0 → 3.0 (rolled back), 2.0 → 2.1 (blue-green). Not one request
/// fails, none reaches the broken 3.0.
pub async fn zero_downtime_on_hosts(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("zero_downtime_on_hosts", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        three_rollouts_under_load(&h, &m, &spec).await;
        h.assert_on_hosts("2.1", 2).await;
        assert_eq!(h.recorded_version().await.as_deref(), Some("2.1"));
    })
    .await;
}

/// An instance killed behind the target's back (SIGKILL) is replaced at
/// the same version on its machine, without the node, and the service
/// serves through the replacement; a restart is no deployment.
pub async fn dead_instance_is_replaced_on_hosts(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("dead_instance_is_replaced_on_hosts", async {
        let (m, _) = h.manager();
        let spec = h.demo_spec(2, rolling());
        h.roll(&m, &spec, "1.0").await.assert_succeeded();
        let before = h.assert_on_hosts("1.0", 2).await;

        h.kill(&before[0]).await;
        let after = eventually(Duration::from_secs(10), "the dead instance replaced on its machine", || async {
            let now = h.on_hosts().await;
            let ids: Vec<String> = now.iter().flat_map(|s| s.ids.clone()).collect();
            let healthy: u32 = now.iter().map(|s| s.healthy).sum();
            if healthy == 2 && ids.len() == 2 && !ids.contains(&before[0]) { Ok(ids) } else { Err(format!("on the machines: {now:?}")) }
        })
        .await;
        assert!(after.contains(&before[1]), "the live instance was left alone: {before:?} → {after:?}");
        assert_serves(spec.listen, "1.0", 4).await;
        assert_eq!(h.recorded_version().await.as_deref(), Some("1.0"), "a restart is no deployment");
    })
    .await;
}

/// Manager A rolls 1.0 out and stops (a node's shutdown): the service
/// goes on serving from the same instances. Manager B, over the same
/// store, restores it: it adopts those instances (none restarted) and
/// rolls on from 1.0.
pub async fn services_outlive_the_node_and_are_adopted(fx: Arc<dyn Fixture>) {
    let h = Harness::new(fx).await;
    h.run("services_outlive_the_node_and_are_adopted", async {
        let spec = h.demo_spec(2, rolling());
        let (a, a_shutdown) = h.manager();
        h.roll(&a, &spec, "1.0").await.assert_succeeded();
        let before = h.assert_on_hosts("1.0", 2).await;

        a.stop_all_services().await;
        a_shutdown.cancel();
        drop(a);
        assert_serves(spec.listen, "1.0", 4).await;
        assert_eq!(h.assert_on_hosts("1.0", 2).await, before, "the node's stop leaves the service on its machines alone");

        let b = h.restored_manager("rev-1.0").await;
        // The restore converges in the background and says how it went.
        let event = eventually(Duration::from_secs(20), "the restore's event", || async {
            let events = h.store.service_events(&h.scope.env, SERVICE, 10).await.map_err(|e| e.to_string())?;
            events.into_iter().find(|e| e.kind.starts_with("restore")).ok_or_else(|| String::from("no restore event yet"))
        })
        .await;
        assert_eq!(event.kind, "restored", "{event:?}");
        assert_eq!(h.assert_on_hosts("1.0", 2).await, before, "the restore adopted the running instances, restarting none");
        let r = h.roll(&b, &spec, "2.0").await;
        r.assert_succeeded();
        assert!(r.lines.iter().any(|l| l.contains("1.0 → 2.0")), "the adopted version is the starting point: {}", r.text());
        let now = h.assert_on_hosts("2.0", 2).await;
        assert!(now.iter().all(|id| !before.contains(id)), "2.0 runs on new instances: {before:?} → {now:?}");
        assert_serves(spec.listen, "2.0", 4).await;
        assert_eq!(h.recorded_version().await.as_deref(), Some("2.0"));
    })
    .await;
}
