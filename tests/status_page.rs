//! The status page in a real browser: Debian's headless Chromium, driven through
//! chromedriver (WebDriver) by fantoccini, against the real balancer and real backends.
//! What is checked is what an operator sees: the rendered rows, their colour, and what the
//! page's buttons and forms do to the admin API.
//!
//! Needs `chromium` and `chromedriver` on the PATH (Debian: `apt-get install chromium
//! chromium-driver`; `scripts/test` installs them). Without them the tests fail, by design.

mod common;

use std::{
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

/// How often the page refreshes itself (the page's REFRESH_MS).
const REFRESH: Duration = Duration::from_secs(2);

/// The background of a row whose server is down (the page's `--down-bg`).
const DOWN_BACKGROUND: &str = "rgb(253, 232, 232)";

/// A headless Chromium of the test's own, with a fresh profile, behind its own
/// chromedriver on a free port. Both are killed on drop (their process group).
struct Browser {
    driver: Child,
    client: Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A desktop window.
    async fn desktop() -> Browser {
        Self::start(json!({ "args": ["--window-size=1100,800"] })).await
    }

    /// A phone's screen, 375 by 812 CSS pixels (a desktop window cannot be made that
    /// narrow: Chromium's narrowest is 500).
    async fn phone() -> Browser {
        Self::start(json!({
            "args": [],
            "mobileEmulation": { "deviceMetrics": { "width": 375, "height": 812, "pixelRatio": 2.0 } },
        }))
        .await
    }

    /// Starts chromedriver and a browser with `options` added to `goog:chromeOptions`.
    async fn start(mut options: Value) -> Browser {
        let port = free_port();
        // Its own process group, so that Drop can end the browser it starts as well.
        let mut driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver is installed (Debian: chromium-driver; scripts/test installs it)",
            );
        let up = eventually(Duration::from_secs(20), async || {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        if !up {
            let _ = driver.kill();
            panic!("chromedriver did not listen on {port}");
        }
        let profile = tempfile::tempdir().unwrap();
        // The flags that keep Chromium off the network here (no sandbox: tests run as root).
        let mut args = vec!["--headless".to_string()];
        for flag in [
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ] {
            args.push(flag.to_string());
        }
        args.push(format!("--user-data-dir={}", profile.path().display()));
        for extra in options["args"].as_array().unwrap() {
            args.push(extra.as_str().unwrap().to_string());
        }
        options["args"] = json!(args);
        options["binary"] = json!(chromium());
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": options,
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("chromedriver starts chromium");
        Browser {
            driver,
            client,
            _profile: profile,
        }
    }

    /// `[(host:port, state word, row background)]` as rendered now.
    async fn rows(&self) -> Vec<(String, String, String)> {
        let rows = self
            .client
            .execute(
                "return [...document.querySelectorAll('#servers tbody tr[data-server]')].map(tr =>
                   [tr.dataset.server, tr.querySelector('.badge').textContent,
                    getComputedStyle(tr).backgroundColor]);",
                vec![],
            )
            .await
            .unwrap();
        serde_json::from_value(rows).unwrap()
    }

    /// The rendered state word of `server`'s row, if it has one.
    async fn state_of(&self, server: &str) -> Option<String> {
        self.rows()
            .await
            .into_iter()
            .find(|r| r.0 == server)
            .map(|r| r.1)
    }

    async fn visible(&self, id: &str) -> bool {
        self.client
            .find(Locator::Id(id))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
    }

    /// Types `token` into the login form and submits it.
    async fn sign_in(&self, token: &str) {
        let field = self.client.find(Locator::Id("token")).await.unwrap();
        field.send_keys(token).await.unwrap();
        self.client
            .find(Locator::Css("#login button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    /// The page's script errors and everything it logged at error level, but failed
    /// requests (a 401 before the token is given is expected).
    async fn errors(&self) -> Vec<String> {
        let log = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("chromedriver keeps the browser log");
        log.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["level"] == "SEVERE" && e["source"] != "network")
            .map(|e| e["message"].to_string())
            .collect()
    }

    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of a child this test spawned.
        unsafe { libc::kill(-(self.driver.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

/// Debian's `chromium`, where chromedriver expects Google's Chrome.
fn chromium() -> String {
    let out = Command::new("sh")
        .args(["-c", "command -v chromium"])
        .output()
        .unwrap();
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        !path.is_empty(),
        "chromium is installed (Debian: chromium; scripts/test installs it)"
    );
    path
}

/// chromedriver's `POST /session/{id}/se/log`: the browser's console and errors so far.
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

async fn admin_servers(lb: &roundabout::Running, token: Option<&str>) -> Vec<Value> {
    let mut req = client().get(format!("http://{}/servers", lb.admin_addr.unwrap()));
    if let Some(t) = token {
        req = req.insert_header(("authorization", format!("Bearer {t}")));
    }
    let mut res = req.send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    serde_json::from_slice(&res.body().await.unwrap()).unwrap()
}

fn label(b: &Backend) -> String {
    b.addr.to_string()
}

#[actix_rt::test]
async fn the_page_shows_three_servers_up_turns_a_dead_one_red_and_drains_one_by_a_click() {
    let (a, b, c) = Backend::abc();
    let lb = balancer(&urls(&[&a, &b, &c]), "");
    let browser = Browser::desktop().await;
    browser
        .client
        .goto(&format!("http://{}/", lb.admin_addr.unwrap()))
        .await
        .unwrap();

    let all_up = eventually(Duration::from_secs(5), async || {
        let rows = browser.rows().await;
        rows.len() == 3 && rows.iter().all(|r| r.1 == "up")
    })
    .await;
    assert!(all_up, "three rows, all up: {:?}", browser.rows().await);
    let shown: Vec<String> = browser.rows().await.into_iter().map(|r| r.0).collect();
    assert_eq!(shown, [label(&a), label(&b), label(&c)]);

    // Two failed checks 200 ms apart (each up to 150 ms) take it out; the page shows it at
    // its next refresh.
    a.stop().await;
    let stopped = Instant::now();
    let within = Duration::from_millis(2 * 200 + 150) + REFRESH + Duration::from_millis(1500);
    let down = eventually(within, async || {
        browser.state_of(&label(&a)).await.as_deref() == Some("down")
    })
    .await;
    assert!(
        down,
        "a's row says down within {within:?}: {:?}",
        browser.rows().await
    );
    let rows = browser.rows().await;
    assert_eq!(rows[0].2, DOWN_BACKGROUND, "a dead server's row is red");
    assert_ne!(rows[1].2, DOWN_BACKGROUND, "a live one's is not");
    assert_eq!((rows[1].1.as_str(), rows[2].1.as_str()), ("up", "up"));
    eprintln!("down on the page {:?} after the stop", stopped.elapsed());

    // A request held in flight on b or c, so that the drained server visibly drains.
    let proxy = format!("http://{}/slow/3000", lb.proxy_addr);
    let slow = actix_rt::spawn(async move { get(&proxy).await });
    assert!(
        eventually(Duration::from_secs(3), async || b.hits() + c.hits() == 1).await,
        "the slow request reached b or c"
    );
    let busy = if b.hits() == 1 { label(&b) } else { label(&c) };

    let row = browser
        .client
        .find(Locator::Css(&format!(
            "tr[data-server='{busy}'] button.drain"
        )))
        .await
        .unwrap();
    row.click().await.unwrap();
    let question = browser.client.get_alert_text().await.unwrap();
    assert!(
        question.contains(&busy),
        "the confirmation names it: {question}"
    );
    browser.client.accept_alert().await.unwrap();

    let draining = eventually(Duration::from_secs(3), async || {
        admin_servers(&lb, None)
            .await
            .iter()
            .any(|s| s["url"] == format!("http://{busy}") && s["draining"] == true)
    })
    .await;
    assert!(draining, "GET /servers shows {busy} draining");
    let shown = eventually(REFRESH + Duration::from_secs(1), async || {
        browser.state_of(&busy).await.as_deref() == Some("draining")
    })
    .await;
    assert!(shown, "its row says draining: {:?}", browser.rows().await);

    // Its last request done, it leaves GET /servers and the page.
    let (status, _) = slow.await.unwrap();
    assert_eq!(status, 200);
    let gone = eventually(REFRESH + Duration::from_secs(2), async || {
        let listed = admin_servers(&lb, None).await;
        !listed.iter().any(|s| s["url"] == format!("http://{busy}"))
            && browser.state_of(&busy).await.is_none()
    })
    .await;
    assert!(gone, "{busy} gone from GET /servers and the page");

    assert_eq!(browser.errors().await, Vec::<String>::new());
    browser.close().await;
}

#[actix_rt::test]
async fn on_a_phone_with_a_token_the_page_asks_for_it_once_and_adds_a_server() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = balancer(
        &[a.url()],
        "[admin]\naddress = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n",
    );
    let page = format!("http://{}/", lb.admin_addr.unwrap());
    let browser = Browser::phone().await;
    browser.client.goto(&page).await.unwrap();

    // No data without the token: the page asks for it.
    assert!(
        eventually(Duration::from_secs(5), async || browser
            .visible("login")
            .await)
        .await,
        "the page asks for the token"
    );
    assert!(browser.rows().await.is_empty());

    browser.sign_in("wrong").await;
    let refused = eventually(Duration::from_secs(3), async || {
        browser.visible("login").await
            && browser
                .client
                .find(Locator::Id("message"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                .contains("refused")
    })
    .await;
    assert!(refused, "a wrong token is refused and asked again");

    browser.sign_in("s3cret").await;
    let shown = eventually(Duration::from_secs(3), async || {
        browser.rows().await.len() == 1
    })
    .await;
    assert!(shown, "the right token shows the servers");

    // Kept for the tab: a reload does not ask again.
    browser.client.refresh().await.unwrap();
    let shown = eventually(Duration::from_secs(3), async || {
        browser.rows().await.len() == 1
    })
    .await;
    assert!(shown && !browser.visible("login").await, "not asked twice");

    // Add b from the form; the admin API has it, and the page shows it up once checked.
    let url = browser.client.find(Locator::Id("add-url")).await.unwrap();
    url.send_keys(&b.url()).await.unwrap();
    let weight = browser
        .client
        .find(Locator::Id("add-weight"))
        .await
        .unwrap();
    weight.clear().await.unwrap();
    weight.send_keys("3").await.unwrap();
    browser
        .client
        .find(Locator::Css("#add button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let added = eventually(Duration::from_secs(3), async || {
        admin_servers(&lb, Some("s3cret"))
            .await
            .iter()
            .any(|s| s["url"] == b.url() && s["weight"] == 3)
    })
    .await;
    assert!(added, "GET /servers has b with weight 3");
    let up = eventually(REFRESH + Duration::from_secs(2), async || {
        browser.state_of(&label(&b)).await.as_deref() == Some("up")
    })
    .await;
    assert!(up, "b's row comes up: {:?}", browser.rows().await);

    // Usable at 375 px: nothing wider than the screen.
    let fits = browser
        .client
        .execute(
            "return [window.innerWidth, document.documentElement.scrollWidth];",
            vec![],
        )
        .await
        .unwrap();
    let (inner, scroll): (u64, u64) = serde_json::from_value(fits).unwrap();
    assert!(inner <= 400, "a phone-sized window: {inner}px");
    assert!(
        scroll <= inner,
        "no sideways scrolling: {scroll}px in {inner}px"
    );

    assert_eq!(browser.errors().await, Vec::<String>::new());
    browser.close().await;
}

#[actix_rt::test]
async fn rows_are_grouped_by_pool_under_its_name_and_a_server_joins_the_pool_chosen() {
    let (a, b, c) = Backend::abc();
    let extra = format!(
        "[pools.api]\nstrategy = \"least_requests\"\nservers = [\"{}\", \"{}\"]\n\
         [[routes]]\nhost = \"api.test\"\npool = \"api\"\n",
        a.url(),
        b.url()
    );
    let lb = balancer(&[a.url()], &extra);
    let browser = Browser::desktop().await;
    let admin = lb.admin_addr.unwrap();
    browser
        .client
        .goto(&format!("http://{admin}/"))
        .await
        .unwrap();
    // [(pool, server or "" for the pool's own row, text)] in page order.
    let table = async || -> Vec<(String, String, String)> {
        let rows = browser
            .client
            .execute(
                "return [...document.querySelectorAll('#servers tbody tr')].map(tr =>
                   [tr.dataset.pool || '', tr.dataset.server || '', tr.textContent]);",
                vec![],
            )
            .await
            .unwrap();
        serde_json::from_value(rows).unwrap()
    };
    let grouped = eventually(Duration::from_secs(5), async || {
        let t = table().await;
        t.len() == 5 && t.iter().filter(|r| r.1.is_empty()).count() == 2
    })
    .await;
    assert!(grouped, "{:?}", table().await);
    let t = table().await;
    let order: Vec<(&str, &str)> = t.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    let (la, lb_) = (label(&a), label(&b));
    assert_eq!(
        order,
        [
            ("default", ""),
            ("default", la.as_str()),
            ("api", ""),
            ("api", la.as_str()),
            ("api", lb_.as_str())
        ]
    );
    assert!(
        t[2].2.contains("pool api") && t[2].2.contains("least requests"),
        "{:?}",
        t[2]
    );

    // Add c to the api pool from the form.
    browser
        .client
        .find(Locator::Id("add-url"))
        .await
        .unwrap()
        .send_keys(&c.url())
        .await
        .unwrap();
    browser
        .client
        .execute("document.getElementById('add-pool').value = 'api';", vec![])
        .await
        .unwrap();
    browser
        .client
        .find(Locator::Css("#add button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let joined = eventually(Duration::from_secs(5), async || {
        let t = table().await;
        t.iter().any(|r| r.0 == "api" && r.1 == label(&c))
            && !t.iter().any(|r| r.0 == "default" && r.1 == label(&c))
    })
    .await;
    assert!(joined, "c is in the api pool only: {:?}", table().await);
    assert_eq!(browser.errors().await, Vec::<String>::new());
    browser.close().await;
}
