//! A real browser for the dashboard's tests: Debian's `chromium`, driven
//! through Debian's `chromedriver` (WebDriver) with fantoccini. Both are
//! installed by scripts/test.sh. Each [`Browser`] has its own chromedriver
//! on a free 127.0.0.1 port and its own profile directory; dropping it
//! kills the driver's whole process group (the browser with it).

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// The screenshots the README shows (docs/images/NAME.png).
pub const README_SHOTS: [&str; 2] = ["overview", "deployment"];

/// How long a test waits for something the page should show.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A headless Chromium `width` × `height` CSS pixels large.
    pub async fn start(width: u32, height: u32) -> Browser {
        Browser::start_with(width, height, &[]).await
    }

    /// [`Browser::start`] with more Chromium flags.
    pub async fn start_with(width: u32, height: u32, flags: &[String]) -> Browser {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
            "the dashboard's tests need Debian's chromium and chromium-driver: scripts/test.sh installs them"
        );
        let port = crate::common::free_port();
        let profile = tempfile::tempdir().expect("profile dir");
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}")).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        // Its own process group: the browser it starts goes with it.
        cmd.process_group(0);
        let driver = cmd.spawn().expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "chromedriver did not listen on {url}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ]
        .map(String::from)
        .into();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        args.push(format!("--window-size={width},{height}"));
        args.extend(flags.iter().cloned());
        caps.insert("goog:chromeOptions".into(), json!({ "binary": CHROMIUM, "args": args }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(Duration::from_secs(60), ClientBuilder::new(connector).capabilities(caps).connect(&url))
            .await
            .expect("a browser session within 60 s")
            .expect("a browser session");
        let b = Browser { client, driver, _profile: profile };
        b.resize(width, height).await;
        b
    }

    /// Make the page's viewport `width` CSS pixels wide: the window is
    /// resized until its inner width is exactly that.
    pub async fn resize(&self, width: u32, height: u32) {
        self.client.set_window_size(width, height).await.expect("resize");
        let inner = self.js("return window.innerWidth", vec![]).await.as_u64().unwrap_or(0) as u32;
        if inner != width && inner > 0 {
            self.client.set_window_size(width + (width.saturating_sub(inner)), height).await.expect("resize");
        }
    }

    pub async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client.execute(script, args).await.unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Wait until `script` (a function body) returns something truthy;
    /// return it. On timeout, fail with `what` and the page's text.
    pub async fn until(&self, what: &str, script: &str) -> Value {
        let start = Instant::now();
        loop {
            let v = self.js(script, vec![]).await;
            let truthy = !matches!(v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return v;
            }
            if start.elapsed() > WAIT {
                let text = self.js("return document.body.innerText", vec![]).await;
                panic!("waited {WAIT:?} for {what}; the page says:\n{}", text.as_str().unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until an element matching `css` is on the page and holds
    /// `text` (empty: any).
    pub async fn until_text(&self, css: &str, text: &str) -> String {
        let script = format!(
            "const els = [...document.querySelectorAll({css})]; const t = {text}; const e = els.find(e => e.textContent.includes(t)); return e ? e.textContent : null;",
            css = json!(css),
            text = json!(text)
        );
        self.until(&format!("{css} holding {text:?}"), &script).await.as_str().unwrap_or_default().to_string()
    }

    pub async fn click(&self, css: &str) {
        let e = self.client.wait().at_most(WAIT).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("find {css}: {e}"));
        e.click().await.unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.client.wait().at_most(WAIT).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("find {css}: {e}"));
        e.clear().await.unwrap_or_else(|e| panic!("clear {css}: {e}"));
        e.send_keys(text).await.unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> usize {
        self.js(&format!("return document.querySelectorAll({}).length", json!(css)), vec![]).await.as_u64().unwrap_or(0) as usize
    }

    /// Save what the browser shows as `<target>/ui-screenshots/<name>.png`
    /// (CI keeps them as build artifacts); with
    /// `SLIPWAY_UPDATE_SCREENSHOTS=1` the README's ([`README_SHOTS`]) also
    /// as `docs/images/<name>.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), &png).expect("save screenshot");
        if README_SHOTS.contains(&name) && std::env::var("SLIPWAY_UPDATE_SCREENSHOTS").is_ok_and(|v| v == "1") {
            let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/images");
            std::fs::create_dir_all(&docs).expect("docs/images");
            std::fs::write(docs.join(format!("{name}.png")), &png).expect("save screenshot in docs");
        }
    }

    /// End the session (the browser quits), then the driver.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(20), self.client.clone().close()).await;
    }
}

pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("ui-screenshots")
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects; the group is the driver's own.
        unsafe {
            libc::kill(-(self.driver.id() as i32), libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}
