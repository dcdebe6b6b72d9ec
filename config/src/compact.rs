//! The compact batch encoding (relay → meta node, meta node → meta node).
//!
//! A relay has already parsed and validated every heartbeat it forwards; sending the JSON on
//! made the owner parse all of it again (about 540 bytes of JSON per host state, most of it
//! field names). This encoding carries the same fields with no names and no escapes, so the
//! owner decodes with a few length reads and one UTF-8 check per string, and the relay's
//! buffers hold less than half the bytes. It is internal: updaters never see it, and
//! `POST /internal/batch` still takes the JSON [`Batch`](crate::Batch) (older relays).
//!
//! Layout (all integers little-endian; `str` = LEB128 length, then that many UTF-8 bytes):
//! ```text
//! batch   = "OPB5" record*
//! record  = seen:u32 told:u8 auth:u8 [serial:u64] relay:str hostname:str ip:str runUser:str updaterVersion:str agents:u8 agent*
//! agent   = name:str version:str status:str timestamp:i64 runUser:str workDir:str lastError:str pinned:str
//! ```
//! `told` is the rollout mask the relay answered the host with (bit r: it was told rollout r's
//! target, see `DesiredConfig::rollout_mask`). `auth` is 1 when the report carried a host
//! credential the relay checked (`crate::enroll`; `serial` is the credential's), 0 when it
//! carried none. `relay` is the id of the relay the report came
//! through (empty: straight to a meta node), kept per record because failover copies handed
//! back between meta nodes mix relays; it is checked by [`valid_relay_id`]. A batch starting
//! `OPB4` (before enrollment) has no `auth` byte and decodes as unauthenticated; `OPB3` (before silence by relay) has no `relay` string and decodes with an empty one; `OPB2`
//! (before local pins) has no `pinned` string either and decodes with no pin; `OPB1` (relays
//! before staged rollouts) has no `told` byte either and decodes with `told` = 0. Every decoded heartbeat is validated
//! exactly as one that came alone. A node reads every older layout but writes only the newest,
//! so a cluster is upgraded meta nodes first, then relays.

use std::borrow::Cow;

use crate::wire::{Heartbeat, MAX_AGENTS_PER_HOST, MAX_BATCH_BYTES, RealAgent, WireError};

/// `Content-Type` of a compact batch.
pub const CONTENT_TYPE: &str = "application/x-ops-batch";
const MAGIC: &[u8; 4] = b"OPB5";
/// Before enrollment: no `auth` byte in records.
const MAGIC_V4: &[u8; 4] = b"OPB4";
/// Before silence by relay: no `relay` string in records.
const MAGIC_V3: &[u8; 4] = b"OPB3";
/// Before local pins: no `pinned` string in agents.
const MAGIC_V2: &[u8; 4] = b"OPB2";
/// Before staged rollouts: no `told` byte either.
const MAGIC_V1: &[u8; 4] = b"OPB1";

/// Starts a batch body.
pub fn begin(out: &mut Vec<u8>) {
    out.extend_from_slice(MAGIC);
}

/// What a record carries besides the heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record<'a> {
    /// When the report was received (unix seconds, the relay's clock).
    pub seen: u32,
    /// The rollout mask it was answered with.
    pub told: u8,
    /// The relay it came through (empty: straight to a meta node).
    pub relay: &'a str,
    /// The serial of the host credential it carried, checked by the relay (or meta node)
    /// that took it (None: it carried none).
    pub auth: Option<u64>,
}

/// 0-64 of `[A-Za-z0-9._-]`: a relay id as records carry it (empty: no relay).
pub fn valid_relay_id(s: &str) -> bool {
    s.is_empty() || crate::wire::valid_agent_name(s)
}

