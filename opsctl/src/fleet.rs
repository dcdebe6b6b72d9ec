//! The read side of `opsctl`: what any meta node answers, as tables (or `--json`, the server's
//! own JSON unchanged, for scripts).

use ops_config::clock::unix_now;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use crate::Failure;

/// Where to ask: any meta node (`--server`, else `OPS_SERVER`, else the default listen
/// address), and with which CA for `https://`.
pub struct Server {
    base: String,
    client: reqwest::blocking::Client,
}

impl Server {
    pub fn new(server: Option<&str>, ca_file: Option<&std::path::Path>, timeout: Duration) -> Result<Server, Failure> {
        let server = server.map(str::to_owned).or_else(|| std::env::var("OPS_SERVER").ok()).unwrap_or_else(|| "127.0.0.1:2000".into());
        let base = if server.starts_with("http://") || server.starts_with("https://") {
            server.trim_end_matches('/').to_owned()
        } else {
            format!("http://{server}")
        };
        let mut builder = reqwest::blocking::Client::builder().no_proxy().timeout(timeout);
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| Failure::Usage(format!("HTTP client: {e}")))?;
        Ok(Server { base, client })
    }

    /// `GET {base}{path}` as JSON. A server that does not answer is `Unavailable`; one that
    /// answers an error is `Refused` with its `errorMessage`.
    pub fn get(&self, path: &str) -> Result<Value, Failure> {
        self.get_url(&format!("{}{path}", self.base))
    }

    /// `GET {base}{path}`: the body and the `x-ops-signature` header (the config as served).
    pub fn get_signed(&self, path: &str) -> Result<(String, Option<String>), Failure> {
        let url = format!("{}{path}", self.base);
        let r = self.client.get(&url).send().map_err(|e| Failure::Unavailable(format!("GET {url}: {}", ops_config::causes(&e))))?;
        if !r.status().is_success() {
            return Err(Failure::Refused(format!("GET {url}: HTTP {}", r.status().as_u16())));
        }
        let sig = r.headers().get(ops_config::trust::SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = r.text().map_err(|e| Failure::Unavailable(format!("GET {url}: {e}")))?;
        Ok((text, sig))
    }

    /// `POST {base}{path}` with `body` (and a signature header), the cluster token when given.
    /// Returns the JSON answered with its status code; no answer is `Unavailable`.
    pub fn post(&self, path: &str, body: String, sig: Option<&str>, token: Option<&str>) -> Result<(u16, Value), Failure> {
        let url = format!("{}{path}", self.base);
        let mut req = self.client.post(&url).body(body);
        if let Some(sig) = sig {
            req = req.header(ops_config::trust::SIGNATURE_HEADER, sig);
        }
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let r = req.send().map_err(|e| Failure::Unavailable(format!("POST {url}: {}", ops_config::causes(&e))))?;
        let status = r.status().as_u16();
        let text = r.text().map_err(|e| Failure::Unavailable(format!("POST {url}: {e}")))?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    fn get_url(&self, url: &str) -> Result<Value, Failure> {
        let text = self.fetch(url)?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// `GET {base}{path}` as text (the tab-separated listing).
    pub fn get_text(&self, path: &str) -> Result<String, Failure> {
        self.fetch(&format!("{}{path}", self.base))
    }

    /// The body of `GET url`; an error status is `Refused` with the server's `errorMessage`
    /// (or its text), no answer `Unavailable`.
    fn fetch(&self, url: &str) -> Result<String, Failure> {
        let r = self.client.get(url).send().map_err(|e| Failure::Unavailable(format!("GET {url}: {}", ops_config::causes(&e))))?;
        let status = r.status();
        let text = r.text().map_err(|e| Failure::Unavailable(format!("GET {url}: {e}")))?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["errorMessage"].as_str().map(str::to_owned));
            let why = message.unwrap_or_else(|| text.trim().to_owned());
            return Err(Failure::Refused(format!("GET {url}: HTTP {}: {why}", status.as_u16())));
        }
        Ok(text)
    }
}

