//! A real headless Chromium for the console test, driven through chromedriver with
//! fantoccini (WebDriver). Both come from Debian (`scripts/install-deps` installs
//! `chromium` and `chromium-driver`); nothing is downloaded. Every wait is bounded, and
//! a wait that times out saves a screenshot of what the page showed.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use charter_tests::{free_port, http};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Map};
use tempfile::TempDir;

/// How long a wait for something on the page may take.
const WAIT: Duration = Duration::from_secs(20);

/// The first of `candidates` that exists, or the path in `variable` when it is set.
fn find(variable: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Some(PathBuf::from(path));
    }
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
}

/// A Chromium session; chromedriver (and the browser it started) are killed when dropped.
pub struct Browser {
    pub client: Client,
    /// Held for its `Drop`: chromedriver and the browser end with this value.
    _driver: DriverGuard,
    screenshots: PathBuf,
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and opens a headless Chromium session.
    /// Panics with what to install when either is missing: the test is never skipped.
    pub async fn start(screenshots: &Path) -> Browser {
        let chromium = find(
            "CHARTER_CHROMIUM",
            &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
        )
        .expect(
            "chromium is missing: run scripts/install-deps (as root it installs Debian's \
             chromium and chromium-driver), or set CHARTER_CHROMIUM to the browser",
        );
        let chromedriver = find(
            "CHARTER_CHROMEDRIVER",
            &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"],
        )
        .expect(
            "chromedriver is missing: run scripts/install-deps (Debian's chromium-driver), \
             or set CHARTER_CHROMEDRIVER",
        );
        let profile = TempDir::new().expect("temp dir for the browser profile");
        let port = free_port();
        let log = fs::File::create(profile.path().join("chromedriver.log")).expect("driver log");
        // A home of its own: Chromium (and Debian's crash handler, which leaves with it)
        // writes its config, cache and crash database under it, not in the user's.
        let home = profile.path().join("home");
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("driver log"))
            .stderr(log)
            // Its own process group, so dropping the browser kills chromedriver and every
            // Chromium process it started, even when a failing test never closes the session.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromedriver.display()));
        let guard = DriverGuard(Some(driver));
        let driver_url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + WAIT;
        while http("GET", &format!("{driver_url}/status"), None).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let user_data_dir = profile.path().join("profile");
        let args = vec![
            "--headless=new".to_owned(),
            // Chromium refuses to start as root with its sandbox on, and CI runs as root.
            // The browser only ever loads this test's own pages on loopback.
            "--no-sandbox".to_owned(),
            // Containers often give /dev/shm a few MiB; Chromium then crashes tabs.
            "--disable-dev-shm-usage".to_owned(),
            format!("--user-data-dir={}", user_data_dir.display()),
            "--window-size=1280,960".to_owned(),
            // No calls home: the machine has no network but loopback.
            "--no-first-run".to_owned(),
            "--no-default-browser-check".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-extensions".to_owned(),
            "--disable-gpu".to_owned(),
        ];
        let mut capabilities = Map::new();
        capabilities.insert("browserName".into(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium.to_string_lossy(), "args": args}),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&driver_url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "opening a Chromium session through chromedriver: {e}\nchromedriver log:\n{}",
                    fs::read_to_string(profile.path().join("chromedriver.log")).unwrap_or_default()
                )
            });
        fs::create_dir_all(screenshots).expect("creating the screenshots directory");
        Browser {
            client,
            _driver: guard,
            screenshots: screenshots.to_path_buf(),
            _profile: profile,
        }
    }

    /// Opens a URL.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// The text a person sees in the first element matching `css` (none when hidden), or
    /// `None` when there is no such element (yet).
    pub async fn text(&self, css: &str) -> Option<String> {
        let element = self.client.find(Locator::Css(css)).await.ok()?;
        element.text().await.ok()
    }

    /// How many elements match `css`.
    pub async fn count(&self, css: &str) -> usize {
        self.client
            .find_all(Locator::Css(css))
            .await
            .map_or(0, |all| all.len())
    }

    /// Whether the first element matching `css` is displayed.
    pub async fn displayed(&self, css: &str) -> bool {
        match self.client.find(Locator::Css(css)).await {
            Ok(element) => element.is_displayed().await.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Whether the first element matching `css` can be used (is not disabled).
    pub async fn enabled(&self, css: &str) -> bool {
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        element
            .is_enabled()
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
    }

    /// Waits until the text of `css` satisfies `check`, and returns it.
    pub async fn wait_text(&self, css: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text(css).await;
            if let Some(text) = text.as_deref().filter(|t| check(t)) {
                return text.to_owned();
            }
            if Instant::now() > deadline {
                self.fail(&format!("{what}: `{css}` shows {text:?}")).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `css` shows exactly `expected`.
    pub async fn wait_for(&self, css: &str, expected: &str) -> String {
        self.wait_text(css, &format!("{expected:?}"), |t| t == expected)
            .await
    }

    /// Waits until `check` holds for how many elements match `css`; returns the count.
    pub async fn wait_count(&self, css: &str, what: &str, check: impl Fn(usize) -> bool) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            let count = self.count(css).await;
            if check(count) {
                return count;
            }
            if Instant::now() > deadline {
                self.fail(&format!("{what}: {count} elements match `{css}`"))
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `css` is displayed.
    pub async fn wait_displayed(&self, css: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.displayed(css).await {
            if Instant::now() > deadline {
                self.fail(&format!("`{css}` is not displayed")).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the first element matching `css`, once it is there and can be clicked.
    pub async fn click(&self, css: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let clicked = match self.client.find(Locator::Css(css)).await {
                Ok(element) => element.click().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match clicked {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    self.fail(&format!("clicking `{css}`: {e}")).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Replaces the value of a text field (or chooses a file, for a file input) by typing.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        if element.attr("type").await.ok().flatten().as_deref() != Some("file") {
            element
                .clear()
                .await
                .unwrap_or_else(|e| panic!("clearing {css}: {e}"));
        }
        element
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    /// Scrolls the first element matching `css` to the top of the window.
    pub async fn scroll_to(&self, css: &str) {
        self.client
            .execute(
                "document.querySelector(arguments[0]).scrollIntoView({block: 'start'})",
                vec![json!(css)],
            )
            .await
            .unwrap_or_else(|e| panic!("scrolling to {css}: {e}"));
    }

    /// Saves a PNG of the window as `NAME.png` in the screenshots directory.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .client
            .screenshot()
            .await
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let path = self.screenshots.join(format!("{name}.png"));
        fs::write(&path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// Panics with `what`, after saving what the page shows as `failure.png`.
    async fn fail(&self, what: &str) {
        let saved = match self.client.screenshot().await {
            Ok(png) => {
                let path = self.screenshots.join("failure.png");
                let _ = fs::write(&path, png);
                format!("the page is in {}", path.display())
            }
            Err(e) => format!("no screenshot: {e}"),
        };
        panic!("timed out after {WAIT:?} waiting for {what} ({saved})");
    }

    /// Ends the session (Chromium quits), then chromedriver (when the browser is dropped).
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

/// chromedriver, killed with its process group when dropped (with the browser, or when the
/// session never opens).
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            kill_group(&mut child);
        }
    }
}

/// SIGKILL to the process group led by `child` (chromedriver and the browser it started),
/// then reaps it. The group goes first: until the leader is reaped its id cannot be reused,
/// so the signal reaches only processes this test started.
fn kill_group(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}