/// Appends one host's record. The heartbeat must be valid (it came through
/// [`Heartbeat::parse`]) and the relay id too ([`valid_relay_id`]).
pub fn encode(rec: Record<'_>, hb: &Heartbeat<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(&rec.seen.to_le_bytes());
    out.push(rec.told);
    match rec.auth {
        None => out.push(0),
        Some(serial) => {
            out.push(1);
            out.extend_from_slice(&serial.to_le_bytes());
        }
    }
    put_str(out, rec.relay);
    for s in [&hb.hostname, &hb.ip, &hb.run_user, &hb.updater_version] {
        put_str(out, s);
    }
    // Validation caps agents at 64; the cast cannot truncate a valid heartbeat.
    out.push(hb.real_agents.len().min(usize::from(u8::MAX)) as u8);
    for a in &hb.real_agents {
        put_str(out, &a.name);
        put_str(out, &a.version);
        put_str(out, &a.status);
        out.extend_from_slice(&a.timestamp.to_le_bytes());
        put_str(out, &a.run_user);
        put_str(out, &a.work_dir);
        put_str(out, &a.last_error);
        put_str(out, &a.pinned);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len();
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(s.as_bytes());
}

/// Decodes a batch, calling `f(record, heartbeat)` for each record in order after validating it.
/// The heartbeat borrows from `body`; its agent list is reused between calls. Stops at the
/// first error; callers that must not act on half a batch use [`check`] and [`decode_checked`].
pub fn decode<'a>(body: &'a [u8], f: impl FnMut(Record<'a>, &Heartbeat<'a>)) -> Result<usize, WireError> {
    decode_inner(body, true, f)
}

/// [`decode`] of a body that [`check`] accepted: the wire rules are not checked again (the
/// reads still are, so a body changed in between gives an error, never a wrong record).
pub fn decode_checked<'a>(body: &'a [u8], f: impl FnMut(Record<'a>, &Heartbeat<'a>)) -> Result<usize, WireError> {
    decode_inner(body, false, f)
}

fn decode_inner<'a>(body: &'a [u8], validate: bool, mut f: impl FnMut(Record<'a>, &Heartbeat<'a>)) -> Result<usize, WireError> {
    if body.len() > MAX_BATCH_BYTES {
        return Err(WireError::TooLarge { size: body.len(), limit: MAX_BATCH_BYTES });
    }
    let mut r = Reader { buf: body, at: 0 };
    let (has_told, has_pin, has_relay, has_auth) = match r.take(4)? {
        m if m == MAGIC => (true, true, true, true),
        m if m == MAGIC_V4 => (true, true, true, false),
        m if m == MAGIC_V3 => (true, true, false, false),
        m if m == MAGIC_V2 => (true, false, false, false),
        m if m == MAGIC_V1 => (false, false, false, false),
        _ => return Err(WireError::Malformed("compact batch: bad magic".into())),
    };
    let mut hb = Heartbeat {
        hostname: Cow::Borrowed(""),
        ip: Cow::Borrowed(""),
        run_user: Cow::Borrowed(""),
        updater_version: Cow::Borrowed(""),
        real_agents: Vec::new(),
    };
    let mut n = 0;
    while r.at < body.len() {
        let seen = u32::from_le_bytes(r.array()?);
        let told = if has_told { r.take(1)?[0] } else { 0 };
        let auth = match if has_auth { r.take(1)?[0] } else { 0 } {
            0 => None,
            1 => Some(u64::from_le_bytes(r.array()?)),
            _ => return Err(WireError::Malformed("compact batch: bad auth byte".into())),
        };
        let relay = if has_relay { r.str()? } else { "" };
        hb.hostname = Cow::Borrowed(r.str()?);
        hb.ip = Cow::Borrowed(r.str()?);
        hb.run_user = Cow::Borrowed(r.str()?);
        hb.updater_version = Cow::Borrowed(r.str()?);
        let agents = usize::from(r.take(1)?[0]);
        if agents > MAX_AGENTS_PER_HOST {
            return Err(WireError::TooManyAgents { host: hb.hostname.to_string(), count: agents });
        }
        hb.real_agents.clear();
        for _ in 0..agents {
            let name = r.str()?;
            let version = r.str()?;
            let status = r.str()?;
            let timestamp = i64::from_le_bytes(r.array()?);
            hb.real_agents.push(RealAgent {
                name: Cow::Borrowed(name),
                version: Cow::Borrowed(version),
                status: Cow::Borrowed(status),
                timestamp,
                run_user: Cow::Borrowed(r.str()?),
                work_dir: Cow::Borrowed(r.str()?),
                last_error: Cow::Borrowed(r.str()?),
                pinned: Cow::Borrowed(if has_pin { r.str()? } else { "" }),
            });
        }
        if validate {
            hb.validate()?;
            if !valid_relay_id(relay) {
                return Err(WireError::Malformed(format!("compact batch: bad relay id {relay:?} (0-64 of [A-Za-z0-9._-])")));
            }
        }
        f(Record { seen, told, relay, auth }, &hb);
        n += 1;
    }
    Ok(n)
}