/// Percent-encodes a path segment or query value (agent names and versions are plain, but a
/// prefix may hold anything).
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn num(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Left-aligned columns, two spaces apart.
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(c, s)| format!("{s:<w$}", w = widths[c])).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

const STATES: [&str; 5] = ["ok", "upgrading", "error", "stale", "pinned"];

/// Did the answer come from every node? A partial one is said on stderr (and exits 1).
fn partial(v: &Value) -> Option<String> {
    (v["partial"] == true).then(|| {
        let missing: Vec<&str> = v["missingNodes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        format!("partial: no answer from {}; their hosts are missing", missing.join(", "))
    })
}

/// "relay dc2-1: 48,112 hosts silent since 12:03 UTC (all of its hosts)": one line per relay
/// with silent hosts, from the `relays` of one or more summaries (a host counted by two agents'
/// summaries counts once: the most any summary says). `now` is unix seconds.
pub fn silent_lines(summaries: &[Value], now: u64) -> Vec<String> {
    // relay → (silent, hosts, last heard)
    let mut by_relay: Vec<(String, u64, u64, u64)> = Vec::new();
    for r in summaries.iter().flat_map(|s| s["relays"].as_array().into_iter().flatten()) {
        let (relay, silent, hosts, last) =
            (r["relay"].as_str().unwrap_or("").to_owned(), n(&r["silent"]), n(&r["hosts"]), n(&r["lastHeard"]));
        if silent == 0 {
            continue;
        }
        match by_relay.iter_mut().find(|e| e.0 == relay) {
            Some(e) if silent > e.1 => *e = (relay, silent, hosts, last),
            Some(_) => {}
            None => by_relay.push((relay, silent, hosts, last)),
        }
    }
    by_relay.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    by_relay
        .into_iter()
        .map(|(relay, silent, hosts, last)| {
            let who = if relay.is_empty() { "no relay (straight to a meta node)".to_owned() } else { format!("relay {relay}") };
            let share = if silent == hosts { "all of its hosts".to_owned() } else { format!("of {} hosts", num(hosts)) };
            let (h, m) = (last % 86_400 / 3600, last % 3600 / 60);
            let ago = now.saturating_sub(last);
            let ago = if ago >= 3600 { format!("{} h {} min ago", ago / 3600, ago % 3600 / 60) } else { format!("{} min ago", ago / 60) };
            format!("{who}: {} hosts silent since {h:02}:{m:02} UTC, {ago} ({share})", num(silent))
        })
        .collect()
}

/// `opsctl status [AGENT]`: every agent's summary in one table, or one agent's groups.
pub fn status(s: &Server, agent: Option<&str>, json: bool) -> Result<Option<String>, Failure> {
    let Some(agent) = agent else {
        let agents = s.get("/status/agents")?;
        let names: Vec<String> =
            agents["agents"].as_array().into_iter().flatten().filter_map(|a| a["name"].as_str().map(str::to_owned)).collect();
        let summaries: Vec<Value> = names.iter().map(|a| s.get(&format!("/status/summary/{}", enc(a)))).collect::<Result<_, _>>()?;
        if json {
            println!("{}", Value::Array(summaries.clone()));
        } else {
            let mut rows = vec![["AGENT", "DESIRED", "HOSTS", "CONVERGED"].iter().chain(STATES.iter()).map(|h| h.to_uppercase()).collect()];
            for sum in &summaries {
                let desired: Vec<String> = sum["desired"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| format!("{} ({})", d["version"].as_str().unwrap_or(""), d["cmd"].as_str().unwrap_or("")))
                    .collect();
                let mut row = vec![
                    sum["agent"].as_str().unwrap_or("").to_owned(),
                    desired.join(", "),
                    num(n(&sum["hosts"])),
                    format!("{:.1} %", sum["convergedRatio"].as_f64().unwrap_or(1.0) * 100.0),
                ];
                row.extend(STATES.iter().map(|st| num(n(&sum["byState"][*st]))));
                rows.push(row);
            }
            print!("{}", table(&rows));
            for line in silent_lines(&summaries, unix_now()) {
                println!("{line}");
            }
        }
        return Ok(summaries.iter().find_map(partial));
    };
    let sum = s.get(&format!("/status/summary/{}", enc(agent)))?;
    if json {
        println!("{sum}");
    } else {
        println!(
            "{}: {} hosts, {} converged ({:.1} %)",
            agent,
            num(n(&sum["hosts"])),
            num(n(&sum["converged"])),
            sum["convergedRatio"].as_f64().unwrap_or(1.0) * 100.0
        );
        let states: Vec<String> = STATES.iter().map(|st| format!("{st} {}", num(n(&sum["byState"][*st])))).collect();
        println!("{}", states.join(" · "));
        let mut rows = vec![vec!["VERSION".to_owned(), "RUN STATE".into(), "STATE".into(), "HOSTS".into()]];
        for g in sum["groups"].as_array().into_iter().flatten() {
            let version = g["version"].as_str().filter(|v| !v.is_empty()).unwrap_or("(none)");
            rows.push(vec![
                version.to_owned(),
                g["status"].as_str().unwrap_or("").to_owned(),
                g["state"].as_str().unwrap_or("").to_owned(),
                num(n(&g["hosts"])),
            ]);
        }
        print!("{}", table(&rows));
        for line in silent_lines(std::slice::from_ref(&sum), unix_now()) {
            println!("{line}");
        }
    }
    Ok(partial(&sum))
}

/// `opsctl hosts AGENT [--state --version --prefix]`: the listing, streamed as the server
/// writes it (tab-separated, or its JSON).
pub fn hosts(s: &Server, agent: &str, filters: &[(&str, Option<&str>)], json: bool) -> Result<Option<String>, Failure> {
    let query: Vec<String> = filters.iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", enc(v)))).collect();
    let q = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    if json {
        let v = s.get(&format!("/status/json/{}{q}", enc(agent)))?;
        println!("{v}");
        return Ok(partial(&v));
    }
    let text = s.get_text(&format!("/status/text/{}{q}", enc(agent)))?;
    print!("{text}");
    Ok(None)
}

/// `opsctl host NAME`: one host's agents.
pub fn host(s: &Server, name: &str, json: bool) -> Result<Option<String>, Failure> {
    let h = s.get(&format!("/status/host/{}", enc(name)))?;
    if json {
        println!("{h}");
        return Ok(None);
    }
    println!(
        "{} ip {} · updater {} · via {} · {} · last seen {} s ago{}",
        h["hostname"].as_str().unwrap_or(name),
        h["ip"].as_str().filter(|s| !s.is_empty()).unwrap_or("-"),
        h["updaterVersion"].as_str().filter(|s| !s.is_empty()).unwrap_or("-"),
        h["relay"].as_str().filter(|s| !s.is_empty()).map_or("no relay".to_owned(), |r| format!("relay {r}")),
        if h["authenticated"] == true { "authenticated" } else { "unauthenticated" },
        n(&h["ageSeconds"]),
        if h["stale"] == true { " (stale)" } else { "" }
    );
    let mut rows = vec![["AGENT", "VERSION", "STATUS", "DESIRED", "STATE", "NOTE"].iter().map(|s| s.to_string()).collect()];
    for a in h["agents"].as_array().into_iter().flatten() {
        let s = |k: &str| a[k].as_str().filter(|v| !v.is_empty()).unwrap_or("-").to_owned();
        let note = match (a["pinned"].as_str(), a["lastError"].as_str()) {
            (_, Some(e)) => e.to_owned(),
            (Some(p), None) => format!("pinned {p}"),
            _ => String::new(),
        };
        rows.push(vec![s("name"), s("version"), s("status"), format!("{} ({})", s("desiredVersion"), s("desiredCmd")), s("state"), note]);
    }
    print!("{}", table(&rows));
    Ok(None)
}

/// `opsctl rollout AGENT`: the waves as text bars, the fleet's wave, and why it waits or
/// halted.
pub fn rollout(s: &Server, agent: &str, json: bool) -> Result<Option<String>, Failure> {
    let r = s.get(&format!("/rollout/{}", enc(agent)))?;
    if json {
        println!("{r}");
        return Ok(partial(&r));
    }
    let waves = r["waves"].as_array().cloned().unwrap_or_default();
    println!(
        "rollout {} {} -> {}: wave {} of {}{}{}",
        agent,
        r["from"].as_str().unwrap_or("?"),
        r["target"].as_str().unwrap_or("?"),
        n(&r["fleetWave"]),
        waves.len(),
        if r["paused"] == true { " · paused" } else { "" },
        if r["abort"] == true { " · aborted" } else { "" },
    );
    if r["halted"] == true {
        let by: Vec<&str> = r["haltedBy"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        println!("HALTED: {}", by.join("; "));
    }
    const WIDTH: usize = 30;
    for (i, w) in waves.iter().enumerate() {
        let t = n(&w["targeted"]).max(1);
        let (conv, failed) = (n(&w["converged"]), n(&w["failed"]).max(n(&w["failedTotal"])));
        let cells = |x: u64| ((x as f64 / t as f64) * WIDTH as f64).round() as usize;
        let (c, f) = (cells(conv).min(WIDTH), cells(failed));
        let f = f.min(WIDTH - c);
        let bar = format!("{}{}{}", "#".repeat(c), "x".repeat(f), ".".repeat(WIDTH - c - f));
        let mut line = format!(
            "wave {} ({:>3} %) [{bar}] {}/{} converged, {} failed",
            i + 1,
            n(&w["percent"]),
            num(conv),
            num(n(&w["targeted"])),
            num(n(&w["failed"]))
        );
        if n(&w["failedTotal"]) > n(&w["failed"]) {
            let _ = write!(line, " ({} since the start, {} back on from)", num(n(&w["failedTotal"])), num(n(&w["backOnFrom"])));
        }
        if n(&w["pinned"]) > 0 {
            let _ = write!(line, ", {} pinned", num(n(&w["pinned"])));
        }
        if i as u64 >= n(&r["fleetWave"]) {
            line.push_str(" (not open)");
        }
        println!("{line}");
    }
    for node in r["nodes"].as_array().into_iter().flatten() {
        println!(
            "  {}: approved wave {}, {}{}",
            node["node"].as_str().unwrap_or("?"),
            n(&node["approvedWave"]),
            node["verdict"].as_str().unwrap_or(""),
            if node["answered"] == false { " (no answer: its last word)" } else { "" }
        );
    }
    Ok(partial(&r))
}

/// `opsctl cluster`: every meta node of the map, whether it answers, its config and cluster
/// hashes and the hosts it holds. Exit 1 when a node is down or the hashes differ.
pub fn cluster(s: &Server, json: bool) -> Result<Option<String>, Failure> {
    let first = s.get("/health")?;
    let nodes = first["nodes"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    if nodes.is_empty() {
        out.push(first.clone());
    }
    for node in &nodes {
        let url = node["url"].as_str().unwrap_or("");
        let health = match s.get_url(&format!("{url}/health?detail=1")) {
            Ok(h) => h,
            Err(Failure::Unavailable(e) | Failure::Refused(e)) => serde_json::json!({"id": node["id"], "status": "down", "error": e}),
            Err(e) => return Err(e),
        };
        let mut h = health;
        h["url"] = Value::String(url.to_owned());
        out.push(h);
    }
    let mut problems = Vec::new();
    let hashes = |k: &str| -> std::collections::BTreeSet<String> {
        out.iter().filter(|h| h["status"] == "ok").filter_map(|h| h[k].as_str().map(str::to_owned)).collect()
    };
    if hashes("configHash").len() > 1 {
        problems.push("config hashes differ between nodes".to_owned());
    }
    // One generation, two hashes: the nodes diverged (not merely one behind an apply).
    let up: Vec<&Value> = out.iter().filter(|h| h["status"] == "ok").collect();
    for a in &up {
        for b in &up {
            if a["configGeneration"] == b["configGeneration"] && a["configHash"] != b["configHash"] && a["id"].as_str() < b["id"].as_str() {
                problems.push(format!(
                    "{} and {} diverged: generation {} with different configs",
                    a["id"].as_str().unwrap_or("?"),
                    b["id"].as_str().unwrap_or("?"),
                    a["configGeneration"]
                ));
            }
        }
    }
    if hashes("clusterHash").len() > 1 {
        problems.push("cluster hashes differ between nodes".to_owned());
    }
    for a in &up {
        for b in &up {
            if a["clusterGeneration"] == b["clusterGeneration"]
                && a["clusterHash"] != b["clusterHash"]
                && a["id"].as_str() < b["id"].as_str()
            {
                problems.push(format!(
                    "{} and {} diverged: cluster map generation {} with different maps",
                    a["id"].as_str().unwrap_or("?"),
                    b["id"].as_str().unwrap_or("?"),
                    a["clusterGeneration"]
                ));
            }
        }
    }
    let down: Vec<String> = out.iter().filter(|h| h["status"] != "ok").map(|h| h["id"].as_str().unwrap_or("?").to_owned()).collect();
    if !down.is_empty() {
        problems.push(format!("down: {}", down.join(", ")));
    }
    if json {
        println!("{}", serde_json::json!({"nodes": out, "problems": problems}));
    } else {
        let mut rows = vec![
            ["NODE", "URL", "STATUS", "CONFIG", "GEN", "CLUSTER", "CGEN", "HOSTS", "COPIES", "VERSION"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ];
        for h in &out {
            let short = |k: &str| h[k].as_str().map_or("-".to_owned(), |v| v.chars().take(12).collect());
            rows.push(vec![
                h["id"].as_str().unwrap_or("?").to_owned(),
                h["url"].as_str().unwrap_or("-").to_owned(),
                h["status"].as_str().unwrap_or("?").to_owned(),
                short("configHash"),
                h["configGeneration"].as_u64().map_or("-".into(), |g| g.to_string()),
                short("clusterHash"),
                h["clusterGeneration"].as_u64().map_or("-".into(), |g| g.to_string()),
                h["hosts"].as_u64().map_or("-".into(), num),
                h["failoverCopies"].as_u64().map_or("-".into(), num),
                h["version"].as_str().unwrap_or("-").to_owned(),
            ]);
        }
        print!("{}", table(&rows));
    }
    Ok((!problems.is_empty()).then(|| problems.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_numbers_and_encoding() {
        assert_eq!(num(0), "0");
        assert_eq!(num(1234567), "1,234,567");
        assert_eq!(num(100), "100");
        assert_eq!(enc("bj-web-"), "bj-web-");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
        let t = table(&[vec!["A".into(), "BB".into()], vec!["ccc".into(), "d".into()]]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }

    #[test]
    fn silent_relays_are_one_line_each() {
        let now = 1_700_000_000 + 45 * 60;
        let sum = |relays: Value| serde_json::json!({ "relays": relays });
        let a = sum(serde_json::json!([
            {"relay": "dc2-1", "hosts": 48112, "silent": 48112, "lastHeard": 1_700_000_000},
            {"relay": "dc1-1", "hosts": 50000, "silent": 3, "lastHeard": 1_700_000_000},
            {"relay": "dc1-2", "hosts": 50000, "silent": 0, "lastHeard": 0},
        ]));
        // A second agent's summary counts fewer of the same hosts: the most wins.
        let b = sum(serde_json::json!([{"relay": "dc2-1", "hosts": 100, "silent": 100, "lastHeard": 1_700_000_000}]));
        let lines = silent_lines(&[a, b], now);
        assert_eq!(
            lines,
            vec![
                "relay dc2-1: 48,112 hosts silent since 22:13 UTC, 45 min ago (all of its hosts)".to_owned(),
                "relay dc1-1: 3 hosts silent since 22:13 UTC, 45 min ago (of 50,000 hosts)".to_owned(),
            ]
        );
    }
}
