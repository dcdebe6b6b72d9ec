//! Faults injected under the steady load (`--chaos`, and `--kill-meta` for the first one
//! alone), one scenario after the other, each measured the same way:
//! - updater-visible errors (after the simulated updater's own failover to its next relay) and
//!   the heartbeats that needed that failover;
//! - seconds until a survivor's summary counts every host again during the fault, and seconds
//!   until status is *whole* (every host counted, not partial) after the fault ends;
//! - the summary's latency while the fault lasts (sampled from meta node 1 every 250 ms);
//! - once whole, a full text listing: hosts missing and hosts listed more than once;
//! - seconds until no meta node holds a failover copy any more, and the RSS of every process.
//!
//! Long for one file, on purpose: every scenario is measured by the same machinery (the
//! sampler, the explanation of a count that is not whole, the listing check), and a scenario
//! is only its fault and its row; split apart, each would need that machinery's internals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ops_config::reply::ChangeReply;
use ops_config::status::{Health, SummaryReply};
use serde_json::{Value, json};
use std::sync::Mutex;

use crate::cluster::{self, Cluster};
use crate::load::{self, Live};

/// The scenarios, in the order `--chaos` runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// SIGKILL the last meta node; restart it after one interval.
    KillMeta,
    /// SIGSTOP the last meta node (hung, not dead) for `--chaos-pause-seconds`, then SIGCONT.
    StopMeta,
    /// SIGKILL the first relay; its updaters fail over to the next one; restart it after one
    /// interval.
    KillRelay,
    /// SIGTERM every meta node at once (they snapshot), then start them all again.
    RestartAllMeta,
    /// SIGKILL every meta node but the first; restart them after one interval.
    TwoMetaDown,
    /// `--grow-meta`: start one more meta node on a map that names it and ask meta node 1 for
    /// `/cluster/reload?all=1` (the membership change online).
    GrowMeta,
    /// `--grow-meta`, after `GrowMeta`: take meta-2 out of the map the same way; once it
    /// holds no host, stop it.
    ShrinkMeta,
}

impl Scenario {
    pub const ALL: [Scenario; 5] =
        [Scenario::KillMeta, Scenario::StopMeta, Scenario::KillRelay, Scenario::RestartAllMeta, Scenario::TwoMetaDown];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillMeta => "kill-meta",
            Scenario::StopMeta => "stop-meta",
            Scenario::KillRelay => "kill-relay",
            Scenario::RestartAllMeta => "restart-all-meta",
            Scenario::TwoMetaDown => "meta-down-all-but-one",
            Scenario::GrowMeta => "grow-meta",
            Scenario::ShrinkMeta => "shrink-meta",
        }
    }
}

