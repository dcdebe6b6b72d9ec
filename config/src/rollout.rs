//! Staged rollouts, the pure part: who is in which wave, when a wave may open, when a rollout
//! halts. No clock, no network: every function takes the time it needs, so a relay, a meta
//! node and a test given the same inputs decide the same thing.
//!
//! Membership: a host's bucket for a rollout is the first 8 bytes of
//! `md5("{agent}/{target version}/{hostname}")` read as a big-endian u64, mod 10000. It is in
//! wave k (1-based) when k is the first wave with `bucket < waves[k-1] × 100`. An operator can
//! compute it in a shell:
//! `printf %s 'falcon-agent/5.1.5/bj-web-001' | md5sum | cut -c1-16 | xargs -I{} python3 -c 'print(0x{} % 10000)'`.
//!
//! A meta node judges its own shard (a uniform sample of the fleet, thanks to the ring) and
//! publishes an `approved_wave` that only grows and a `halted` flag that only goes from false to
//! true ([`NodeRollout::judge`]); the fleet's wave is the minimum over all nodes and the fleet is
//! halted if any node is ([`fleet_state`]).

use std::fmt;

use md5::{Digest, Md5};

/// Buckets per rollout: a wave's percent × 100 buckets.
pub const BUCKETS: u16 = 10_000;

/// Most waves in one rollout: a host's wave is kept in 4 bits.
pub const MAX_WAVES: usize = 15;

/// The bucket of `hostname` in the rollout of `agent` to `target` (0..10000).
pub fn bucket(agent: &str, target: &str, hostname: &str) -> u16 {
    let mut md5 = Md5::new();
    md5.update(agent.as_bytes());
    md5.update(b"/");
    md5.update(target.as_bytes());
    md5.update(b"/");
    md5.update(hostname.as_bytes());
    let digest = md5.finalize();
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(head) % u64::from(BUCKETS)) as u16
}

/// Whether an agent's `./control status` text says it runs (seed 003: "started").
pub fn is_started(status: &str) -> bool {
    status.contains("started")
}

/// Converged for a rollout: the host reports the target version (`on_target`), runs as the
/// target's `cmd` wants (`started` for "start") and reported no `lastError`.
pub fn is_converged(on_target: bool, status: &str, cmd: &str, has_error: bool) -> bool {
    on_target && !has_error && is_started(status) == (cmd == "start")
}

/// The wave (1-based) a bucket belongs to, given the cumulative wave percents (ending at 100).
pub fn wave_of(waves: &[u8], bucket: u16) -> usize {
    waves.iter().position(|&p| bucket < u16::from(p) * 100).map_or(waves.len(), |i| i + 1)
}

/// Whether a host in `bucket` is told the target when the fleet is at `fleet_wave` (0: nobody).
pub fn is_member(waves: &[u8], fleet_wave: usize, bucket: u16) -> bool {
    fleet_wave > 0 && wave_of(waves, bucket) <= fleet_wave
}

/// The judging part of an agent's `[agent.rollout]`. Ratios are in basis points (1/10000) so
/// every node compares them exactly alike.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Policy {
    /// Cumulative percents of the fleet, strictly increasing, ending at 100.
    pub waves: Vec<u8>,
    /// Minimum seconds a wave stays open before the next may open.
    pub soak_seconds: u64,
    /// Share of a wave's hosts converged before the next may open (basis points).
    pub advance_at_bp: u16,
    /// A host told to change and not converged after this many seconds counts as failed.
    pub deadline_seconds: u64,
    /// Halt when failed / decided ≥ this (basis points) …
    pub failed_ratio_bp: u16,
    /// … with at least this many decided hosts.
    pub min_sample: u64,
    pub paused: bool,
    pub abort: bool,
}

/// What a node counted in its shard for one wave (hosts of that wave only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WaveCounts {
    /// Hosts of the wave held by this node.
    pub targeted: u64,
    /// Reporting the target version, started, no `lastError`.
    pub converged: u64,
    /// `lastError` for the target, told ≥ deadline ago and not converged, or the target
    /// reported but not started.
    pub failed: u64,
    /// Stale: not failures, not converged.
    pub silent: u64,
    /// Pinned by an operator on the host (`pin.toml`): neither converged nor failed, and not
    /// part of the share a wave needs converged before the next opens.
    pub pinned: u64,
}

/// What one node publishes for one rollout (agent + target version).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeRollout {
    /// 0: nobody yet; k: waves 1..=k approved. Only grows.
    pub approved_wave: usize,
    /// Unix seconds when `approved_wave` was approved (0 before the first).
    pub wave_opened_at: u64,
    /// Only goes from false to true.
    pub halted: bool,
}

