//! Issue 17: the dashboard, in a real browser (Debian's Chromium through
//! chromedriver) against the real binary's `slipway serve`.
//!
//! Screenshots of the main views land in `target/ui-screenshots/` (build
//! artifacts); `SLIPWAY_UPDATE_SCREENSHOTS=1` also refreshes the README's
//! copies in `docs/images/`.

#[path = "common/browser.rs"]
mod browser;
mod common;

use std::path::Path;

use browser::Browser;
use common::Api;
use serde_json::{Value, json};

fn store_url(dir: &Path) -> String {
    format!("sqlite://{}/slipway.db", dir.display())
}

/// staging and production (production promotes from staging and needs an
/// approval), the demo service `web` in both, and a small job graph.
fn gated_config() -> String {
    let demo = common::demo_bin();
    let (s, p) = (common::free_port(), common::free_port());
    format!(
        r#"
[[environment]]
name = "staging"

[[environment]]
name = "production"
promote_from = "staging"
approval = true

[[service]]
name = "web"
listen = {{ staging = "127.0.0.1:{s}", production = "127.0.0.1:{p}" }}
command = ["{demo}", "serve", "--port", "{{port}}", "--version", "{{version}}"]
health = {{ http = "/healthz", interval = "100ms", healthy_after = 1, deadline = "10s" }}
"#
    )
}

struct Gated {
    _dir: tempfile::TempDir,
    _state: tempfile::TempDir,
    server: common::Server,
    api: Api,
    admin: String,
    bob: String,
    alice: String,
    carol: String,
}

/// A server with tokens: root (admin), bob (deployer everywhere), alice
/// (approver everywhere), carol (approver of production); web 1.0 then 1.1
/// deployed to staging.
async fn gated() -> Gated {
    let dir = common::config_dir(&gated_config(), &[]);
    let state = tempfile::tempdir().expect("state dir");
    // The server's log outside the config directory: a file written there
    // would make a new revision, and an approved deployment is submitted
    // again at a new revision.
    let server = common::Server::start_logged(dir.path(), &store_url(state.path()), &["--poll", "100ms"], state.path(), "");
    let api = Api::new(&server.url);
    let admin = api.token(None, "root", json!({"*": "admin"})).await;
    let bob = api.token(Some(&admin), "bob", json!({"*": "deployer"})).await;
    // Approver everywhere (reading the audit log needs a role for "*").
    let alice = api.token(Some(&admin), "alice", json!({"*": "approver"})).await;
    let carol = api.token(Some(&admin), "carol", json!({"production": "approver"})).await;
    for v in ["1.0", "1.1"] {
        let id = api.submit(Some(&bob), json!({"kind": "deploy", "service": "web", "version": v, "environment": "staging"})).await;
        api.wait_state(id, Some(&admin), &["succeeded"]).await;
    }
    Gated { _dir: dir, _state: state, server, api, admin, bob, alice, carol }
}

async fn sign_in(b: &Browser, token: &str) {
    b.until("the sign-in form", "return document.getElementById('token')").await;
    b.type_into("#token", token).await;
    b.click("form.signin button[type=submit]").await;
    b.until("the signed-in caller", "const m = document.getElementById('me'); return m && m.textContent").await;
}

async fn sign_out(b: &Browser) {
    b.click("#signout").await;
    b.until("the sign-in form after signing out", "return document.getElementById('token')").await;
}