/// Decodes and validates a whole batch without acting on it: the number of records.
pub fn check(body: &[u8]) -> Result<usize, WireError> {
    check_from(body, None)
}

/// [`check`], and with `sender` (the relay a certificate names) every record must name that
/// relay: a relay posts only the reports it received itself.
pub fn check_from(body: &[u8], sender: Option<&str>) -> Result<usize, WireError> {
    let mut other = None;
    let n = decode(body, |rec, hb| {
        if other.is_none()
            && let Some(s) = sender.filter(|&s| s != rec.relay)
        {
            other = Some(WireError::NotThisRelay { host: hb.hostname.to_string(), claimed: rec.relay.to_owned(), sender: s.to_owned() });
        }
    })?;
    other.map_or(Ok(n), Err)
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(truncated)?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn str(&mut self) -> Result<&'a str, WireError> {
        let mut len = 0usize;
        for shift in (0..=21).step_by(7) {
            let b = self.take(1)?[0];
            len |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                // One encoding per length (no trailing zero groups), so a batch that decodes
                // re-encodes to the same bytes.
                if b == 0 && shift > 0 {
                    return Err(WireError::Malformed("compact batch: a string length is not in its shortest form".into()));
                }
                let bytes = self.take(len)?;
                return std::str::from_utf8(bytes).map_err(|_| WireError::Malformed("compact batch: a string is not UTF-8".into()));
            }
        }
        Err(WireError::Malformed("compact batch: string length too long".into()))
    }
}