/// What one scenario measured.
#[derive(Debug, Default, Clone)]
pub struct Row {
    pub name: &'static str,
    /// What the fault did, in words (which process, which signal).
    pub fault: String,
    pub errors: u64,
    pub failovers: u64,
    /// Seconds from the fault until meta node 1's summary counted every host (partial or not).
    pub complete_s: Option<f64>,
    /// Seconds from the end of the fault (restart, SIGCONT) until the restarted processes
    /// answered `/health`.
    pub serving_s: Option<f64>,
    /// Seconds from the end of the fault until the summary counted every host and was not
    /// partial.
    pub whole_s: Option<f64>,
    pub summary_p99_ms: Option<f64>,
    pub summary_max_ms: Option<f64>,
    /// Summary requests during the fault that got no answer.
    pub summary_failed: u64,
    /// Whether any summary during the fault said it was partial.
    pub partial_seen: bool,
    pub listed: u64,
    pub missing: u64,
    pub twice: u64,
    pub listing_partial: bool,
    /// Failover copies the meta nodes still held at the end.
    pub copies_left: u64,
    /// Seconds from the end of the fault until no meta node held a failover copy (their
    /// `ops_meta_failover_copies`, updated every probe interval).
    pub copies_gone_s: Option<f64>,
    /// RSS of every process at the height of the fault (before its end), and at the end.
    pub rss_fault: Vec<(String, u64)>,
    pub rss_end: Vec<(String, u64)>,
    /// RSS of every process `Ctx::settle` after the copies went home (memory given back),
    /// and the highest ratio of a meta node's to its RSS before the first fault, with its name.
    pub rss_settled: Vec<(String, u64)>,
    pub settled_ratio: Option<(String, f64)>,
    pub seconds: f64,
    /// Membership changes: hosts that changed owner (the nodes' `moved`), and the most the
    /// ring may move (1.1 / nodes of the larger map).
    pub moved: Option<u64>,
    pub moved_bound: Option<u64>,
    /// Membership changes: seconds of the `/cluster/reload?all=1` call, and from its start
    /// until the new node held its ring share (or the leaving one held nothing) with no
    /// failover copy left anywhere.
    pub reload_s: Option<f64>,
    pub settled_s: Option<f64>,
    /// Membership changes: every summary sampled from the reload to the settling counted
    /// every host exactly once and was not partial.
    pub whole_throughout: Option<bool>,
    /// When it was not: the samples that were not whole, in words.
    pub not_whole: Option<String>,
}

impl Row {
    /// Nothing lost, nothing twice, whole again, no copy left behind.
    pub fn ok(&self) -> bool {
        self.whole_s.is_some()
            && self.missing == 0
            && self.twice == 0
            && !self.listing_partial
            && self.copies_left == 0
            && self.whole_throughout != Some(false)
            && self.moved.zip(self.moved_bound).is_none_or(|(m, b)| m <= b)
            && (self.moved.is_none() || self.settled_s.is_some())
    }

    pub fn json(&self) -> Value {
        let rss = |v: &[(String, u64)]| v.iter().map(|(n, b)| (n.clone(), json!(b))).collect::<serde_json::Map<_, _>>();
        json!({
            "scenario": self.name,
            "fault": self.fault,
            "ok": self.ok(),
            "updater_errors": self.errors,
            "updater_failovers": self.failovers,
            "complete_s": self.complete_s,
            "serving_s": self.serving_s,
            "whole_s": self.whole_s,
            "summary_p99_ms": self.summary_p99_ms,
            "summary_max_ms": self.summary_max_ms,
            "summary_failed": self.summary_failed,
            "partial_seen": self.partial_seen,
            "listed_hosts": self.listed,
            "missing_hosts": self.missing,
            "hosts_listed_twice": self.twice,
            "listing_partial": self.listing_partial,
            "copies_left": self.copies_left,
            "copies_gone_s": self.copies_gone_s,
            "rss_fault_bytes": rss(&self.rss_fault),
            "rss_end_bytes": rss(&self.rss_end),
            "rss_settled_bytes": rss(&self.rss_settled),
            "rss_settled_ratio": self.settled_ratio.as_ref().map(|r| r.1),
            "rss_settled_ratio_node": self.settled_ratio.as_ref().map(|r| r.0.clone()),
            "seconds": self.seconds,
            "moved_hosts": self.moved,
            "moved_bound_hosts": self.moved_bound,
            "reload_s": self.reload_s,
            "settled_s": self.settled_s,
            "whole_throughout": self.whole_throughout,
            "not_whole": self.not_whole,
        })
    }