/// Confirm the dialog an action opened, after checking it asks.
async fn confirm(b: &Browser) {
    b.until("the confirmation dialog", "const d = document.getElementById('confirm'); return d.open && document.getElementById('confirm-title').textContent")
        .await;
    b.click("#confirm-yes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue17_sign_in_approve_as_an_approver_and_never_as_the_requester() {
    let g = gated().await;
    // bob asks for production: the version staging runs, behind an approval.
    let (s, a) = g.api.call("POST", "/api/v1/services/production/web/promote", Some(&g.bob), Some(json!({"from": "staging"}))).await;
    assert_eq!(s, 202, "{a}");
    let promoted = a["deployment_id"].as_i64().expect("id");
    g.api.wait_state(promoted, Some(&g.admin), &["waiting"]).await;

    let b = Browser::start(1280, 900).await;
    b.goto(&format!("{}/", g.server.url)).await;
    // Tokens exist: nothing shows without one, and a wrong one is refused.
    b.until("the sign-in form", "return document.getElementById('token')").await;
    assert_eq!(b.count("#overview").await, 0, "no data before signing in");
    b.type_into("#token", "not-a-token").await;
    b.click("form.signin button[type=submit]").await;
    b.until_text("#signin-error", "refused").await;
    let stored = b.js("return sessionStorage.getItem('slipway.token')", vec![]).await;
    assert_eq!(stored, Value::Null, "a refused token is not kept");
    b.screenshot("sign-in").await;

    // The requester sees the waiting deployment, and no Approve button.
    sign_in(&b, &g.bob).await;
    b.until_text("#me", "token bob (deployer in every environment)").await;
    let row = format!("#overview tr[data-deployment='{promoted}']");
    b.until_text(&row, "You asked for it").await;
    assert_eq!(b.count(&format!("[data-key='approve/{promoted}']")).await, 0, "the requester gets no Approve button");
    assert_eq!(b.count(&format!("[data-key='cancel/{promoted}']")).await, 1, "a deployer may cancel it");
    // No token in the URL, none in a cookie; kept for the tab's session.
    let (url, cookie) = (b.js("return location.href", vec![]).await, b.js("return document.cookie", vec![]).await);
    assert!(!url.as_str().unwrap_or_default().contains(&g.bob) && cookie == json!(""), "{url} {cookie}");
    assert_eq!(b.js("return sessionStorage.getItem('slipway.token')", vec![]).await, json!(g.bob));
    sign_out(&b).await;
    assert_eq!(b.js("return sessionStorage.getItem('slipway.token')", vec![]).await, Value::Null, "signing out forgets the token");

    // An approver of production approves it from the overview.
    sign_in(&b, &g.alice).await;
    b.until_text(&row, "token bob").await;
    b.screenshot("overview").await;
    b.click(&format!("[data-key='approve/{promoted}']")).await;
    confirm(&b).await;
    let said = b.until_text("#status-msg", "approved by token alice").await;
    assert!(said.contains(&format!("#{promoted}")), "{said}");
    let d = g.api.wait_state(promoted, Some(&g.admin), &["succeeded"]).await;
    assert_eq!(d["version"], "1.1");
    b.until_text("#overview tr[data-service='production/web']", "1.1").await;

    // Four eyes, not roles: root (admin, who may approve anything) gets no
    // Approve button on the deployment root asked for, and the API
    // refuses it too; root does get one on bob's.
    let own = g.api.submit(Some(&g.admin), json!({"kind": "deploy", "service": "web", "version": "1.0", "environment": "production"})).await;
    g.api.wait_state(own, Some(&g.admin), &["waiting"]).await;
    sign_out(&b).await;
    sign_in(&b, &g.admin).await;
    b.until_text(&format!("#overview tr[data-deployment='{own}']"), "You asked for it").await;
    assert_eq!(b.count(&format!("[data-key='approve/{own}']")).await, 0, "the requester gets no Approve button, whatever its role");
    let (s, e) = g.api.call("POST", &format!("/api/v1/deployments/{own}/approve"), Some(&g.admin), None).await;
    assert_eq!(s, 403, "{e}");
    let (s, e) = g.api.call("POST", &format!("/api/v1/deployments/{own}/cancel"), Some(&g.admin), None).await;
    assert_eq!(s, 202, "{e}");
    let bobs = g.api.submit(Some(&g.bob), json!({"kind": "deploy", "service": "web", "version": "1.0", "environment": "production"})).await;
    g.api.wait_state(bobs, Some(&g.admin), &["waiting"]).await;
    b.until("root's Approve button on bob's deployment", &format!("return document.querySelector(\"[data-key='approve/{bobs}']\")")).await;
    let (s, e) = g.api.call("POST", &format!("/api/v1/deployments/{bobs}/cancel"), Some(&g.admin), None).await;
    assert_eq!(s, 202, "{e}");
    sign_out(&b).await;
    sign_in(&b, &g.alice).await;

    // The buttons follow the API's rules, and the API's answer is shown:
    // carol approves first, then alice's click is refused by the API.
    let other = g.api.submit(Some(&g.bob), json!({"kind": "deploy", "service": "web", "version": "1.0", "environment": "production"})).await;
    g.api.wait_state(other, Some(&g.admin), &["waiting"]).await;
    b.goto(&format!("{}/#/deployments/{other}", g.server.url)).await;
    b.until("the Approve button", &format!("return document.querySelector(\"[data-key='approve/{other}']\")")).await;
    // Carol approves while alice's confirmation dialog is open.
    b.click(&format!("[data-key='approve/{other}']")).await;
    b.until("the confirmation dialog", "return document.getElementById('confirm').open").await;
    let (s, e) = g.api.call("POST", &format!("/api/v1/deployments/{other}/approve"), Some(&g.carol), None).await;
    assert_eq!(s, 200, "{e}");
    confirm(&b).await;
    let said = b.until_text("#status-msg.error", "refused").await;
    // The API's own words: approved already, or (once the gate loop has
    // moved it on) no longer waiting for an approval.
    assert!(said.contains("already approved by token carol") || said.contains("not waiting for an approval"), "{said}");

    // The audit log, filtered by environment and actor.
    b.goto(&format!("{}/#/audit?environment=production&actor=token%20alice", g.server.url)).await;
    let audit = b.until_text("#audit table", &format!("approve deployment {promoted}")).await;
    assert!(audit.contains(&format!("/deployments/{other}/approve")) && audit.contains("409"), "the refused approval is audited too: {audit}");
    let actors = b
        .js(
            "return [...new Set([...document.querySelectorAll('#audit tbody tr')].map(tr => tr.cells[1].textContent + ' in ' + tr.cells[2].textContent))]",
            vec![],
        )
        .await;
    assert_eq!(actors, json!(["token alice in production"]), "{audit}");
    b.screenshot("audit").await;
    b.type_into("#audit-actor", "token carol").await;
    b.click("#main form button[type=submit]").await;
    b.until_text("#audit tbody td", "token carol").await;
    let actors = b.js("return [...new Set([...document.querySelectorAll('#audit tbody tr')].map(tr => tr.cells[1].textContent))]", vec![]).await;
    assert_eq!(actors, json!(["token carol"]));
    b.js("document.getElementById('audit-environment').value = 'staging'", vec![]).await;
    b.click("#main form button[type=submit]").await;
    b.until_text("#audit", "No entry matches").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue17_rollback_promote_and_cancel_from_the_dashboard() {
    let g = gated().await;
    let b = Browser::start(1280, 900).await;
    b.goto(&format!("{}/", g.server.url)).await;
    sign_in(&b, &g.bob).await;

    // Rollback: staging runs 1.1 and goes back to 1.0.
    b.until_text("#overview tr[data-service='staging/web']", "1.1").await;
    b.click("[data-key='rollback/staging/web']").await;
    confirm(&b).await;
    let said = b.until_text("#status-msg", "Rollback of web in staging: deployment #").await;
    let id: i64 = said.rsplit('#').next().and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("a deployment id in {said:?}"));
    g.api.wait_state(id, Some(&g.admin), &["succeeded"]).await;
    b.until_text("#overview tr[data-service='staging/web'] strong", "1.0").await;

    // Promote: web has not run in production; the button is on its row
    // there, and the promotion waits for an approval.
    b.click("[data-key='promote/production/web']").await;
    confirm(&b).await;
    let said = b.until_text("#status-msg", "Promotion of web to production: deployment #").await;
    let id: i64 = said.rsplit('#').next().and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("a deployment id in {said:?}"));
    let d = g.api.wait_state(id, Some(&g.admin), &["waiting"]).await;
    assert_eq!(d["version"], "1.0", "staging runs 1.0 since the rollback");

    // Cancel it; a dialog dismissed first changes nothing.
    b.click(&format!("[data-key='cancel/{id}']")).await;
    b.until("the confirmation dialog", "return document.getElementById('confirm').open").await;
    b.click("#confirm-no").await;
    b.until("the dialog closed", "return !document.getElementById('confirm').open").await;
    b.click(&format!("[data-key='cancel/{id}']")).await;
    confirm(&b).await;
    b.until_text("#status-msg", &format!("Deployment #{id} is cancelled")).await;
    g.api.wait_state(id, Some(&g.admin), &["cancelled"]).await;

    // Each action is in the audit log as the CLI's are.
    let (_, log) = g.api.call("GET", "/api/v1/audit?actor=token%20bob&limit=20", Some(&g.admin), None).await;
    let log = log.to_string();
    for what in ["roll web back in staging", "promote web 1.0 from staging to production", &format!("cancel deployment {id}")] {
        assert!(log.contains(what), "{what} not in the audit log: {log}");
    }
    // Once: the dismissed dialog sent nothing.
    assert_eq!(log.matches(&format!("cancel deployment {id}")).count(), 1, "{log}");

    // Why, for a service in an environment.
    b.goto(&format!("{}/#/why/staging/web", g.server.url)).await;
    b.until_text("#why", "1.0").await;
    b.until_text("#why .verdict", "").await;
    b.screenshot("why").await;
    b.close().await;
}

