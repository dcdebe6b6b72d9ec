//! The heartbeat's fast path: a single-pass reader for the JSON shapes updaters send (the Go
//! ops-updater's and ours), tried before serde by [`Heartbeat::parse`](crate::Heartbeat::parse).
//!
//! It accepts a strict subset of what serde accepts, and gives exactly serde's value for it:
//! one object with only the known keys, each at most once, string values without escapes
//! or control characters (borrowed from the body), `timestamp` a plain integer, `realAgents`
//! an array of such objects or `null`, JSON whitespace anywhere, nothing after. Anything
//! else (an escape, an unknown or repeated key, a float, a missing `hostname`, a trailing
//! comma, bad UTF-8) returns `None`, and serde reads the body as before: same value, same
//! errors. The differential fuzz target `heartbeat_fast_path_agrees_with_serde` holds it to
//! that.

use std::borrow::Cow;

use crate::wire::{Heartbeat, RealAgent};

struct Reader<'a> {
    /// The body, UTF-8 checked once as a whole (serde refuses a body that is not).
    s: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.s.as_bytes()
    }

    fn ws(&mut self) {
        while let Some(&c) = self.bytes().get(self.at) {
            if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            self.at += 1;
        }
    }

    /// The next non-space byte, consumed when it is `c`.
    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.bytes().get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        let len = self.bytes()[start..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
        let end = start + len;
        if self.bytes()[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        // Both ends are ASCII quotes of a checked UTF-8 body: on character boundaries.
        self.s.get(start..end)
    }

    fn text(&mut self) -> Option<Cow<'a, str>> {
        self.string().map(Cow::Borrowed)
    }

    /// `-?[1-9][0-9]*` or `0`, fitting an i64 (18 digits at most, so no overflow check).
    fn integer(&mut self) -> Option<i64> {
        self.ws();
        let negative = self.bytes().get(self.at) == Some(&b'-');
        if negative {
            self.at += 1;
        }
        let start = self.at;
        let digits = self.bytes()[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || digits > 18 || (self.bytes()[start] == b'0' && (digits > 1 || negative)) {
            return None;
        }
        // A fraction or exponent makes it a float, which serde refuses for an i64.
        if matches!(self.bytes().get(start + digits), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.at = start + digits;
        let n = self.bytes()[start..self.at].iter().fold(0i64, |n, &d| n * 10 + i64::from(d - b'0'));
        Some(if negative { -n } else { n })
    }

    fn null(&mut self) -> bool {
        self.ws();
        if self.bytes()[self.at..].starts_with(b"null") {
            self.at += 4;
            true
        } else {
            false
        }
    }

    /// `{` members `}` with `member` reading each key's value; false for an empty object's
    /// `}` too (the caller checks what is required).
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        if !self.eat(b'{') {
            return None;
        }
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            let key = self.string()?;
            if !self.eat(b':') {
                return None;
            }
            member(self, key)?;
            if self.eat(b',') {
                continue;
            }
            return self.eat(b'}').then_some(());
        }
    }

    fn agent(&mut self) -> Option<RealAgent<'a>> {
        let mut a = RealAgent {
            name: Cow::Borrowed(""),
            version: Cow::Borrowed(""),
            status: Cow::Borrowed(""),
            timestamp: 0,
            run_user: Cow::Borrowed(""),
            work_dir: Cow::Borrowed(""),
            last_error: Cow::Borrowed(""),
            pinned: Cow::Borrowed(""),
        };
        let mut seen = 0u8;
        self.object(|r, key| {
            let (bit, field) = match key {
                "name" => (0, &mut a.name),
                "version" => (1, &mut a.version),
                "status" => (2, &mut a.status),
                "runUser" => (3, &mut a.run_user),
                "workDir" => (4, &mut a.work_dir),
                "lastError" => (5, &mut a.last_error),
                "pinned" => (6, &mut a.pinned),
                "timestamp" => {
                    if seen & 1 << 7 != 0 {
                        return None;
                    }
                    seen |= 1 << 7;
                    a.timestamp = r.integer()?;
                    return Some(());
                }
                _ => return None,
            };
            if seen & 1 << bit != 0 {
                return None;
            }
            seen |= 1 << bit;
            *field = r.text()?;
            Some(())
        })?;
        (seen & 1 != 0).then_some(a)
    }

    fn agents(&mut self) -> Option<Vec<RealAgent<'a>>> {
        if self.null() {
            return Some(Vec::new());
        }
        if !self.eat(b'[') {
            return None;
        }
        let mut out = Vec::new();
        if self.eat(b']') {
            return Some(out);
        }
        loop {
            out.push(self.agent()?);
            if self.eat(b',') {
                continue;
            }
            return self.eat(b']').then_some(out);
        }
    }
}