    /// One line of the report.
    pub fn line(&self) -> String {
        let s = |t: Option<f64>| t.map_or("never".to_owned(), |t| format!("{t:.1} s"));
        let ms = |t: Option<f64>| t.map_or("-".to_owned(), |t| format!("{t:.0} ms"));
        let meta_rss: Vec<String> =
            self.rss_fault.iter().filter(|(n, _)| n.starts_with("meta")).map(|(n, b)| format!("{n} {}", b >> 20)).collect();
        let membership = match self.moved {
            Some(moved) => format!(
                "moved {moved} hosts (bound {}), reload {}, settled {}, whole throughout: {}; ",
                self.moved_bound.unwrap_or(0),
                s(self.reload_s),
                s(self.settled_s),
                match (self.whole_throughout, &self.not_whole) {
                    (Some(false), Some(why)) => format!("NO ({why})"),
                    (Some(false), None) => "NO".into(),
                    (Some(true), _) => "yes".into(),
                    (None, _) => "-".into(),
                }
            ),
            None => String::new(),
        };
        format!(
            "{:<22} {}: {membership}errors {} (failovers {}), {}whole {}; summary p99 {} (max {}, {} unanswered{}); listed {} missing {} twice {}; copies gone {}; meta RSS MiB at the fault: {}{}; {}",
            self.name,
            self.fault,
            self.errors,
            self.failovers,
            // A membership change is no outage: nothing to complete or serve again.
            if self.moved.is_some() { String::new() } else { format!("complete {}, serving {}, ", s(self.complete_s), s(self.serving_s)) },
            s(self.whole_s),
            ms(self.summary_p99_ms),
            ms(self.summary_max_ms),
            self.summary_failed,
            if self.partial_seen { ", partial seen" } else { "" },
            self.listed,
            self.missing,
            self.twice,
            match self.copies_gone_s {
                Some(t) => format!("after {t:.1} s"),
                None => format!("never ({} left)", self.copies_left),
            },
            meta_rss.join(", "),
            self.settled_line(),
            if self.ok() { "ok" } else { "FAILED" }
        )
    }

    /// The meta nodes' RSS once settled, and the highest ratio to before the faults.
    fn settled_line(&self) -> String {
        let Some((node, ratio)) = &self.settled_ratio else { return String::new() };
        let meta: Vec<String> =
            self.rss_settled.iter().filter(|(n, _)| n.starts_with("meta")).map(|(n, b)| format!("{n} {}", b >> 20)).collect();
        format!("; settled: {} (at most {ratio:.2} x before the faults, {node})", meta.join(", "))
    }
}

#[derive(Clone)]
struct Sample {
    at: Instant,
    ms: f64,
    /// None: no answer.
    hosts: Option<u64>,
    partial: bool,
    /// The nodes a partial answer names as missing.
    missing: Vec<String>,
}

impl Sample {
    /// In words, for a report: what this sample counted.
    fn describe(&self, since: Instant) -> String {
        let at = self.at.saturating_duration_since(since).as_secs_f64();
        match self.hosts {
            None => format!("no answer at +{at:.1} s"),
            Some(h) if self.partial => format!("{h} hosts, partial (missing {}) at +{at:.1} s", self.missing.join(", ")),
            Some(h) => format!("{h} hosts at +{at:.1} s"),
        }
    }
}

/// Polls meta node 1's summary every 250 ms while it runs: the scenarios' clock for
/// "complete" and "whole", and their summary latencies.
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
}