fn truncated() -> WireError {
    WireError::Malformed("compact batch: truncated record".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(json: &str) -> Heartbeat<'_> {
        Heartbeat::parse(json.as_bytes()).unwrap()
    }

    fn batch(entries: &[(u32, &Heartbeat<'_>)]) -> Vec<u8> {
        let mut out = Vec::new();
        begin(&mut out);
        for (i, (seen, h)) in entries.iter().enumerate() {
            encode(Record { seen: *seen, told: i as u8, relay: "dc1-1", auth: (i % 2 == 1).then_some(i as u64 * 1000) }, h, &mut out);
        }
        out
    }

    fn decoded(body: &[u8]) -> Result<Vec<(u32, Heartbeat<'static>)>, WireError> {
        let mut out = Vec::new();
        let mut n = 0u8;
        decode(body, |rec, h| {
            assert_eq!(rec.told, n, "told is the record's index in these tests");
            assert_eq!(rec.relay, "dc1-1");
            assert_eq!(rec.auth, (n % 2 == 1).then_some(u64::from(n) * 1000), "auth and serial round-trip");
            n += 1;
            out.push((rec.seen, h.clone().into_owned()))
        })?;
        Ok(out)
    }

    #[test]
    fn round_trips_every_field() {
        let long_error = "e".repeat(1000);
        let a = hb(r#"{"hostname":"bj-web-001","ip":"10.1.2.3","runUser":"root","updaterVersion":"0.0.4",
            "realAgents":[{"name":"falcon-agent","version":"5.1.3","status":"started","timestamp":1477380651,
            "runUser":"falcon","workDir":"/home/falcon/open-falcon"},
            {"name":"x","version":"","status":"stopped \u00e9","timestamp":-5,"runUser":"","workDir":"","lastError":"boom"}]}"#);
        let text = format!(
            r#"{{"hostname":"b","realAgents":[{{"name":"n","version":"1","status":"","timestamp":0,"lastError":"{long_error}"}}]}}"#
        );
        let b = hb(&text);
        let c = hb(r#"{"hostname":"c","realAgents":null}"#);
        let body = batch(&[(7, &a), (9, &b), (u32::MAX, &c)]);
        let out = decoded(&body).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!((out[0].0, &out[0].1), (7, &a.clone().into_owned()));
        assert_eq!((out[1].0, &out[1].1), (9, &b.clone().into_owned()));
        assert_eq!((out[2].0, &out[2].1), (u32::MAX, &c.clone().into_owned()));
        assert_eq!(check(&body), Ok(3));
        let json: usize = [&a, &b, &c].iter().map(|h| serde_json::to_vec(h).unwrap().len()).sum();
        assert!(body.len() < json, "compact {} bytes vs JSON {json}", body.len());
    }

    #[test]
    fn a_batch_before_enrollment_decodes_as_unauthenticated_and_a_bad_auth_byte_is_refused() {
        let h = hb(r#"{"hostname":"h1","realAgents":[]}"#);
        let mut v4 = b"OPB4".to_vec();
        v4.extend_from_slice(&7u32.to_le_bytes());
        v4.push(3);
        for s in ["dc1-1", "h1", "", "", ""] {
            put_str(&mut v4, s);
        }
        v4.push(0);
        let mut got = Vec::new();
        decode(&v4, |r, h| got.push((r.seen, r.told, r.relay, r.auth, h.hostname.to_string()))).unwrap();
        assert_eq!(got, vec![(7, 3, "dc1-1", None, "h1".to_owned())]);
        let mut body = Vec::new();
        begin(&mut body);
        encode(Record { seen: 7, told: 3, relay: "dc1-1", auth: Some(42) }, &h, &mut body);
        body[9] = 2;
        assert!(matches!(check(&body), Err(WireError::Malformed(m)) if m.contains("auth")));
    }

    #[test]
    fn empty_batch_is_just_the_magic() {
        let body = batch(&[]);
        assert_eq!(body, b"OPB5");
        assert_eq!(check(&body), Ok(0));
    }

    #[test]
    fn a_batch_of_an_older_relay_decodes_with_nothing_told() {
        let a = hb(r#"{"hostname":"a","realAgents":[]}"#);
        let mut body = b"OPB1".to_vec();
        body.extend_from_slice(&5u32.to_le_bytes());
        for s in ["a", "", "", ""] {
            put_str(&mut body, s);
        }
        body.push(0);
        let mut got = Vec::new();
        decode(&body, |r, h| got.push((r.seen, r.told, r.relay, h.clone().into_owned()))).unwrap();
        assert_eq!(got, vec![(5, 0, "", a.into_owned())]);
    }

    #[test]
    fn pins_round_trip_and_a_batch_before_pins_decodes_with_none() {
        let a = hb(
            r#"{"hostname":"a","realAgents":[{"name":"x","version":"1","status":"started","pinned":"hold"},{"name":"y","version":"2","pinned":"2"}]}"#,
        );
        let out = decoded(&batch(&[(3, &a)])).unwrap();
        assert_eq!(out[0].1, a.clone().into_owned());
        assert_eq!((&*out[0].1.real_agents[0].pinned, &*out[0].1.real_agents[1].pinned), ("hold", "2"));
        // OPB2: the same agent without the pinned string.
        let mut body = b"OPB2".to_vec();
        body.extend_from_slice(&5u32.to_le_bytes());
        body.push(1);
        for s in ["a", "", "", ""] {
            put_str(&mut body, s);
        }
        body.push(1);
        for s in ["x", "1", "started"] {
            put_str(&mut body, s);
        }
        body.extend_from_slice(&0i64.to_le_bytes());
        for s in ["", "", ""] {
            put_str(&mut body, s);
        }
        let mut got = Vec::new();
        decode(&body, |r, h| got.push((r.seen, r.told, r.relay, h.clone().into_owned()))).unwrap();
        assert_eq!((got[0].0, got[0].1, got[0].2), (5, 1, ""));
        assert_eq!((&*got[0].3.real_agents[0].version, &*got[0].3.real_agents[0].pinned), ("1", ""));
        // OPB3 (before silence by relay): pins, but no relay string; decodes with none.
        let mut v3 = b"OPB3".to_vec();
        v3.extend_from_slice(&body[4..]);
        put_str(&mut v3, "hold");
        let mut got = Vec::new();
        decode(&v3, |r, h| got.push((r.relay, h.real_agents[0].pinned.to_string()))).unwrap();
        assert_eq!(got, vec![("", "hold".to_owned())]);
        // A pin that is neither `hold` nor a version is refused like one that came alone.
        let mut bad = b"OPB3".to_vec();
        bad.extend_from_slice(&body[4..]);
        put_str(&mut bad, "../etc");
        assert!(matches!(check(&bad), Err(WireError::Pin { .. })), "{:?}", check(&bad));
    }

    #[test]
    fn a_batch_from_a_known_relay_carries_only_its_own_reports() {
        let a = hb(r#"{"hostname":"a","realAgents":[]}"#);
        let body = batch(&[(1, &a), (2, &a)]);
        assert_eq!(check_from(&body, Some("dc1-1")), Ok(2));
        assert_eq!(check_from(&body, None), Ok(2), "from a meta node (or no identity): any relay");
        let mut mixed = body.clone();
        encode(Record { seen: 3, told: 2, relay: "dc2-1", auth: None }, &a, &mut mixed);
        let e = check_from(&mixed, Some("dc1-1")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "host a: a report through relay \"dc2-1\" in a batch from relay dc1-1: a relay posts only its own reports"
        );
        assert_eq!(check_from(&body, Some("dc2-1")).map_err(|e| matches!(e, WireError::NotThisRelay { .. })), Err(true));
    }

    #[test]
    fn bad_input_is_refused_with_a_clear_error() {
        let a = hb(r#"{"hostname":"a","realAgents":[{"name":"x","version":"1","status":"started","timestamp":1}]}"#);
        let good = batch(&[(1, &a), (2, &a)]);
        let first = batch(&[(1, &a)]).len();
        // Every truncation point is an error, never a panic.
        for cut in 0..good.len() {
            let r = check(&good[..cut]);
            if cut == first {
                assert_eq!(r, Ok(1), "a cut between records leaves whole records");
            } else if cut == 4 {
                assert_eq!(r, Ok(0));
            } else {
                assert!(r.is_err(), "cut at {cut} accepted");
            }
        }
        assert!(matches!(check(b"{\"hosts\":[]}"), Err(WireError::Malformed(m)) if m.contains("magic")));
        // A record whose hostname breaks the wire rules is refused like a lone heartbeat.
        assert!(matches!(check(&raw_record("bad host", 0)), Err(WireError::Hostname(_))));
        // Invalid UTF-8, too many agents, an absurd length.
        let mut utf = raw_record("h", 1);
        utf.extend_from_slice(&[2, 0xff, 0xfe]);
        assert!(matches!(check(&utf), Err(WireError::Malformed(m)) if m.contains("UTF-8")));
        assert!(matches!(check(&raw_record("h", 65)), Err(WireError::TooManyAgents { .. })));
        let mut huge = raw_record("h", 1);
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(check(&huge).is_err());
        // A relay id that is not a safe token.
        let h = hb(r#"{"hostname":"h"}"#);
        for relay in ["dc 1", "../x", ".", &"r".repeat(65)] {
            let mut body = Vec::new();
            begin(&mut body);
            encode(Record { seen: 1, told: 0, relay, auth: None }, &h, &mut body);
            assert!(matches!(check(&body), Err(WireError::Malformed(m)) if m.contains("relay id")), "{relay:?} accepted");
        }
    }

    /// A batch of one record's head, written without validation: `agents` agents follow.
    fn raw_record(host: &str, agents: u8) -> Vec<u8> {
        let mut out = Vec::new();
        begin(&mut out);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.push(0);
        out.push(0); // auth: none
        for s in ["", host, "", "", ""] {
            put_str(&mut out, s);
        }
        out.push(agents);
        out
    }

    fn raw_agent(out: &mut Vec<u8>, name: &str, status: &str) {
        for s in [name, "1", status] {
            put_str(out, s);
        }
        out.extend_from_slice(&0i64.to_le_bytes());
        for s in ["", "", "", ""] {
            put_str(out, s);
        }
    }

    #[test]
    fn duplicate_agents_and_long_fields_are_refused() {
        let mut dup = raw_record("h", 2);
        raw_agent(&mut dup, "a", "started");
        raw_agent(&mut dup, "a", "started");
        assert!(matches!(check(&dup), Err(WireError::DuplicateAgent { .. })));
        let mut long = raw_record("h", 1);
        raw_agent(&mut long, "a", &"s".repeat(crate::wire::MAX_STATUS + 1));
        assert!(check(&long).is_err(), "a status over the limit");
        let mut fine = raw_record("h", 1);
        raw_agent(&mut fine, "a", &"s".repeat(crate::wire::MAX_STATUS));
        assert_eq!(check(&fine), Ok(1));
    }

    #[test]
    fn a_length_not_in_its_shortest_form_is_refused() {
        let h = hb(r#"{"hostname":"h"}"#);
        let good = batch(&[(1, &h)]);
        // The hostname's length 1 as two LEB128 groups (0x81 0x00) decodes to the same value.
        let at = 4 + 4 + 1 + 1 + 1 + "dc1-1".len();
        assert_eq!(good[at], 1);
        let mut long = good.clone();
        long.splice(at..at + 1, [0x81, 0x00]);
        let e = check(&long).unwrap_err().to_string();
        assert!(e.contains("shortest form"), "{e}");
        assert!(check(&good).is_ok());
    }
}