/// The heartbeat in `body` when it has one of the plain shapes (see the module); `None`
/// sends it to serde. Not validated: [`Heartbeat::validate`] runs on either path.
pub fn heartbeat(body: &[u8]) -> Option<Heartbeat<'_>> {
    let mut r = Reader { s: std::str::from_utf8(body).ok()?, at: 0 };
    let mut hb = Heartbeat {
        hostname: Cow::Borrowed(""),
        ip: Cow::Borrowed(""),
        run_user: Cow::Borrowed(""),
        updater_version: Cow::Borrowed(""),
        real_agents: Vec::new(),
    };
    let mut seen = 0u8;
    r.object(|r, key| {
        let bit = match key {
            "hostname" => 0,
            "ip" => 1,
            "runUser" => 2,
            "updaterVersion" => 3,
            "realAgents" => 4,
            _ => return None,
        };
        if seen & 1 << bit != 0 {
            return None;
        }
        seen |= 1 << bit;
        match bit {
            0 => hb.hostname = r.text()?,
            1 => hb.ip = r.text()?,
            2 => hb.run_user = r.text()?,
            3 => hb.updater_version = r.text()?,
            _ => hb.real_agents = r.agents()?,
        }
        Some(())
    })?;
    r.ws();
    (r.at == body.len() && seen & 1 != 0).then_some(hb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde(body: &str) -> Result<Heartbeat<'_>, String> {
        serde_json::from_str(body).map_err(|e| e.to_string())
    }

    #[test]
    fn the_plain_shapes_take_the_fast_path_and_read_as_serde_reads_them() {
        for body in [
            r#"{"hostname":"liutian-01","ip":"192.168.1.154","runUser":"admin","updaterVersion":"0.0.4","realAgents":[{"name":"falcon-agent","version":"5.1.3","status":"started","timestamp":1477380651}]}"#,
            " {\n \"hostname\" : \"h\" , \"realAgents\" : null }\r\n",
            r#"{"hostname":"h","realAgents":[]}"#,
            r#"{"realAgents":[{"name":"a","timestamp":-5,"lastError":"md5 mismatch","pinned":"hold","workDir":"/w","runUser":"u"},{"name":"b","timestamp":0}],"hostname":"h"}"#,
            r#"{"hostname":"héllo"}"#,
        ] {
            let fast = heartbeat(body.as_bytes()).unwrap_or_else(|| panic!("fast path refused {body}"));
            assert_eq!(Ok(fast), serde(body), "{body}");
        }
    }

    #[test]
    fn anything_else_goes_to_serde() {
        for body in [
            r#"{"hostname":"h\u0041"}"#,
            r#"{"hostname":"h","extra":1}"#,
            r#"{"hostname":"h","hostname":"g"}"#,
            r#"{"hostname":"h","realAgents":[{"name":"a","timestamp":1.5}]}"#,
            r#"{"hostname":"h","realAgents":[{"name":"a","timestamp":1e3}]}"#,
            r#"{"hostname":"h","realAgents":[{"name":"a","timestamp":01}]}"#,
            r#"{"hostname":"h","realAgents":[{"name":"a","timestamp":-0}]}"#,
            r#"{"hostname":"h","realAgents":[{"name":"a","timestamp":12345678901234567890}]}"#,
            r#"{"hostname":"h","realAgents":[{"version":"1"}]}"#,
            r#"{"hostname":"h","realAgents":[{"name":"a","name":"b"}]}"#,
            r#"{"hostname":"h",}"#,
            r#"{"hostname":"h","realAgents":[{"name":"a"},]}"#,
            r#"{"hostname":null}"#,
            r#"{"ip":"1"}"#,
            r#"{"hostname":"h"} x"#,
            r#"{"hostname":"h"}{}"#,
            "{\"hostname\":\"a\tb\"}",
            "\u{feff}{\"hostname\":\"h\"}",
            r#"["hostname"]"#,
            r#"{"hostname":"h""#,
            "",
        ] {
            assert!(heartbeat(body.as_bytes()).is_none(), "fast path took {body:?}");
        }
        assert!(heartbeat(b"{\"hostname\":\"\xff\"}").is_none(), "bad UTF-8");
    }
}