impl Sampler {
    pub fn start(client: reqwest::Client, meta: SocketAddr) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        tokio::spawn(async move {
            let url = crate::cluster::meta_url(meta, "/status/summary/falcon-agent");
            while !st.load(Ordering::Relaxed) {
                let t = Instant::now();
                let got: Option<SummaryReply> =
                    async { client.get(&url).timeout(Duration::from_secs(10)).send().await.ok()?.json().await.ok() }.await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let hosts = got.as_ref().map(|r| r.summary.hosts);
                let partial = got.as_ref().is_some_and(|r| r.partial);
                let missing = got.map(|r| r.missing_nodes).unwrap_or_default();
                s.lock().expect("sampler lock").push(Sample { at: t, ms, hosts, partial, missing });
                tokio::time::sleep(Duration::from_millis(250).saturating_sub(t.elapsed())).await;
            }
        });
        Sampler { samples, stop }
    }

    /// Seconds from `since` until a sample taken after it satisfies `pred`, or None after
    /// `limit`.
    async fn wait_for(&self, since: Instant, limit: Duration, pred: impl Fn(&Sample) -> bool) -> Option<f64> {
        loop {
            if let Some(s) = self.samples.lock().expect("sampler lock").iter().find(|s| s.at >= since && pred(s)) {
                return Some(s.at.duration_since(since).as_secs_f64());
            }
            if since.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether every sample taken between `from` and `to` counted exactly `hosts`, not
    /// partial (and there was at least one); if not, the samples that did not, in words.
    fn all_whole(&self, from: Instant, to: Instant, hosts: u64) -> Result<(), String> {
        let samples = self.samples.lock().expect("sampler lock");
        let taken: Vec<&Sample> = samples.iter().filter(|s| s.at >= from && s.at <= to).collect();
        if taken.is_empty() {
            return Err("no summary sampled".into());
        }
        let bad: Vec<String> = taken.iter().filter(|s| s.hosts != Some(hosts) || s.partial).map(|s| s.describe(from)).collect();
        match bad.len() {
            0 => Ok(()),
            n => Err(format!("{n} of {} samples: {}", taken.len(), bad.iter().take(3).cloned().collect::<Vec<_>>().join("; "))),
        }
    }

    /// Latency figures of the samples taken between `from` and `to`.
    fn window(&self, from: Instant, to: Instant, row: &mut Row) {
        let samples = self.samples.lock().expect("sampler lock");
        let mut ms: Vec<f64> = Vec::new();
        for s in samples.iter().filter(|s| s.at >= from && s.at <= to) {
            match s.hosts {
                Some(_) => ms.push(s.ms),
                None => row.summary_failed += 1,
            }
            row.partial_seen |= s.partial;
        }
        ms.sort_by(f64::total_cmp);
        if !ms.is_empty() {
            row.summary_p99_ms = Some(ms[((ms.len() as f64 - 1.0) * 0.99).round() as usize]);
            row.summary_max_ms = ms.last().copied();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the scenarios work on.
pub struct Ctx<'a> {
    pub cluster: &'a mut Cluster,
    pub client: &'a reqwest::Client,
    pub live: &'a Arc<Live>,
    pub sampler: &'a Sampler,
    pub hosts: u64,
    /// The compressed interval: every host reports once in it.
    pub interval: Duration,
    /// How long `stop-meta` keeps the node stopped.
    pub pause: Duration,
    /// How long after the copies went home every process's RSS is read again (0: not read).
    pub settle: Duration,
    /// Every process's RSS before the first fault.
    pub baseline: Vec<(String, u64)>,
}

impl Ctx<'_> {
    fn meta_addr(&self) -> SocketAddr {
        self.cluster.metas[0].addr
    }

    /// How long a scenario waits for "complete" or "whole" before it gives up.
    fn limit(&self) -> Duration {
        self.interval * 3 + Duration::from_secs(30)
    }

    pub fn rss(&self) -> Vec<(String, u64)> {
        self.cluster.processes().map(|p| (p.name.clone(), cluster::usage(p.pid()).map_or(0, |u| u.0))).collect()
    }
}

/// Runs `scenario` under the load that is running, and measures it.
pub async fn run(ctx: &mut Ctx<'_>, scenario: Scenario) -> anyhow::Result<Row> {
    let mut row = Row { name: scenario.name(), ..Row::default() };
    let (errors0, failovers0) = (ctx.live.errors(), ctx.live.failovers());
    let start = Instant::now();
    let n = ctx.hosts;
    let metas = ctx.cluster.metas.len();
    let counts_all = move |s: &Sample| s.hosts.is_some_and(|h| h >= n);
    let whole = move |s: &Sample| s.hosts.is_some_and(|h| h >= n) && !s.partial;
    let fault_end = match scenario {
        Scenario::KillMeta | Scenario::TwoMetaDown => {
            anyhow::ensure!(metas >= 2, "{} needs at least 2 meta nodes", scenario.name());
            let victims: Vec<usize> = if scenario == Scenario::KillMeta { vec![metas - 1] } else { (1..metas).collect() };
            for &v in &victims {
                ctx.cluster.metas[v].kill();
            }
            row.fault = format!("SIGKILL {}", victims.iter().map(|&v| ctx.cluster.metas[v].name.clone()).collect::<Vec<_>>().join(" and "));
            row.complete_s = ctx.sampler.wait_for(start, ctx.limit(), counts_all).await;
            // Every host reports through the relays' failover at least once before the restart.
            tokio::time::sleep((start + ctx.interval).saturating_duration_since(Instant::now())).await;
            row.rss_fault = ctx.rss();
            let end = Instant::now();
            for &v in &victims {
                ctx.cluster.metas[v].respawn()?;
            }
            for &v in &victims {
                let m = &ctx.cluster.metas[v];
                tokio::task::block_in_place(|| m.wait_ready())?;
            }
            row.serving_s = Some(end.elapsed().as_secs_f64());
            end
        }
        Scenario::StopMeta => {
            anyhow::ensure!(metas >= 2, "stop-meta needs at least 2 meta nodes");
            let v = metas - 1;
            ctx.cluster.metas[v].signal("STOP");
            row.fault = format!("SIGSTOP {} for {} s, then SIGCONT", ctx.cluster.metas[v].name, ctx.pause.as_secs_f64());
            row.complete_s = ctx.sampler.wait_for(start, ctx.pause, counts_all).await;
            tokio::time::sleep((start + ctx.pause).saturating_duration_since(Instant::now())).await;
            row.rss_fault = ctx.rss();
            ctx.cluster.metas[v].signal("CONT");
            let end = Instant::now();
            let m = &ctx.cluster.metas[v];
            tokio::task::block_in_place(|| m.wait_ready())?;
            row.serving_s = Some(end.elapsed().as_secs_f64());
            end
        }
        Scenario::KillRelay => {
            anyhow::ensure!(ctx.cluster.relays.len() >= 2, "kill-relay needs at least 2 relays");
            ctx.cluster.relays[0].kill();
            row.fault = format!("SIGKILL {}", ctx.cluster.relays[0].name);
            row.complete_s = ctx.sampler.wait_for(start, ctx.limit(), counts_all).await;
            // One interval: every host of the dead relay reports through the next one.
            tokio::time::sleep((start + ctx.interval).saturating_duration_since(Instant::now())).await;
            row.rss_fault = ctx.rss();
            let end = Instant::now();
            let r = &mut ctx.cluster.relays[0];
            tokio::task::block_in_place(|| r.restart())?;
            row.serving_s = Some(end.elapsed().as_secs_f64());
            end
        }
        Scenario::GrowMeta | Scenario::ShrinkMeta => membership(ctx, scenario, &mut row, start).await?,
        Scenario::RestartAllMeta => {
            row.fault = format!("SIGTERM all {metas} meta nodes (snapshot), then start them");
            tokio::task::block_in_place(|| {
                for m in ctx.cluster.metas.iter_mut() {
                    m.signal("TERM");
                }
                for m in ctx.cluster.metas.iter_mut() {
                    m.stop(Duration::from_secs(60));
                }
            });
            row.rss_fault = ctx.rss();
            let end = Instant::now();
            for m in ctx.cluster.metas.iter_mut() {
                m.respawn()?;
            }
            for m in &ctx.cluster.metas {
                tokio::task::block_in_place(|| m.wait_ready())?;
            }
            row.serving_s = Some(end.elapsed().as_secs_f64());
            end
        }
    };
    row.whole_s = ctx.sampler.wait_for(fault_end, ctx.limit(), whole).await;
    ctx.sampler.window(start, Instant::now(), &mut row);
    // Whole counts every host once; the copies behind may still be on their way home.
    loop {
        row.copies_left = copies_held(ctx.client, ctx.cluster).await;
        if row.copies_left == 0 {
            row.copies_gone_s = Some(fault_end.elapsed().as_secs_f64());
            break;
        }
        if fault_end.elapsed() > ctx.limit() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let listing = check_listing(ctx.client, ctx.meta_addr(), n).await?;
    (row.listed, row.missing, row.twice, row.listing_partial) = listing;
    row.rss_end = ctx.rss();
    if !ctx.settle.is_zero() {
        // Memory given back takes the allocator's decay and the meta nodes' compaction.
        let gone = fault_end + Duration::from_secs_f64(row.copies_gone_s.unwrap_or(0.0));
        tokio::time::sleep((gone + ctx.settle).saturating_duration_since(Instant::now())).await;
        row.rss_settled = ctx.rss();
        row.settled_ratio = settled_ratio(&ctx.baseline, &row.rss_settled);
    }
    row.errors = ctx.live.errors() - errors0;
    row.failovers = ctx.live.failovers() - failovers0;
    row.seconds = start.elapsed().as_secs_f64();
    Ok(row)
}

/// The highest ratio of a meta node's RSS in `now` to its RSS in `before`, with its name.
fn settled_ratio(before: &[(String, u64)], now: &[(String, u64)]) -> Option<(String, f64)> {
    now.iter()
        .filter(|(n, _)| n.starts_with("meta"))
        .filter_map(|(n, b)| {
            let (_, was) = before.iter().find(|(m, w)| m == n && *w > 0)?;
            Some((n.clone(), *b as f64 / *was as f64))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}

/// A membership change under the load: returns when it settled (the fault's end).
async fn membership(ctx: &mut Ctx<'_>, scenario: Scenario, row: &mut Row, start: Instant) -> anyhow::Result<Instant> {
    let metas = ctx.cluster.metas.len();
    let token = std::fs::read_to_string(&ctx.cluster.token_file)?.trim().to_owned();
    // Grow: the new node; shrink: meta-2, which leaves.
    let (node, larger) = match scenario {
        Scenario::GrowMeta => (tokio::task::block_in_place(|| ctx.cluster.add_meta())?, metas + 1),
        _ => {
            anyhow::ensure!(metas >= 3, "shrink-meta needs at least 3 meta nodes");
            let keep: Vec<usize> = (0..metas).filter(|&i| i != 1).collect();
            ctx.cluster.write_map(&keep, None)?;
            (1, metas)
        }
    };
    let id = ctx.cluster.metas[node].name.clone();
    row.fault = match scenario {
        Scenario::GrowMeta => format!("{id} added online ({} -> {} nodes)", metas, metas + 1),
        _ => format!("{id} removed online ({} -> {} nodes), then stopped", metas, metas - 1),
    };
    // The hosts the new map gives the new node (grow), or none (shrink).
    let map = ops_config::ClusterMap::load(&ctx.cluster.cluster_file)?;
    let want = match map.index_of(&id) {
        Some(k) => {
            let ring = map.ring();
            (0..ctx.hosts).filter(|&i| ring.owner(&load::hostname(i)) == k).count() as u64
        }
        None => 0,
    };
    let t = Instant::now();
    let url = crate::cluster::meta_url(ctx.cluster.metas[0].addr, "/cluster/reload?all=1");
    // The first summary that is not whole during the call, explained while it lasts.
    let metas: Vec<(String, SocketAddr)> = ctx.cluster.metas.iter().map(|m| (m.name.clone(), m.addr)).collect();
    let first_bad = async {
        ctx.sampler.wait_for(t, Duration::from_secs(600), |s| s.hosts != Some(ctx.hosts) || s.partial).await?;
        Some(explain_count_at(ctx.client, &metas, ctx.hosts).await)
    };
    let call = ctx.client.get(&url).bearer_auth(&token).timeout(Duration::from_secs(600)).send();
    let mut call = tokio::spawn(async move { call.await?.json::<ChangeReply>().await });
    tokio::pin!(first_bad);
    let (mut fired, mut during) = (false, None);
    let reply: ChangeReply = loop {
        tokio::select! {
            r = &mut call => break r??,
            d = &mut first_bad, if !fired => (fired, during) = (true, d),
        }
    };
    row.reload_s = Some(t.elapsed().as_secs_f64());
    anyhow::ensure!(reply.changed && reply.error_message.is_empty(), "{url}: {reply:?}");
    row.moved = Some(reply.nodes.iter().map(|n| n.moved as u64).sum());
    row.moved_bound = Some((ctx.hosts as f64 * 1.1 / larger as f64).ceil() as u64);
    let addr = ctx.cluster.metas[node].addr;
    loop {
        let held = get_health(ctx.client, addr).await.map(|h| h.hosts);
        let settled = match scenario {
            Scenario::GrowMeta => held.is_some_and(|h| h >= want),
            _ => held == Some(0),
        };
        if settled && copies_held(ctx.client, ctx.cluster).await == 0 {
            row.settled_s = Some(t.elapsed().as_secs_f64());
            break;
        }
        if t.elapsed() > ctx.limit() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let whole = ctx.sampler.all_whole(start, Instant::now(), ctx.hosts);
    row.whole_throughout = Some(whole.is_ok());
    if let Err(why) = whole {
        let explained = match during {
            Some(d) => format!("during the reload: {d}"),
            None => format!("after it: {}", explain_count(ctx).await),
        };
        row.not_whole = Some(format!("{why}; {explained}"));
    }
    row.rss_fault = ctx.rss();
    if scenario == Scenario::ShrinkMeta {
        let mut left = ctx.cluster.metas.remove(node);
        tokio::task::block_in_place(|| left.stop(Duration::from_secs(60)));
    }
    Ok(Instant::now())
}

async fn get_health(client: &reqwest::Client, addr: SocketAddr) -> Option<Health> {
    client.get(crate::cluster::meta_url(addr, "/health")).send().await.ok()?.json().await.ok()
}

/// The bench's host number of a listed hostname (see `load::hostname`).
fn host_number(name: &str) -> Option<u64> {
    let i: u64 = name.rsplit('-').next()?.parse().ok()?;
    (load::hostname(i) == name).then_some(i)
}

/// Streams meta node 1's whole text listing: (rows, hosts missing, hosts listed more than
/// once, partial).
pub async fn check_listing(client: &reqwest::Client, meta: SocketAddr, hosts: u64) -> anyhow::Result<(u64, u64, u64, bool)> {
    let (rows, seen, strange, partial) = listing_counts(client, meta, hosts).await?;
    let missing = seen.iter().filter(|&&c| c == 0).count() as u64;
    let twice = seen.iter().filter(|&&c| c > 1).count() as u64 + strange;
    Ok((rows, missing, twice, partial))
}

/// Streams meta node 1's text listing: (rows, how often each bench host was listed, rows
/// that name no bench host, partial).
async fn listing_counts(client: &reqwest::Client, meta: SocketAddr, hosts: u64) -> anyhow::Result<(u64, Vec<u8>, u64, bool)> {
    let resp = client.get(crate::cluster::meta_url(meta, "/status/text/falcon-agent")).send().await?;
    let partial = resp.headers().get("x-ops-partial").is_some_and(|v| v == "true");
    let mut seen = vec![0u8; hosts as usize];
    let (mut rows, mut strange, mut partial_line) = (0u64, 0u64, false);
    let mut stream = resp.bytes_stream();
    let mut carry: Vec<u8> = Vec::new();
    let mut line = |l: &[u8]| {
        if l.is_empty() {
            return;
        }
        if l[0] == b'#' {
            partial_line |= l.starts_with(b"#partial");
            return;
        }
        rows += 1;
        let name = l.split(|&b| b == b'\t').next().and_then(|n| std::str::from_utf8(n).ok()).unwrap_or("");
        match host_number(name).filter(|&i| i < hosts) {
            Some(i) => seen[i as usize] = seen[i as usize].saturating_add(1),
            None => strange += 1,
        }
    };
    while let Some(chunk) = stream.next().await {
        carry.extend_from_slice(&chunk?);
        let mut start = 0;
        while let Some(p) = carry[start..].iter().position(|&b| b == b'\n') {
            line(&carry[start..start + p]);
            start += p + 1;
        }
        carry.drain(..start);
    }
    line(&carry);
    Ok((rows, seen, strange, partial || partial_line))
}

/// What the cluster says of the hosts a summary did not count: the listing's missing and
/// doubled hosts, every meta node's `/health` host count, and meta node 1's view of two
/// hosts the listing left out (for a report; errors are said in it).
async fn explain_count(ctx: &Ctx<'_>) -> String {
    let metas: Vec<(String, SocketAddr)> = ctx.cluster.metas.iter().map(|m| (m.name.clone(), m.addr)).collect();
    explain_count_at(ctx.client, &metas, ctx.hosts).await
}

async fn explain_count_at(client: &reqwest::Client, metas: &[(String, SocketAddr)], hosts: u64) -> String {
    let mut out = Vec::new();
    let meta = metas[0].1;
    match listing_counts(client, meta, hosts).await {
        Ok((rows, seen, strange, partial)) => {
            let missing: Vec<u64> = (0..hosts).filter(|&i| seen[i as usize] == 0).collect();
            let twice = seen.iter().filter(|&&c| c > 1).count() as u64 + strange;
            out.push(format!("listing then: {rows} rows, {} missing, {twice} twice, partial {partial}", missing.len()));
            for &i in missing.iter().take(2) {
                let name = load::hostname(i);
                let url = crate::cluster::meta_url(meta, &format!("/status/host/{name}"));
                let got = match client.get(&url).send().await {
                    Ok(r) => format!("{} {}", r.status().as_u16(), r.text().await.unwrap_or_default()),
                    Err(e) => e.to_string(),
                };
                out.push(format!("{name}: {}", got.chars().take(400).collect::<String>()));
            }
        }
        Err(e) => out.push(format!("listing then: {e:#}")),
    }
    for (name, addr) in metas {
        let h = get_health(client, *addr).await;
        let (hosts, generation) = match &h {
            Some(h) => (h.hosts.to_string(), h.cluster_generation.map_or_else(|| "null".to_owned(), |g| g.to_string())),
            None => ("-".to_owned(), "-".to_owned()),
        };
        out.push(format!("{name}: hosts {hosts} generation {generation}"));
    }
    out.join("; ")
}

/// Failover copies every meta node holds now (`ops_meta_failover_copies`).
async fn copies_held(client: &reqwest::Client, cluster: &Cluster) -> u64 {
    let mut total = 0.0;
    for m in &cluster.metas {
        if let Ok(r) = client.get(crate::cluster::meta_url(m.addr, "/metrics")).send().await
            && let Ok(text) = r.text().await
        {
            total += ops_config::prom::sum(&text, "ops_meta_failover_copies");
        }
    }
    total as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_numbers_come_back_only_from_the_bench_names() {
        assert_eq!(host_number(&load::hostname(0)), Some(0));
        assert_eq!(host_number(&load::hostname(1234567)), Some(1234567));
        assert_eq!(host_number(&load::hostname(17)), Some(17));
        assert_eq!(host_number("dc2-host-0000017"), None, "17 lives in dc1");
        assert_eq!(host_number("other"), None);
    }
}