/// Why a node decided what it did, for `/rollout` and the logs.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The first wave opened (or the next one did).
    Opened(usize),
    Halted {
        failed: u64,
        decided: u64,
    },
    Waiting(&'static str),
    Done,
}

impl NodeRollout {
    /// One judgement of this node's shard at `now` (unix seconds), `counts[k-1]` for wave k,
    /// `window_open` whether the rollout window (if any) is open now. Returns the new state,
    /// which never has a lower wave nor un-halts.
    pub fn judge(self, policy: &Policy, counts: &[WaveCounts], now: u64, window_open: bool) -> (NodeRollout, Verdict) {
        if self.halted {
            return (self, Verdict::Waiting("halted"));
        }
        // Failures anywhere among the waves opened so far halt the rollout.
        let (failed, converged) = counts.iter().take(self.approved_wave).fold((0, 0), |(f, c), w| (f + w.failed, c + w.converged));
        let decided = failed + converged;
        if decided >= policy.min_sample && decided > 0 && failed * 10_000 >= u64::from(policy.failed_ratio_bp) * decided {
            return (NodeRollout { halted: true, ..self }, Verdict::Halted { failed, decided });
        }
        if self.approved_wave >= policy.waves.len() {
            return (self, Verdict::Done);
        }
        if policy.abort {
            return (self, Verdict::Waiting("aborted"));
        }
        if policy.paused {
            return (self, Verdict::Waiting("paused"));
        }
        if !window_open {
            return (self, Verdict::Waiting("outside the window"));
        }
        if self.approved_wave > 0 {
            if now < self.wave_opened_at.saturating_add(policy.soak_seconds) {
                return (self, Verdict::Waiting("soaking"));
            }
            let w = counts.get(self.approved_wave - 1).copied().unwrap_or_default();
            if w.converged * 10_000 < u64::from(policy.advance_at_bp) * w.targeted.saturating_sub(w.pinned) {
                return (self, Verdict::Waiting("wave not converged"));
            }
        }
        let next = self.approved_wave + 1;
        (NodeRollout { approved_wave: next, wave_opened_at: now, halted: false }, Verdict::Opened(next))
    }
}

/// The fleet's view from every node's published state: the lowest approved wave (a node that
/// has not loaded the rollout, or was never heard from, counts as 0) and whether any halted.
pub fn fleet_state(nodes: &[Option<NodeRollout>]) -> (usize, bool) {
    let wave = nodes.iter().map(|n| n.map_or(0, |n| n.approved_wave)).min().unwrap_or(0);
    (wave, nodes.iter().any(|n| n.is_some_and(|n| n.halted)))
}

/// What a node counted for one wave of a rollout, as published (`/internal/rollout`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaveReport {
    /// The wave's cumulative percent of the fleet.
    pub percent: u8,
    pub targeted: u64,
    /// Hosts whose last report says they were answered the target.
    pub told: u64,
    pub converged: u64,
    pub failed: u64,
    pub silent: u64,
    /// Hosts an operator pinned locally (see [`WaveCounts::pinned`]).
    #[serde(default)]
    pub pinned: u64,
    /// Hosts that failed at some point of this rollout: failing now, or failed before a halt
    /// (or an abort) answered them `from` again, which `failed` no longer counts.
    #[serde(default)]
    pub failed_total: u64,
    /// Of those, the hosts no longer told the target that report `from` again.
    #[serde(default)]
    pub back_on_from: u64,
}

impl WaveReport {
    pub fn counts(&self) -> WaveCounts {
        WaveCounts { targeted: self.targeted, converged: self.converged, failed: self.failed, silent: self.silent, pinned: self.pinned }
    }

    /// Adds another node's counts of the same wave.
    pub fn add(&mut self, o: &WaveReport) {
        self.targeted += o.targeted;
        self.told += o.told;
        self.converged += o.converged;
        self.failed += o.failed;
        self.silent += o.silent;
        self.pinned += o.pinned;
        self.failed_total += o.failed_total;
        self.back_on_from += o.back_on_from;
    }
}

/// One node's published state of one rollout (agent + target version).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutReport {
    pub agent: String,
    pub target: String,
    #[serde(default)]
    pub from: String,
    pub approved_wave: usize,
    #[serde(default)]
    pub wave_opened_at: u64,
    pub halted: bool,
    /// Why it halted (empty while not halted).
    #[serde(default)]
    pub halt_reason: String,
    /// The node's last decision in words ("soaking", "wave 2 opened", …).
    #[serde(default)]
    pub verdict: String,
    /// The fleet's wave as this node sees it.
    #[serde(default)]
    pub fleet_wave: usize,
    /// Per wave, this node's shard.
    #[serde(default)]
    pub waves: Vec<WaveReport>,
}

