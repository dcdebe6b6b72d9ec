//! Reading `agents.toml`: the file's raw shapes as TOML gives them (with their spans), and
//! the checks that turn each into the model of `super`, failing with `file:line:col` and what
//! was wrong. Resolution is not here: `super` builds the classes from what these checks
//! return.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) version: Option<Spanned<i64>>,
    pub(super) expires: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    pub(super) agent: Vec<Spanned<RawAgent>>,
    pub(super) enrollment: Option<RawEnrollment>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEnrollment {
    pub(super) not_before: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    pub(super) hosts: std::collections::BTreeMap<String, Spanned<RawHostRevocation>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHostRevocation {
    pub(super) not_before: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    pub(super) revoked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) name: Spanned<String>,
    pub(super) tarball: Spanned<String>,
    pub(super) run_user: Spanned<String>,
    pub(super) work_dir: Spanned<String>,
    pub(super) config_file_name: Option<Spanned<String>>,
    pub(super) config_remote_url: Option<Spanned<String>>,
    pub(super) default: Spanned<RawBlock>,
    #[serde(default)]
    pub(super) others: Vec<Spanned<RawOther>>,
    pub(super) rollout: Option<Spanned<RawRollout>>,
    #[serde(default)]
    pub(super) relay_cache: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRollout {
    pub(super) from: Spanned<RawFrom>,
    pub(super) waves: Spanned<Vec<Spanned<i64>>>,
    pub(super) soak: Option<Spanned<String>>,
    pub(super) advance_at: Option<Spanned<f64>>,
    pub(super) deadline: Option<Spanned<String>>,
    pub(super) halt_when: Option<Spanned<RawHalt>>,
    pub(super) max_in_flight_per_relay: Option<Spanned<i64>>,
    pub(super) window: Option<Spanned<RawWindow>>,
    #[serde(default)]
    pub(super) count_unauthenticated: bool,
    #[serde(default)]
    pub(super) paused: bool,
    #[serde(default)]
    pub(super) abort: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFrom {
    pub(super) version: Spanned<String>,
    md5: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHalt {
    pub(super) failed_ratio: Option<Spanned<f64>>,
    pub(super) min_sample: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWindow {
    pub(super) days: Spanned<String>,
    pub(super) hours: Spanned<String>,
    pub(super) tz: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBlock {
    pub(super) version: Spanned<String>,
    md5: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    pub(super) cmd: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOther {
    pub(super) prefix: Spanned<String>,
    pub(super) version: Spanned<String>,
    md5: Option<Spanned<String>>,
    sha256: Option<Spanned<String>>,
    pub(super) cmd: Option<Spanned<String>>,
    pub(super) tarball: Option<Spanned<String>>,
    pub(super) run_user: Option<Spanned<String>>,
    pub(super) work_dir: Option<Spanned<String>>,
}

/// Carries the file name and text so every check can say where it failed.
pub(super) struct Checker<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
}

impl Checker<'_> {
    /// A `not_before` datetime as unix milliseconds (fractions of a second kept to the ms).
    pub(super) fn not_before(&self, v: &Spanned<toml::value::Datetime>) -> Result<u64, ConfigError> {
        let ms = v.get_ref().time.map_or(0, |t| u64::from(t.nanosecond) / 1_000_000);
        crate::trust::unix_seconds(v.get_ref()).map(|s| s.saturating_mul(1000) + ms).map_err(|_| {
            self.err(
                v.span(),
                format_args!("not_before must be a full time with its offset, like 2027-01-05T00:00:00Z; got {}", v.get_ref()),
            )
        })
    }

    pub(super) fn enrollment(&self, e: &RawEnrollment) -> Result<crate::enroll::Revocations, ConfigError> {
        use crate::enroll::HostRevocation;
        let not_before = e.not_before.as_ref().map(|v| self.not_before(v)).transpose()?.unwrap_or(0);
        if e.hosts.len() > crate::enroll::MAX_REVOKED_HOSTS {
            let first = e.hosts.values().next().map_or(0..0, Spanned::span);
            return Err(self.err(first, format_args!("[enrollment.hosts] may name at most {} hosts", crate::enroll::MAX_REVOKED_HOSTS)));
        }
        let mut hosts = Vec::with_capacity(e.hosts.len());
        for (name, v) in &e.hosts {
            if !crate::wire::valid_hostname(name) {
                return Err(self.err(v.span(), format_args!("[enrollment.hosts]: bad hostname {name:?}")));
            }
            let r = v.get_ref();
            let revocation = match (&r.not_before, r.revoked) {
                (None, true) => HostRevocation::Revoked,
                (Some(t), false) => HostRevocation::NotBefore(self.not_before(t)?),
                _ => {
                    return Err(
                        self.err(v.span(), format_args!("[enrollment.hosts] {name:?}: give either revoked = true or not_before = <time>"))
                    );
                }
            };
            hosts.push((name.clone(), revocation));
        }
        Ok(crate::enroll::Revocations::new(not_before, hosts))
    }

    pub(super) fn err(&self, span: Range<usize>, message: impl fmt::Display) -> ConfigError {
        let (line, col) = line_col(self.text, span.start);
        ConfigError::At { file: self.file.to_owned(), line, col, message: message.to_string() }
    }

    pub(super) fn check(&self, v: &Spanned<String>, ok: bool, what: impl fmt::Display) -> Result<String, ConfigError> {
        if ok { Ok(v.get_ref().clone()) } else { Err(self.err(v.span(), format_args!("{what}, got {:?}", v.get_ref()))) }
    }

    pub(super) fn name(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        self.check(v, valid_agent_name(v.get_ref()), "agent name must be 1-64 of [A-Za-z0-9._-], not . or ..")
    }

    pub(super) fn version(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        self.check(v, valid_version(v.get_ref()), "version must be 1-64 of [A-Za-z0-9._+-], not . or ..")
    }

    pub(super) fn md5(&self, v: Option<&Spanned<String>>) -> Result<String, ConfigError> {
        match v {
            Some(u) if u.get_ref().starts_with("http://") || u.get_ref().starts_with("https://") => self.url(u, "a URL-form md5"),
            _ => self.hex_digest(v, 32, "md5 must be empty, 32 hex digits or an http(s) base URL"),
        }
    }

    pub(super) fn sha256(&self, v: Option<&Spanned<String>>) -> Result<String, ConfigError> {
        self.hex_digest(v, 64, "sha256 must be empty or 64 hex digits")
    }

    pub(super) fn hex_digest(&self, v: Option<&Spanned<String>>, len: usize, what: &str) -> Result<String, ConfigError> {
        let Some(v) = v else { return Ok(String::new()) };
        let s = v.get_ref();
        let ok = s.is_empty() || (s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()));
        Ok(self.check(v, ok, what)?.to_ascii_lowercase())
    }

    pub(super) fn cmd(&self, v: Option<&Spanned<String>>, inherited: Cmd) -> Result<Cmd, ConfigError> {
        match v.map(|v| (v, v.get_ref().as_str())) {
            None => Ok(inherited),
            Some((_, "start")) => Ok(Cmd::Start),
            Some((_, "stop")) => Ok(Cmd::Stop),
            Some((v, other)) => Err(self.err(v.span(), format_args!("cmd must be \"start\" or \"stop\", got {other:?}"))),
        }
    }

    pub(super) fn url(&self, v: &Spanned<String>, what: &str) -> Result<String, ConfigError> {
        let s = v.get_ref();
        let rest = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://"));
        let ok = rest.is_some_and(|r| {
            let host = r.split('/').next().unwrap_or("");
            !host.is_empty() && !r.chars().any(|c| c.is_whitespace() || c.is_control())
        });
        self.check(v, ok, format_args!("{what} must be an http:// or https:// URL with a host"))
    }

    pub(super) fn work_dir(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        let s = v.get_ref();
        let ok = s.starts_with('/') && !s.split('/').any(|c| c == "..") && !s.contains('\0') && s.len() <= 4096;
        self.check(v, ok, "work_dir must be an absolute path without ..")
    }

    pub(super) fn run_user(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        let s = v.get_ref();
        let ok = !s.is_empty()
            && s.len() <= 32
            && !s.starts_with('-')
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        self.check(v, ok, "run_user must be 1-32 of [A-Za-z0-9._-], not starting with -")
    }

    pub(super) fn file_name(&self, v: &Spanned<String>) -> Result<String, ConfigError> {
        let s = v.get_ref();
        let ok = s.is_empty() || valid_agent_name(s);
        self.check(v, ok, "config_file_name must be a plain file name of [A-Za-z0-9._-]")
    }

    pub(super) fn ratio(&self, v: Option<&Spanned<f64>>, default: u16) -> Result<u16, ConfigError> {
        v.map_or(Ok(default), |v| crate::rollout::ratio_bp(*v.get_ref()).map_err(|e| self.err(v.span(), e)))
    }

    pub(super) fn duration(&self, v: Option<&Spanned<String>>, default: u64) -> Result<u64, ConfigError> {
        v.map_or(Ok(default), |v| crate::rollout::parse_duration(v.get_ref()).map_err(|e| self.err(v.span(), e)))
    }

    pub(super) fn rollout(&self, raw: &Spanned<RawRollout>, default: &Block) -> Result<RolloutSpec, ConfigError> {
        let r = raw.get_ref();
        let from = r.from.get_ref();
        let from = Block {
            version: self.version(&from.version)?,
            md5: self.md5(from.md5.as_ref())?,
            sha256: self.sha256(from.sha256.as_ref())?,
            cmd: default.cmd,
        };
        if from.version == default.version {
            return Err(
                self.err(r.from.span(), format_args!("rollout.from is the default version {:?}: nothing to roll out", from.version))
            );
        }
        let mut waves = Vec::with_capacity(r.waves.get_ref().len());
        for w in r.waves.get_ref() {
            let p = *w.get_ref();
            if !(1..=100).contains(&p) || waves.last().is_some_and(|&last: &u8| i64::from(last) >= p) {
                return Err(self.err(w.span(), format_args!("waves are percents of the fleet, 1-100, strictly increasing; got {p}")));
            }
            waves.push(p as u8);
        }
        if waves.last() != Some(&100) {
            return Err(self.err(r.waves.span(), "waves must end at 100"));
        }
        if waves.len() > crate::rollout::MAX_WAVES {
            return Err(self.err(r.waves.span(), format_args!("at most {} waves", crate::rollout::MAX_WAVES)));
        }
        let halt = r.halt_when.as_ref().map(Spanned::get_ref);
        let min_sample = match halt.and_then(|h| h.min_sample.as_ref()) {
            None => 20,
            Some(v) if *v.get_ref() >= 1 => *v.get_ref() as u64,
            Some(v) => return Err(self.err(v.span(), format_args!("min_sample must be at least 1, got {}", v.get_ref()))),
        };
        let max_in_flight_per_relay = match &r.max_in_flight_per_relay {
            None => None,
            Some(v) if (1..=i64::from(u32::MAX)).contains(v.get_ref()) => Some(*v.get_ref() as u32),
            Some(v) => return Err(self.err(v.span(), format_args!("max_in_flight_per_relay must be at least 1, got {}", v.get_ref()))),
        };
        let window = match &r.window {
            None => None,
            Some(w) => {
                let raw = w.get_ref();
                let tz = raw.tz.as_ref().map_or("UTC", |t| t.get_ref().as_str());
                Some(crate::rollout::Window::parse(raw.days.get_ref(), raw.hours.get_ref(), tz).map_err(|e| self.err(w.span(), e))?)
            }
        };
        Ok(RolloutSpec {
            from,
            policy: crate::rollout::Policy {
                waves,
                soak_seconds: self.duration(r.soak.as_ref(), 15 * 60)?,
                advance_at_bp: self.ratio(r.advance_at.as_ref(), 9500)?,
                deadline_seconds: self.duration(r.deadline.as_ref(), 20 * 60)?,
                failed_ratio_bp: self.ratio(halt.and_then(|h| h.failed_ratio.as_ref()), 500)?,
                min_sample,
                paused: r.paused,
                abort: r.abort,
            },
            window,
            max_in_flight_per_relay,
            count_unauthenticated: r.count_unauthenticated,
        })
    }

    pub(super) fn agent(&self, raw: &RawAgent) -> Result<AgentSpec, ConfigError> {
        let default_block = raw.default.get_ref();
        let default = Block {
            version: self.version(&default_block.version)?,
            md5: self.md5(default_block.md5.as_ref())?,
            sha256: self.sha256(default_block.sha256.as_ref())?,
            cmd: self.cmd(default_block.cmd.as_ref(), Cmd::Start)?,
        };
        let mut others = Vec::with_capacity(raw.others.len());
        let mut seen = HashSet::new();
        for o in &raw.others {
            let o = o.get_ref();
            let prefix = self.check(&o.prefix, valid_hostname(o.prefix.get_ref()), "prefix must be 1-255 of [A-Za-z0-9._-]")?;
            if !seen.insert(prefix.clone()) {
                return Err(self.err(o.prefix.span(), format_args!("duplicate prefix {prefix:?} in this agent")));
            }
            others.push(Override {
                prefix,
                block: Block {
                    version: self.version(&o.version)?,
                    // Never inherited: a digest belongs to one version (the Go ops-meta's fault).
                    md5: self.md5(o.md5.as_ref())?,
                    sha256: self.sha256(o.sha256.as_ref())?,
                    cmd: self.cmd(o.cmd.as_ref(), default.cmd)?,
                },
                tarball: o.tarball.as_ref().map(|t| self.url(t, "tarball")).transpose()?,
                run_user: o.run_user.as_ref().map(|u| self.run_user(u)).transpose()?,
                work_dir: o.work_dir.as_ref().map(|w| self.work_dir(w)).transpose()?,
            });
        }
        Ok(AgentSpec {
            name: self.name(&raw.name)?,
            tarball: self.url(&raw.tarball, "tarball")?,
            run_user: self.run_user(&raw.run_user)?,
            work_dir: self.work_dir(&raw.work_dir)?,
            config_file_name: raw.config_file_name.as_ref().map(|f| self.file_name(f)).transpose()?.unwrap_or_default(),
            config_remote_url: raw
                .config_remote_url
                .as_ref()
                .map(|u| if u.get_ref().is_empty() { Ok(String::new()) } else { self.url(u, "config_remote_url") })
                .transpose()?
                .unwrap_or_default(),
            rollout: raw.rollout.as_ref().map(|r| self.rollout(r, &default)).transpose()?,
            default,
            others,
            relay_cache: raw.relay_cache,
        })
    }
}
