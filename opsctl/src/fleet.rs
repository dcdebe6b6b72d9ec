//! The read side of `opsctl`: what any meta node answers, as tables (or `--json`, the server's
//! own JSON unchanged, for scripts).

use ops_config::clock::unix_now;
use std::fmt::Write as _;
use std::time::Duration;

use ops_config::status::{AgentList, Completeness, Health, HostView, RolloutView, State, Summary, SummaryReply};
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

    /// `GET {base}{path}` read as the reply type `T`, with the server's text (what `--json`
    /// prints unchanged). No answer, or one that is not a `T`, is `Unavailable`; an error
    /// status is `Refused` with the server's `errorMessage`.
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<(String, T), Failure> {
        self.url_as(&format!("{}{path}", self.base))
    }

    fn url_as<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<(String, T), Failure> {
        let text = self.fetch(url)?;
        let reply = serde_json::from_str(&text).map_err(|e| Failure::Unavailable(format!("GET {url}: not the reply expected: {e}")))?;
        Ok((text, reply))
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

/// Did the answer come from every node? A partial one is said on stderr (and exits 1).
fn partial(partial: bool, missing: &[String]) -> Option<String> {
    partial.then(|| format!("partial: no answer from {}; their hosts are missing", missing.join(", ")))
}

/// The states in the order the tables show them.
const STATES: [State; 5] = [State::Ok, State::Upgrading, State::Error, State::Stale, State::Pinned];

/// "relay dc2-1: 48,112 hosts silent since 12:03 UTC (all of its hosts)": one line per relay
/// with silent hosts, from the `relays` of one or more summaries (a host counted by two agents'
/// summaries counts once: the most any summary says). `now` is unix seconds.
pub fn silent_lines(summaries: &[&Summary], now: u64) -> Vec<String> {
    // relay → (silent, hosts, last heard)
    let mut by_relay: Vec<(String, u64, u64, u64)> = Vec::new();
    for r in summaries.iter().flat_map(|s| &s.relays) {
        let (relay, silent, hosts, last) = (r.relay.clone(), r.silent, r.hosts, u64::from(r.last_heard));
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
        let (_, list) = s.get_as::<AgentList>("/status/agents")?;
        let replies: Vec<(String, SummaryReply)> =
            list.agents.iter().map(|a| s.get_as(&format!("/status/summary/{}", enc(&a.name)))).collect::<Result<_, _>>()?;
        if json {
            let texts: Vec<&str> = replies.iter().map(|(t, _)| t.trim()).collect();
            println!("[{}]", texts.join(","));
        } else {
            let mut rows = vec![
                ["AGENT", "DESIRED", "HOSTS", "CONVERGED"].into_iter().chain(STATES.map(State::as_str)).map(str::to_uppercase).collect(),
            ];
            for (_, r) in &replies {
                let sum = &r.summary;
                let desired: Vec<String> = sum.desired.iter().map(|d| format!("{} ({})", d.version, d.cmd)).collect();
                let mut row = vec![sum.agent.clone(), desired.join(", "), num(sum.hosts), format!("{:.1} %", sum.converged_ratio * 100.0)];
                row.extend(STATES.iter().map(|st| num(sum.in_state(*st))));
                rows.push(row);
            }
            print!("{}", table(&rows));
            let summaries: Vec<&Summary> = replies.iter().map(|(_, r)| &r.summary).collect();
            for line in silent_lines(&summaries, unix_now()) {
                println!("{line}");
            }
        }
        return Ok(replies.iter().find_map(|(_, r)| partial(r.partial, &r.missing_nodes)));
    };
    let (text, reply) = s.get_as::<SummaryReply>(&format!("/status/summary/{}", enc(agent)))?;
    let sum = &reply.summary;
    if json {
        println!("{}", text.trim());
    } else {
        println!("{}: {} hosts, {} converged ({:.1} %)", agent, num(sum.hosts), num(sum.converged), sum.converged_ratio * 100.0);
        let states: Vec<String> = STATES.iter().map(|st| format!("{} {}", st.as_str(), num(sum.in_state(*st)))).collect();
        println!("{}", states.join(" · "));
        let mut rows = vec![vec!["VERSION".to_owned(), "RUN STATE".into(), "STATE".into(), "HOSTS".into()]];
        for g in &sum.groups {
            let version = if g.version.is_empty() { "(none)" } else { &g.version };
            rows.push(vec![version.to_owned(), g.status.clone(), g.state.clone(), num(g.hosts)]);
        }
        print!("{}", table(&rows));
        for line in silent_lines(&[sum], unix_now()) {
            println!("{line}");
        }
    }
    Ok(partial(reply.partial, &reply.missing_nodes))
}

/// `opsctl hosts AGENT [--state --version --prefix]`: the listing, streamed as the server
/// writes it (tab-separated, or its JSON).
pub fn hosts(s: &Server, agent: &str, filters: &[(&str, Option<&str>)], json: bool) -> Result<Option<String>, Failure> {
    let query: Vec<String> = filters.iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", enc(v)))).collect();
    let q = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    if json {
        let (text, whole) = s.get_as::<Completeness>(&format!("/status/json/{}{q}", enc(agent)))?;
        println!("{}", text.trim());
        return Ok(partial(whole.partial, &whole.missing_nodes));
    }
    let text = s.get_text(&format!("/status/text/{}{q}", enc(agent)))?;
    print!("{text}");
    Ok(None)
}

/// `opsctl host NAME`: one host's agents.
pub fn host(s: &Server, name: &str, json: bool) -> Result<Option<String>, Failure> {
    let (text, h) = s.get_as::<HostView>(&format!("/status/host/{}", enc(name)))?;
    if json {
        println!("{}", text.trim());
        return Ok(None);
    }
    let or_dash = |v: &str| if v.is_empty() { "-".to_owned() } else { v.to_owned() };
    println!(
        "{} ip {} · updater {} · via {} · {} · last seen {} s ago{}",
        if h.hostname.is_empty() { name } else { &h.hostname },
        or_dash(&h.ip),
        or_dash(&h.updater_version),
        if h.relay.is_empty() { "no relay".to_owned() } else { format!("relay {}", h.relay) },
        if h.authenticated { "authenticated" } else { "unauthenticated" },
        h.age_seconds,
        if h.stale { " (stale)" } else { "" }
    );
    let mut rows = vec![["AGENT", "VERSION", "STATUS", "DESIRED", "STATE", "NOTE"].iter().map(|s| s.to_string()).collect()];
    for a in &h.agents {
        let note = match (&a.pinned, &a.last_error) {
            (_, Some(e)) => e.clone(),
            (Some(p), None) => format!("pinned {p}"),
            _ => String::new(),
        };
        rows.push(vec![
            or_dash(&a.name),
            or_dash(&a.version),
            or_dash(&a.status),
            format!("{} ({})", or_dash(&a.desired_version), or_dash(&a.desired_cmd)),
            or_dash(&a.state),
            note,
        ]);
    }
    print!("{}", table(&rows));
    Ok(None)
}

/// `opsctl rollout AGENT`: the waves as text bars, the fleet's wave, and why it waits or
/// halted.
pub fn rollout(s: &Server, agent: &str, json: bool) -> Result<Option<String>, Failure> {
    let (text, r) = s.get_as::<RolloutView>(&format!("/rollout/{}", enc(agent)))?;
    if json {
        println!("{}", text.trim());
        return Ok(partial(r.partial, &r.missing_nodes));
    }
    print!("{}", rollout_text(agent, &r));
    Ok(partial(r.partial, &r.missing_nodes))
}

/// The text of `opsctl rollout AGENT`.
fn rollout_text(agent: &str, r: &RolloutView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rollout {} {} -> {}: wave {} of {}{}{}",
        agent,
        if r.from.is_empty() { "?" } else { &r.from },
        if r.target.is_empty() { "?" } else { &r.target },
        r.fleet_wave,
        r.waves.len(),
        if r.paused { " · paused" } else { "" },
        if r.abort { " · aborted" } else { "" },
    );
    if r.halted {
        let _ = writeln!(out, "HALTED: {}", r.halted_by.join("; "));
    }
    const WIDTH: usize = 30;
    for (i, w) in r.waves.iter().enumerate() {
        let t = w.targeted.max(1);
        let (conv, failed) = (w.converged, w.failed.max(w.failed_total));
        let cells = |x: u64| ((x as f64 / t as f64) * WIDTH as f64).round() as usize;
        let (c, f) = (cells(conv).min(WIDTH), cells(failed));
        let f = f.min(WIDTH - c);
        let bar = format!("{}{}{}", "#".repeat(c), "x".repeat(f), ".".repeat(WIDTH - c - f));
        let mut line =
            format!("wave {} ({:>3} %) [{bar}] {}/{} converged, {} failed", i + 1, w.percent, num(conv), num(w.targeted), num(w.failed));
        if w.failed_total > w.failed {
            let _ = write!(line, " ({} since the start, {} back on from)", num(w.failed_total), num(w.back_on_from));
        }
        if w.pinned > 0 {
            let _ = write!(line, ", {} pinned", num(w.pinned));
        }
        if i >= r.fleet_wave {
            line.push_str(" (not open)");
        }
        let _ = writeln!(out, "{line}");
    }
    for node in &r.nodes {
        let _ = writeln!(
            out,
            "  {}: approved wave {}, {}{}",
            node.id,
            node.approved_wave,
            node.verdict,
            if node.reachable { "" } else { " (no answer: its last word)" }
        );
    }
    out
}