impl RolloutReport {
    pub fn state(&self) -> NodeRollout {
        NodeRollout { approved_wave: self.approved_wave, wave_opened_at: self.wave_opened_at, halted: self.halted }
    }
}

/// A meta node's `/internal/rollout`: every rollout of the config it has loaded.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: String,
    /// Unix seconds of the judgement these figures come from.
    pub at: u64,
    pub rollouts: Vec<RolloutReport>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Opened(k) => write!(f, "wave {k} opened"),
            Verdict::Halted { failed, decided } => write!(f, "halted: {failed} of {decided} decided hosts failed"),
            Verdict::Waiting(why) => f.write_str(why),
            Verdict::Done => f.write_str("every wave open"),
        }
    }
}

/// Days and hours in which waves may open, in a fixed offset from UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    /// Bit d set: day d is allowed (0 = Monday … 6 = Sunday).
    pub days: u8,
    /// Minutes after local midnight; `start == end` is the whole day, `start > end` wraps.
    pub start_minute: u16,
    pub end_minute: u16,
    /// Local time = UTC + this.
    pub offset_minutes: i32,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

impl Window {
    /// Parses `days` ("mon-fri", "sat,sun", "fri-mon", "all"), `hours` ("09:00-17:00",
    /// "22:00-06:00", "00:00-00:00" for all day) and `tz` ("UTC", "+08:00", "-05:30").
    pub fn parse(days: &str, hours: &str, tz: &str) -> Result<Window, String> {
        Window { days: parse_days(days)?, start_minute: 0, end_minute: 0, offset_minutes: parse_tz(tz)? }.with_hours(hours)
    }

    fn with_hours(mut self, hours: &str) -> Result<Window, String> {
        let (a, b) = hours.split_once('-').ok_or_else(|| format!("hours must be HH:MM-HH:MM, got {hours:?}"))?;
        self.start_minute = parse_hhmm(a)?;
        self.end_minute = parse_hhmm(b)?;
        Ok(self)
    }

    /// Whether `unix` (seconds) falls inside the window.
    pub fn contains(&self, unix: u64) -> bool {
        let local = unix as i64 + i64::from(self.offset_minutes) * 60;
        let days = local.div_euclid(86_400);
        let minute = (local.rem_euclid(86_400) / 60) as u16;
        // 1970-01-01 was a Thursday (3 with Monday = 0).
        let weekday = (days + 3).rem_euclid(7) as u8;
        let (start, end) = (self.start_minute, self.end_minute);
        let (in_hours, day) = if start == end {
            (true, weekday)
        } else if start < end {
            (minute >= start && minute < end, weekday)
        } else if minute >= start {
            (true, weekday)
        } else {
            // After midnight in a window that started the day before: that day must be allowed.
            (minute < end, (weekday + 6) % 7)
        };
        in_hours && self.days & (1 << day) != 0
    }
}

fn parse_days(s: &str) -> Result<u8, String> {
    let day = |d: &str| DAYS.iter().position(|x| x.eq_ignore_ascii_case(d.trim())).ok_or_else(|| format!("unknown day {d:?}"));
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(0x7f);
    }
    let mut mask = 0u8;
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    mask |= 1 << d;
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => mask |= 1 << day(part)?,
        }
    }
    Ok(mask)
}

fn parse_hhmm(s: &str) -> Result<u16, String> {
    let bad = || format!("time must be HH:MM (00:00-24:00), got {s:?}");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok((h * 60 + m) % (24 * 60))
}

fn parse_tz(s: &str) -> Result<i32, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("UTC") || s.eq_ignore_ascii_case("Z") {
        return Ok(0);
    }
    let bad = || format!("tz must be \"UTC\" or a fixed offset like \"+08:00\", got {s:?}");
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let minutes = parse_hhmm(rest).map_err(|_| bad())?;
    if minutes > 14 * 60 {
        return Err(bad());
    }
    Ok(sign * i32::from(minutes))
}

/// Parses a ratio in (0, 1] into basis points.
pub fn ratio_bp(r: f64) -> Result<u16, String> {
    if r > 0.0 && r <= 1.0 { Ok((r * 10_000.0).round() as u16) } else { Err(format!("must be a ratio in (0, 1], got {r}")) }
}