/// Jobs for the live graph: `wait` prints, waits for a file, prints again;
/// `secretive` prints a secret (masked); `last` needs both.
fn live_config(go: &Path) -> String {
    format!(
        r#"
[[job]]
name = "first"
command = ["sh", "-c", "echo compiling; sleep 0.3"]

[[job]]
name = "wait"
needs = ["first"]
command = ["sh", "-c", "echo waiting for the go; while [ ! -e {go} ]; do sleep 0.1; done; echo got the go"]

[[job]]
name = "secretive"
needs = ["first"]
secrets = {{ API_KEY = "api" }}
command = ["sh", "-c", "echo the key is $API_KEY"]

[[job]]
name = "last"
needs = ["wait", "secretive"]
command = ["sh", "-c", "echo done >&2"]

[secret.api]
env = "DASHBOARD_TEST_SECRET"
"#,
        go = go.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue17_a_deployments_graph_and_log_change_live() {
    let scratch = tempfile::tempdir().expect("scratch");
    let go = scratch.path().join("go");
    let dir = common::config_dir(&live_config(&go), &[]);
    let secret = "s3cr3t-value-never-shown";
    let server = common::Server::start_with_env(dir.path(), Some(&store_url(scratch.path())), &["--poll", "100ms"], &[("DASHBOARD_TEST_SECRET", secret)]);
    let api = Api::new(&server.url);
    let id = api.submit(None, json!({"kind": "run", "jobs": ["last"]})).await;

    let b = Browser::start(1280, 900).await;
    // No token exists: the API is open, and the page says so.
    b.goto(&format!("{}/#/deployments/{id}", server.url)).await;
    b.until_text("#open-note", "the API is open").await;
    // Waves as columns: first | wait, secretive | last.
    b.until("four jobs drawn", "return document.querySelectorAll('svg.graph g.job').length === 4").await;
    let columns = b
        .js("return ['first','wait','secretive','last'].map(n => document.querySelector(`svg.graph g.job[data-job='${n}']`).getAttribute('transform'))", vec![])
        .await;
    let xs: Vec<String> =
        columns.as_array().expect("array").iter().map(|t| t.as_str().unwrap_or_default().split(',').next().unwrap_or_default().to_string()).collect();
    assert!(xs[1] == xs[2] && xs[0] != xs[1] && xs[3] != xs[1], "waves as columns: {xs:?}");
    assert_eq!(b.count("svg.graph path.edge").await, 4, "one edge per need");

    // Live: `wait` runs and its first line streams in while it runs.
    b.until("wait running", "return document.querySelector(\"svg.graph g.job[data-job='wait']\").classList.contains('s-running')").await;
    b.until_text("#log", "waiting for the go").await;
    assert!(!b.js("return document.getElementById('log').textContent", vec![]).await.as_str().unwrap_or_default().contains("got the go"));
    // The secret is masked in the log the browser reads.
    let line = b.until_text("#log div", "the key is").await;
    assert!(line.contains("[secret api]") && !line.contains(secret), "{line}");
    b.screenshot("deployment-running").await;
    std::fs::write(&go, b"").expect("go");
    b.until_text("#log", "got the go").await;
    b.until("last succeeded", "return document.querySelector(\"svg.graph g.job[data-job='last']\").classList.contains('s-succeeded')").await;
    b.until_text("#deployment-state", "succeeded").await;
    b.until_text("#log-note", "the log is complete").await;
    // The critical path runs through the job that waited.
    let path = b.until_text("#critical-path", "first → wait → last").await;
    assert!(path.starts_with("Critical path"), "{path}");
    let marked = b.js("return [...document.querySelectorAll('svg.graph g.job.critical')].map(g => g.dataset.job).sort()", vec![]).await;
    assert_eq!(marked, json!(["first", "last", "wait"]));
    assert_eq!(b.count("svg.graph path.edge.critical").await, 2);

    // A job's attempts, and its log alone.
    b.click("[data-key='job/last']").await;
    b.until_text("#job-panel", "Job last").await;
    b.until_text("#job-panel td", "succeeded").await;
    b.until_text("#log-title", "job last").await;
    b.until_text("#log .err", "done").await;
    assert!(!b.js("return document.getElementById('log').textContent", vec![]).await.as_str().unwrap_or_default().contains("compiling"), "only last's lines");
    b.screenshot("deployment").await;
    b.close().await;
}

/// A layered random graph of `n` jobs (width ≤ 50, 1–3 needs from the
/// three layers before), as the scheduler benchmark draws them, all after
/// a job `hold` that waits for the file `go`.
fn big_config(n: usize, go: &Path) -> String {
    let mut out = format!("[[job]]\nname = \"hold\"\ncommand = [\"sh\", \"-c\", \"while [ ! -e {} ]; do sleep 0.1; done\"]\n\n", go.display());
    let width = 50;
    let mut seed: u64 = 17;
    let mut next = |m: usize| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 33) as usize) % m
    };
    for i in 0..n {
        let layer = i / width;
        out.push_str(&format!("[[job]]\nname = \"j{i:04}\"\ncommand = [\"true\"]\n"));
        let mut needs: Vec<String> = if layer == 0 {
            vec!["\"hold\"".to_string()]
        } else {
            let lo = layer.saturating_sub(3) * width;
            let hi = layer * width;
            (0..1 + next(3)).map(|_| format!("\"j{:04}\"", lo + next(hi - lo))).collect()
        };
        needs.sort();
        needs.dedup();
        out.push_str(&format!("needs = [{}]\n\n", needs.join(", ")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue17_a_thousand_job_graph_renders_and_stays_responsive() {
    let n = 1000;
    let scratch = tempfile::tempdir().expect("scratch");
    let go = scratch.path().join("go");
    let dir = common::config_dir(&big_config(n, &go), &[]);
    let server = common::Server::start(dir.path(), Some(&store_url(scratch.path())), &["--poll", "100ms", "--parallelism", "8"]);
    let api = Api::new(&server.url);
    let names: Vec<String> = (0..n).map(|i| format!("j{i:04}")).collect();
    let id = api.submit(None, json!({"kind": "run", "jobs": names})).await;

    let b = Browser::start(1280, 900).await;
    b.goto(&format!("{}/#/deployments/{id}", server.url)).await;
    b.until("a thousand jobs drawn", &format!("return document.querySelectorAll('svg.graph g.job').length === {}", n + 1)).await;
    b.until("hold running", "return document.querySelector(\"svg.graph g.job[data-job='hold']\").classList.contains('s-running')").await;
    // Each poll touches only what changed: while `hold` runs (its tooltip
    // shows its growing duration) the other 1,000 nodes are left alone.
    b.js(
        "window.__touched = []; new MutationObserver(rs => rs.forEach(r => { const g = (r.target.nodeType === 1 ? r.target : r.target.parentElement).closest('g.job'); window.__touched.push(g ? g.dataset.job : '(edge or graph)'); })) \
         .observe(document.querySelector('svg.graph'), { subtree: true, attributes: true, childList: true, characterData: true });",
        vec![],
    )
    .await;
    b.until("two polls redrawing hold", "return window.__touched.filter(j => j === 'hold').length >= 2").await;
    let others = b.js("const o = [...new Set(window.__touched.filter(j => j !== 'hold'))]; return [o.length, o.slice(0, 5)]", vec![]).await;
    assert_eq!(others[0], json!(0), "nodes redrawn though nothing about them changed (how many, the first few): {others}");
    // The page answers: a job picked in the graph opens at once (a page
    // that hung would fail the driver's script timeout here).
    let opened = b
        .js(
            "document.querySelector(\"svg.graph g.job[data-job='j0999']\").dispatchEvent(new MouseEvent('click', {bubbles: true})); \
             return document.getElementById('job-panel').textContent.includes('Job j0999');",
            vec![],
        )
        .await;
    assert_eq!(opened, json!(true));
    std::fs::write(&go, b"").expect("go");
    api.wait_state(id, None, &["succeeded"]).await;
    b.until_text("#deployment-state", "succeeded").await;
    let done = b.js("return document.querySelectorAll('svg.graph g.job.s-succeeded').length", vec![]).await;
    assert_eq!(done, json!(n + 1), "every node coloured as its job ended");
    let path = b.until_text("#critical-path", "hold → j0").await;
    assert!(path.contains(" → "), "{path}");
    b.screenshot("deployment-1000-jobs").await;
    b.close().await;
}

/// Every page: usable at 375 px without the page scrolling sideways,
/// every control named and reachable with Tab, text in enough contrast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue17_every_page_works_at_375px_by_keyboard_with_enough_contrast() {
    let g = gated().await;
    let (s, a) = g.api.call("POST", "/api/v1/services/production/web/promote", Some(&g.bob), Some(json!({"from": "staging"}))).await;
    assert_eq!(s, 202, "{a}");
    let waiting = a["deployment_id"].as_i64().expect("id");
    g.api.wait_state(waiting, Some(&g.admin), &["waiting"]).await;

    let b = Browser::start(375, 800).await;
    assert_eq!(b.js("return window.innerWidth", vec![]).await, json!(375));
    let base = &g.server.url;
    b.goto(&format!("{base}/")).await;
    check_page(&b, "sign-in").await;
    sign_in(&b, &g.alice).await;
    let pages = [
        ("overview", "#/".to_string(), format!("[data-key='approve/{waiting}']")),
        ("deployments", "#/deployments".to_string(), "#main table".to_string()),
        ("deployment", format!("#/deployments/{waiting}"), format!("[data-key='approve/{waiting}']")),
        ("deployment-done", "#/deployments/1".to_string(), "#log div".to_string()),
        ("why", "#/why/staging/web".to_string(), "#why .verdict".to_string()),
        ("audit", "#/audit".to_string(), "#audit table".to_string()),
    ];
    for (name, hash, ready) in pages {
        b.goto(&format!("{base}/{hash}")).await;
        b.until(&format!("{name} to show {ready}"), &format!("return document.querySelector({})", json!(ready))).await;
        check_page(&b, name).await;
        if name == "overview" {
            b.screenshot("overview-375px").await;
        }
    }
    b.close().await;
}

/// The checks of one page (see the test above).
async fn check_page(b: &Browser, name: &str) {
    let (scroll, inner) = (b.js("return document.documentElement.scrollWidth", vec![]).await, b.js("return window.innerWidth", vec![]).await);
    assert!(scroll.as_u64() <= inner.as_u64(), "{name}: the page is {scroll} px wide in a {inner} px window");
    // Every control has a name a screen reader can say.
    let unnamed = b
        .js(
            "return [...document.querySelectorAll('button, a[href], input, select, textarea')].filter(e => e.offsetParent !== null || e.closest('dialog[open]')).filter(e => { \
               const label = e.getAttribute('aria-label') || (e.labels && e.labels[0] && e.labels[0].textContent) || e.textContent || e.title || ''; \
               return label.trim() === ''; }).map(e => e.outerHTML.slice(0, 120));",
            vec![],
        )
        .await;
    assert_eq!(unnamed, json!([]), "{name}: controls without a name");
    // Contrast of every visible text against its own background (WCAG AA:
    // 4.5:1, 3:1 for large text).
    let low = b.js(CONTRAST, vec![]).await;
    assert_eq!(low, json!([]), "{name}: text with too little contrast");
    // Tab from the top reaches every visible control, in order, and each
    // shows where focus is.
    let expected = b.js("window.__controls = [...document.querySelectorAll('button, a[href], input, select, [tabindex=\"0\"]')].filter(e => e.offsetParent !== null && !e.disabled); return window.__controls.length", vec![]).await.as_u64().unwrap_or(0);
    b.js("document.activeElement && document.activeElement.blur(); window.__reached = new Set(); document.addEventListener('focusin', e => window.__reached.add(e.target));", vec![]).await;
    use fantoccini::actions::{InputSource, KeyAction, KeyActions};
    for _ in 0..expected + 3 {
        let tab = KeyActions::new("keyboard".into()).then(KeyAction::Down { value: '\u{e004}' }).then(KeyAction::Up { value: '\u{e004}' });
        b.client.perform_actions(tab).await.expect("Tab");
    }
    let missed = b.js("return window.__controls.filter(e => !window.__reached.has(e)).map(e => e.outerHTML.slice(0, 120))", vec![]).await;
    assert_eq!(missed, json!([]), "{name}: controls Tab never reached (of {expected})");
}

/// The page's visible text whose contrast is below WCAG AA.
const CONTRAST: &str = r#"
const rgb = s => { const m = s.match(/rgba?\(([^)]+)\)/); if (!m) return null; const p = m[1].split(',').map(Number); return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 }; };
const lum = c => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); }; return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); };
const background = e => { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor); if (c && c.a > 0.5) return c; } return { r: 255, g: 255, b: 255, a: 1 }; };
const out = [];
const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let n = walk.nextNode(); n; n = walk.nextNode()) {
  const e = n.parentElement;
  if (!n.textContent.trim() || !e || e.closest('svg') || e.offsetParent === null) continue;
  const st = getComputedStyle(e);
  const fg = rgb(st.color), bg = background(e);
  const [hi, lo] = [lum(fg), lum(bg)].sort((a, b) => b - a);
  const ratio = (hi + 0.05) / (lo + 0.05);
  const size = parseFloat(st.fontSize), bold = Number(st.fontWeight) >= 700;
  const need = size >= 24 || (bold && size >= 18.66) ? 3 : 4.5;
  if (ratio < need) out.push(`${n.textContent.trim().slice(0, 40)}: ${ratio.toFixed(2)} (${st.color} on ${JSON.stringify(bg)})`);
}
return out;
"#;