/// One row of `opsctl cluster`: a node's health as it answered (its JSON unchanged, for
/// `--json`), or why it did not.
struct NodeRow {
    id: String,
    url: String,
    json: Value,
    health: Option<Health>,
}

/// `opsctl cluster`: every meta node of the map, whether it answers, its config and cluster
/// hashes and the hosts it holds. Exit 1 when a node is down or the hashes differ.
pub fn cluster(s: &Server, json: bool) -> Result<Option<String>, Failure> {
    let (first_text, first) = s.get_as::<Health>("/health")?;
    let mut out = Vec::new();
    if first.nodes.is_empty() {
        let json = serde_json::from_str(&first_text).unwrap_or(Value::Null);
        out.push(NodeRow { id: first.id.clone(), url: String::new(), json, health: Some(first.clone()) });
    }
    for node in &first.nodes {
        let row = match s.url_as::<Health>(&format!("{}/health?detail=1", node.url)) {
            Ok((text, h)) => {
                let mut json: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                json["url"] = Value::String(node.url.clone());
                NodeRow { id: h.id.clone(), url: node.url.clone(), json, health: Some(h) }
            }
            Err(Failure::Unavailable(e) | Failure::Refused(e)) => NodeRow {
                id: node.id.clone(),
                url: node.url.clone(),
                json: serde_json::json!({"id": node.id, "status": "down", "error": e, "url": node.url}),
                health: None,
            },
            Err(e) => return Err(e),
        };
        out.push(row);
    }
    let up: Vec<&Health> = out.iter().filter_map(|r| r.health.as_ref()).filter(|h| h.status == "ok").collect();
    let problems = cluster_problems(&up, out.iter().filter(|r| r.health.as_ref().is_none_or(|h| h.status != "ok")).map(|r| r.id.as_str()));
    if json {
        let nodes: Vec<&Value> = out.iter().map(|r| &r.json).collect();
        println!("{}", serde_json::json!({"nodes": nodes, "problems": problems}));
    } else {
        let mut rows = vec![
            ["NODE", "URL", "STATUS", "CONFIG", "GEN", "CLUSTER", "CGEN", "HOSTS", "COPIES", "VERSION"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ];
        for r in &out {
            let short = |v: &str| v.chars().take(12).collect::<String>();
            let dash = || "-".to_owned();
            let row = match &r.health {
                Some(h) => vec![
                    h.id.clone(),
                    if r.url.is_empty() { dash() } else { r.url.clone() },
                    h.status.clone(),
                    short(&h.config_hash),
                    h.config_generation.to_string(),
                    h.cluster_hash.as_deref().map_or_else(dash, short),
                    h.cluster_generation.map_or_else(dash, |g| g.to_string()),
                    num(h.hosts),
                    h.failover_copies.map_or_else(dash, num),
                    h.version.clone(),
                ],
                None => {
                    let mut row = vec![r.id.clone(), r.url.clone(), "down".to_owned()];
                    row.extend(std::iter::repeat_n(dash(), 7));
                    row
                }
            };
            rows.push(row);
        }
        print!("{}", table(&rows));
    }
    Ok((!problems.is_empty()).then(|| problems.join("; ")))
}

/// What `opsctl cluster` reports as wrong: hashes that differ, two nodes at one generation
/// with different contents (diverged, not merely one behind an apply), and nodes down.
fn cluster_problems<'a>(up: &[&Health], down: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut problems = Vec::new();
    let distinct = |f: &dyn Fn(&Health) -> Option<&str>| up.iter().filter_map(|h| f(h)).collect::<std::collections::BTreeSet<_>>().len();
    if distinct(&|h| Some(h.config_hash.as_str())) > 1 {
        problems.push("config hashes differ between nodes".to_owned());
    }
    for a in up {
        for b in up {
            if a.config_generation == b.config_generation && a.config_hash != b.config_hash && a.id < b.id {
                problems.push(format!("{} and {} diverged: generation {} with different configs", a.id, b.id, a.config_generation));
            }
        }
    }
    if distinct(&|h| h.cluster_hash.as_deref()) > 1 {
        problems.push("cluster hashes differ between nodes".to_owned());
    }
    for a in up {
        for b in up {
            if a.cluster_generation == b.cluster_generation && a.cluster_hash != b.cluster_hash && a.id < b.id {
                let generation = a.cluster_generation.map_or_else(|| "null".to_owned(), |g| g.to_string());
                problems.push(format!("{} and {} diverged: cluster map generation {generation} with different maps", a.id, b.id));
            }
        }
    }
    let down: Vec<&str> = down.collect();
    if !down.is_empty() {
        problems.push(format!("down: {}", down.join(", ")));
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use ops_config::rollout::WaveReport;
    use ops_config::status::RolloutNode;

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
        let sum = |relays: &[(&str, u64, u64, u32)]| {
            let mut s = Summary::empty("a");
            for &(relay, hosts, silent, last) in relays {
                s.add_relay(relay, hosts, silent, last);
            }
            s
        };
        let a = sum(&[("dc2-1", 48112, 48112, 1_700_000_000), ("dc1-1", 50000, 3, 1_700_000_000), ("dc1-2", 50000, 0, 0)]);
        // A second agent's summary counts fewer of the same hosts: the most wins.
        let b = sum(&[("dc2-1", 100, 100, 1_700_000_000)]);
        let lines = silent_lines(&[&a, &b], now);
        assert_eq!(
            lines,
            vec![
                "relay dc2-1: 48,112 hosts silent since 22:13 UTC, 45 min ago (all of its hosts)".to_owned(),
                "relay dc1-1: 3 hosts silent since 22:13 UTC, 45 min ago (of 50,000 hosts)".to_owned(),
            ]
        );
    }

    fn health(id: &str, config: (&str, u64), cluster: (&str, u64)) -> Health {
        Health {
            status: "ok".into(),
            id: id.into(),
            config_hash: config.0.into(),
            config_generation: config.1,
            cluster_hash: Some(cluster.0.into()),
            cluster_generation: Some(cluster.1),
            ..Health::default()
        }
    }

    #[test]
    fn cluster_problems_tell_behind_from_diverged() {
        let (a, b) = (health("m1", ("c1", 4), ("k1", 2)), health("m2", ("c1", 4), ("k1", 2)));
        assert!(cluster_problems(&[&a, &b], std::iter::empty()).is_empty());
        // One behind an apply: hashes differ, but no divergence.
        let behind = health("m2", ("c0", 3), ("k1", 2));
        assert_eq!(cluster_problems(&[&a, &behind], std::iter::empty()), vec!["config hashes differ between nodes".to_owned()]);
        let diverged = health("m2", ("c9", 4), ("k9", 2));
        assert_eq!(
            cluster_problems(&[&a, &diverged], ["m3"].into_iter()),
            vec![
                "config hashes differ between nodes".to_owned(),
                "m1 and m2 diverged: generation 4 with different configs".to_owned(),
                "cluster hashes differ between nodes".to_owned(),
                "m1 and m2 diverged: cluster map generation 2 with different maps".to_owned(),
                "down: m3".to_owned(),
            ]
        );
    }

    #[test]
    fn rollout_text_names_nodes_and_their_answers() {
        let r = RolloutView {
            from: "1".into(),
            target: "2".into(),
            fleet_wave: 1,
            waves: vec![
                WaveReport { percent: 10, targeted: 10, converged: 5, failed: 1, ..WaveReport::default() },
                WaveReport { percent: 100, targeted: 90, ..WaveReport::default() },
            ],
            nodes: vec![
                RolloutNode { id: "m1".into(), reachable: true, approved_wave: 1, verdict: "soaking".into(), ..RolloutNode::default() },
                RolloutNode { id: "m2".into(), reachable: false, approved_wave: 1, verdict: "x".into(), ..RolloutNode::default() },
            ],
            ..RolloutView::default()
        };
        let text = rollout_text("a", &r);
        assert!(text.starts_with("rollout a 1 -> 2: wave 1 of 2\n"), "{text}");
        assert!(text.contains("wave 1 ( 10 %) [###############xxx............] 5/10 converged, 1 failed\n"), "{text}");
        assert!(text.contains("wave 2 (100 %) [..............................] 0/90 converged, 0 failed (not open)\n"), "{text}");
        assert!(text.contains("  m1: approved wave 1, soaking\n"), "{text}");
        assert!(text.contains("  m2: approved wave 1, x (no answer: its last word)\n"), "{text}");
    }
}