/// Parses a duration like "90s", "15m", "2h", "1d" into seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let bad = || format!("duration must be a number with s, m, h or d (\"15m\"), got {s:?}");
    let unit = match s.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86_400,
        _ => return Err(bad()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    n.checked_mul(unit).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed independently (Python's hashlib) from the rule in the module doc: a build that
    /// changes any of these moves hosts between waves.
    #[test]
    fn membership_golden() {
        for (agent, target, host, want) in [
            ("falcon-agent", "5.1.5", "bj-web-001", 5710),
            ("falcon-agent", "5.1.5", "dc1-host-0000001", 9660),
            ("falcon-agent", "5.1.6", "bj-web-001", 5974),
            ("naming-agent", "1.2.0", "gz-db-42", 730),
            ("x", "1", "a", 5261),
        ] {
            assert_eq!(bucket(agent, target, host), want, "{agent}/{target}/{host}");
        }
    }

    #[test]
    fn waves_are_cumulative_and_cover_every_bucket() {
        let waves = [1, 5, 25, 100];
        assert_eq!(wave_of(&waves, 0), 1);
        assert_eq!(wave_of(&waves, 99), 1);
        assert_eq!(wave_of(&waves, 100), 2);
        assert_eq!(wave_of(&waves, 499), 2);
        assert_eq!(wave_of(&waves, 2500), 4);
        assert_eq!(wave_of(&waves, 9999), 4);
        assert!(!is_member(&waves, 0, 0), "wave 0: nobody");
        assert!(is_member(&waves, 1, 99));
        assert!(!is_member(&waves, 1, 100));
        assert!(is_member(&waves, 4, 9999));
        // Over many hostnames a wave holds its share (1 % ± 0.2 of 100,000).
        let first: usize = (0..100_000).filter(|i| wave_of(&waves, bucket("a", "2", &format!("h{i}"))) == 1).count();
        assert!((800..1200).contains(&first), "{first}");
    }

    fn policy() -> Policy {
        Policy {
            waves: vec![1, 5, 25, 100],
            soak_seconds: 60,
            advance_at_bp: 9500,
            deadline_seconds: 600,
            failed_ratio_bp: 500,
            min_sample: 20,
            paused: false,
            abort: false,
        }
    }

    fn counts(waves: &[(u64, u64, u64)]) -> Vec<WaveCounts> {
        waves.iter().map(|&(targeted, converged, failed)| WaveCounts { targeted, converged, failed, silent: 0, pinned: 0 }).collect()
    }

    #[test]
    fn a_wave_opens_after_its_soak_once_converged() {
        let p = policy();
        let s = NodeRollout::default();
        let (s, v) = s.judge(&p, &counts(&[(10, 0, 0)]), 1000, true);
        assert_eq!((s.approved_wave, s.wave_opened_at, v), (1, 1000, Verdict::Opened(1)), "the first wave opens at once");
        let (s2, v) = s.judge(&p, &counts(&[(10, 10, 0)]), 1030, true);
        assert_eq!((s2, v), (s, Verdict::Waiting("soaking")));
        let (s2, v) = s.judge(&p, &counts(&[(100, 94, 0)]), 1060, true);
        assert_eq!((s2, v), (s, Verdict::Waiting("wave not converged")));
        let (s2, v) = s.judge(&p, &counts(&[(100, 95, 0)]), 1060, true);
        assert_eq!((s2.approved_wave, v), (2, Verdict::Opened(2)));
        let done = NodeRollout { approved_wave: 4, wave_opened_at: 0, halted: false };
        assert_eq!(done.judge(&p, &counts(&[(1, 1, 0); 4]), 9999, true).1, Verdict::Done);
    }

    #[test]
    fn pinned_hosts_neither_hold_a_wave_nor_count_as_failed() {
        let p = policy();
        let s = NodeRollout { approved_wave: 1, wave_opened_at: 1000, halted: false };
        // 100 hosts, 10 pinned, 86 of the other 90 converged (95.6 %): the next wave opens.
        let mut w = counts(&[(100, 86, 0)]);
        w[0].pinned = 10;
        assert_eq!(s.judge(&p, &w, 2000, true).1, Verdict::Opened(2));
        // Without the pins the same wave is short of 95 %.
        w[0].pinned = 0;
        assert_eq!(s.judge(&p, &w, 2000, true).1, Verdict::Waiting("wave not converged"));
        // A wave all pinned does not hold the rollout either.
        let all = [WaveCounts { targeted: 30, converged: 0, failed: 0, silent: 0, pinned: 30 }];
        assert_eq!(s.judge(&p, &all, 2000, true).1, Verdict::Opened(2));
    }

    #[test]
    fn failures_halt_and_a_halt_is_final() {
        let p = policy();
        let s = NodeRollout { approved_wave: 1, wave_opened_at: 0, halted: false };
        // 19 decided hosts: under min_sample, no halt yet even at 100 % failed.
        let (s2, _) = s.judge(&p, &counts(&[(40, 0, 19)]), 10, true);
        assert!(!s2.halted);
        let (s2, v) = s.judge(&p, &counts(&[(40, 19, 1)]), 10, true);
        assert_eq!((s2.halted, v), (true, Verdict::Halted { failed: 1, decided: 20 }), "1/20 = 5 %: halts");
        let (s3, v) = s2.judge(&p, &counts(&[(40, 40, 0)]), 99_999, true);
        assert_eq!((s3, v), (s2, Verdict::Waiting("halted")), "a halted node never opens a wave again");
        // Failures only count among the opened waves.
        let (s4, _) = s.judge(&p, &counts(&[(40, 40, 0), (100, 0, 100)]), 100, true);
        assert!(!s4.halted);
    }

    #[test]
    fn pause_abort_and_window_hold_the_wave() {
        let mut p = policy();
        let s = NodeRollout { approved_wave: 1, wave_opened_at: 0, halted: false };
        let good = counts(&[(10, 10, 0)]);
        p.paused = true;
        assert_eq!(s.judge(&p, &good, 1000, true), (s, Verdict::Waiting("paused")));
        p.paused = false;
        p.abort = true;
        assert_eq!(s.judge(&p, &good, 1000, true), (s, Verdict::Waiting("aborted")));
        p.abort = false;
        assert_eq!(s.judge(&p, &good, 1000, false), (s, Verdict::Waiting("outside the window")));
        assert_eq!(s.judge(&p, &good, 1000, true).0.approved_wave, 2);
    }

    #[test]
    fn the_fleet_is_at_the_lowest_wave_and_halted_if_any_node_is() {
        let n = |w, h| Some(NodeRollout { approved_wave: w, wave_opened_at: 0, halted: h });
        assert_eq!(fleet_state(&[n(3, false), n(2, false), n(4, false)]), (2, false));
        assert_eq!(fleet_state(&[n(3, false), None, n(4, false)]), (0, false), "a node without the rollout holds it at 0");
        assert_eq!(fleet_state(&[n(3, false), n(3, true)]), (3, true));
        assert_eq!(fleet_state(&[]), (0, false));
    }

    #[test]
    fn windows_by_day_hour_and_offset() {
        // 2026-11-23 was a Monday. 10:00 UTC that day:
        let mon_10 = 1_795_428_000;
        let w = Window::parse("mon-fri", "09:00-17:00", "UTC").unwrap();
        assert!(w.contains(mon_10));
        assert!(!w.contains(mon_10 + 8 * 3600), "18:00");
        assert!(!w.contains(mon_10 - 2 * 86_400), "Saturday");
        // 10:00 UTC is 18:00 at +08:00: outside 09-17 there.
        let east = Window::parse("mon-fri", "09:00-17:00", "+08:00").unwrap();
        assert!(!east.contains(mon_10));
        assert!(east.contains(mon_10 - 6 * 3600), "04:00 UTC = 12:00 local");
        // A night window wraps: Friday 22:00 to Saturday 06:00 belongs to Friday.
        let night = Window::parse("fri", "22:00-06:00", "UTC").unwrap();
        let fri_23 = mon_10 + 4 * 86_400 + 13 * 3600;
        assert!(night.contains(fri_23));
        assert!(night.contains(fri_23 + 4 * 3600), "Saturday 03:00, still Friday's night");
        assert!(!night.contains(fri_23 + 24 * 3600), "Saturday 23:00");
        assert!(Window::parse("sat,sun", "00:00-00:00", "UTC").unwrap().contains(mon_10 - 86_400));
        assert!(Window::parse("fri-mon", "00:00-24:00", "-05:30").unwrap().contains(mon_10));
        for (days, hours, tz) in
            [("funday", "09:00-17:00", "UTC"), ("mon", "9-17", "UTC"), ("mon", "09:60-17:00", "UTC"), ("mon", "09:00-17:00", "CET")]
        {
            assert!(Window::parse(days, hours, tz).is_err(), "{days} {hours} {tz}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("2h"), Ok(7200));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        for bad in ["", "15", "m", "1.5h", "-1m", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
