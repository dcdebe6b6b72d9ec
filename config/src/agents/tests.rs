//! The desired config's unit tests: parsing, every refusal with its place, resolution.

use super::*;

const ISSUE_EXAMPLE: &str = r#"
[[agent]]
name = "falcon-agent"
tarball = "http://files.example/releases/falcon"
run_user = "falcon"
work_dir = "/home/falcon/open-falcon"
config_file_name = "cfg.json"
config_remote_url = "http://files.example/conf/falcon-agent-cfg.json"
default = { version = "5.1.3", md5 = "490ac172dabecc867289079d48e84a66", cmd = "start" }

  [[agent.others]]
  prefix = "bj-web-"
  version = "5.1.4"
  md5 = ""
  cmd = "start"

  [[agent.others]]
  prefix = "bj-web-1"
  version = "5.1.5"
  tarball = "https://canary.example/falcon"
  run_user = "canary"
  work_dir = "/opt/canary"

[[agent]]
name = "mysql-monitor"
tarball = "http://files.example/releases/falcon"
run_user = "falcon"
work_dir = "/home/falcon/open-falcon"
default = { version = "0.0.5", md5 = "5F9AB5E81C386CDE72C022D1B6D061D9", cmd = "stop" }

  [[agent.others]]
  prefix = "bj-"
  version = "0.0.6"
"#;

fn cfg() -> DesiredConfig {
    DesiredConfig::parse(ISSUE_EXAMPLE, "agents.toml").unwrap()
}

fn versions(c: &DesiredConfig, host: &str) -> Vec<(String, String, String)> {
    c.desired_for(host).into_iter().map(|d| (d.name, d.version, d.cmd)).collect()
}

#[test]
fn default_block_for_unmatched_hosts() {
    let c = cfg();
    let d = c.desired_for("sh-db-001");
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].name, "falcon-agent");
    assert_eq!(d[0].version, "5.1.3");
    assert_eq!(d[0].md5, "490ac172dabecc867289079d48e84a66");
    assert_eq!(d[0].tarball, "http://files.example/releases/falcon");
    assert_eq!(d[0].config_file_name, "cfg.json");
    assert_eq!(d[0].config_remote_url, "http://files.example/conf/falcon-agent-cfg.json");
    assert_eq!(d[1].md5, "5f9ab5e81c386cde72c022d1b6d061d9", "digests are normalised to lowercase");
    assert_eq!(d[1].cmd, "stop");
    assert_eq!(d[1].config_file_name, "");
}

#[test]
fn longest_prefix_wins_per_agent() {
    let c = cfg();
    let check = |host: &str, expected: &[(&str, &str, &str)]| {
        let got = versions(&c, host);
        let want: Vec<(String, String, String)> = expected.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
        assert_eq!(got, want, "host {host}");
    };
    check("bj-db-1", &[("falcon-agent", "5.1.3", "start"), ("mysql-monitor", "0.0.6", "stop")]);
    check("bj-web-001", &[("falcon-agent", "5.1.4", "start"), ("mysql-monitor", "0.0.6", "stop")]);
    check("bj-web-101", &[("falcon-agent", "5.1.5", "start"), ("mysql-monitor", "0.0.6", "stop")]);
    check("bj-we", &[("falcon-agent", "5.1.3", "start"), ("mysql-monitor", "0.0.6", "stop")]);
    check("bj", &[("falcon-agent", "5.1.3", "start"), ("mysql-monitor", "0.0.5", "stop")]);
}

#[test]
fn override_never_inherits_the_default_digest_but_may_override_paths() {
    let c = cfg();
    let web = &c.desired_for("bj-web-001")[0];
    assert_eq!(web.md5, "", "an empty md5 in others means: fetch {{url}}.md5");
    assert_eq!(web.tarball, "http://files.example/releases/falcon");
    let canary = &c.desired_for("bj-web-100")[0];
    assert_eq!(canary.tarball, "https://canary.example/falcon");
    assert_eq!(canary.run_user, "canary");
    assert_eq!(canary.work_dir, "/opt/canary");
    assert_eq!(canary.md5, "");
    // mysql-monitor's override has no md5 and no cmd: digest empty, cmd inherited.
    let mm = &c.desired_for("bj-x")[1];
    assert_eq!((mm.md5.as_str(), mm.cmd.as_str()), ("", "stop"));
}

#[test]
fn classes_are_distinct_prefixes_plus_default() {
    let c = cfg();
    assert_eq!(c.class_count(), 4);
    assert_eq!(c.class_of("nothing"), ClassId(0));
    assert_eq!(c.class_prefix(c.class_of("bj-web-1x")), Some("bj-web-1"));
    assert_eq!(c.agent_index("mysql-monitor"), Some(1));
    assert_eq!(c.agent_index("nope"), None);
}

#[test]
fn hash_is_of_the_file_text() {
    let c = cfg();
    assert_eq!(c.hash(), crate::content_hash(ISSUE_EXAMPLE.as_bytes()));
    assert_eq!(c.source(), ISSUE_EXAMPLE);
    assert_eq!(DesiredConfig::parse("", "x").unwrap().agents().len(), 0);
}

fn error_of(text: &str) -> String {
    DesiredConfig::parse(text, "agents.toml").unwrap_err().to_string()
}

fn agent_with(field_line: &str) -> String {
    let base = [
        r#"name = "a""#,
        r#"tarball = "http://f/r""#,
        r#"run_user = "u""#,
        r#"work_dir = "/w""#,
        r#"default = { version = "1", md5 = "", cmd = "start" }"#,
    ];
    let key = field_line.split('=').next().unwrap().trim();
    let mut lines: Vec<String> = base.iter().filter(|l| l.split('=').next().unwrap().trim() != key).map(|l| l.to_string()).collect();
    lines.insert(0, field_line.to_string());
    format!("[[agent]]\n{}\n", lines.join("\n"))
}

#[test]
fn bad_files_name_line_and_column() {
    let check = |text: String, expected: &str| assert_eq!(error_of(&text), expected, "for:\n{text}");
    check(agent_with(r#"name = "../etc""#), r#"agents.toml:2:8: agent name must be 1-64 of [A-Za-z0-9._-], not . or .., got "../etc""#);
    check(
        agent_with(r#"tarball = "ftp://x/y""#),
        r#"agents.toml:2:11: tarball must be an http:// or https:// URL with a host, got "ftp://x/y""#,
    );
    check(
        agent_with(r#"tarball = "http:///y""#),
        r#"agents.toml:2:11: tarball must be an http:// or https:// URL with a host, got "http:///y""#,
    );
    check(
        agent_with(r#"work_dir = "relative/dir""#),
        r#"agents.toml:2:12: work_dir must be an absolute path without .., got "relative/dir""#,
    );
    check(agent_with(r#"work_dir = "/a/../etc""#), r#"agents.toml:2:12: work_dir must be an absolute path without .., got "/a/../etc""#);
    check(
        agent_with(r#"run_user = "-rf""#),
        r#"agents.toml:2:12: run_user must be 1-32 of [A-Za-z0-9._-], not starting with -, got "-rf""#,
    );
    check(
        agent_with(r#"default = { version = "1", md5 = "abc", cmd = "start" }"#),
        r#"agents.toml:2:34: md5 must be empty, 32 hex digits or an http(s) base URL, got "abc""#,
    );
    check(
        agent_with(r#"default = { version = "1", cmd = "restart" }"#),
        r#"agents.toml:2:34: cmd must be "start" or "stop", got "restart""#,
    );
    check(
        agent_with(r#"default = { version = "1/2" }"#),
        r#"agents.toml:2:23: version must be 1-64 of [A-Za-z0-9._+-], not . or .., got "1/2""#,
    );
    check(
        agent_with(r#"colour = "blue""#),
        "agents.toml:2:1: unknown field `colour`, expected one of `name`, `tarball`, `run_user`, `work_dir`, `config_file_name`, `config_remote_url`, `default`, `others`, `rollout`, `relay_cache`",
    );
    check("[[agent]]\nname = \"a\"\n".to_string(), "agents.toml:1:1: missing field `tarball`");
    check("[[agent]\n".to_string(), "agents.toml:1:9: unclosed array table, expected `]`");
}

#[test]
fn duplicates_are_refused() {
    let one = agent_with(r#"name = "a""#);
    let e = error_of(&format!("{one}{one}"));
    assert_eq!(e, r#"agents.toml:8:8: duplicate agent name "a""#);
    let dup = format!("{one}[[agent.others]]\nprefix = \"p\"\nversion = \"2\"\n[[agent.others]]\nprefix = \"p\"\nversion = \"3\"\n");
    assert_eq!(error_of(&dup), r#"agents.toml:11:10: duplicate prefix "p" in this agent"#);
    let bad_prefix = format!("{one}[[agent.others]]\nprefix = \"a b\"\nversion = \"2\"\n");
    assert_eq!(error_of(&bad_prefix), r#"agents.toml:8:10: prefix must be 1-255 of [A-Za-z0-9._-], got "a b""#);
}

const ROLLOUT: &str = r#"[[agent]]
name = "falcon-agent"
tarball = "http://f/r"
run_user = "u"
work_dir = "/w"
default = { version = "5.1.5", md5 = "" }
  [[agent.others]]
  prefix = "bj-web-"
  version = "5.1.4"
  [agent.rollout]
  from = { version = "5.1.3", md5 = "490ac172dabecc867289079d48e84a66" }
  waves = [1, 5, 25, 100]
  soak = "15m"
  advance_at = 0.95
  deadline = "20m"
  halt_when = { failed_ratio = 0.05, min_sample = 20 }
  max_in_flight_per_relay = 200
  window = { days = "mon-fri", hours = "09:00-17:00", tz = "UTC" }
"#;

#[test]
fn rollout_block_parses_and_holds_hosts_at_from_outside_the_groups() {
    let c = DesiredConfig::parse(ROLLOUT, "agents.toml").unwrap();
    let r = c.agents()[0].rollout.as_ref().unwrap();
    assert_eq!((r.from.version.as_str(), r.from.cmd), ("5.1.3", Cmd::Start));
    assert_eq!(r.policy.waves, vec![1, 5, 25, 100]);
    assert_eq!((r.policy.soak_seconds, r.policy.deadline_seconds), (900, 1200));
    assert_eq!((r.policy.advance_at_bp, r.policy.failed_ratio_bp, r.policy.min_sample), (9500, 500, 20));
    assert_eq!(r.max_in_flight_per_relay, Some(200));
    assert!(r.window.is_some() && !r.policy.paused && !r.policy.abort);
    // Wave 0 (no controller has opened a wave): the default hosts keep `from`, the
    // explicit test group keeps its own block.
    let d = &c.desired_ref("dc1-host-1")[0];
    assert_eq!((d.version.as_str(), d.md5.as_str()), ("5.1.3", "490ac172dabecc867289079d48e84a66"));
    assert_eq!(c.desired_ref("bj-web-7")[0].version, "5.1.4");
    // Defaults for everything but `from` and `waves`.
    let minimal = ROLLOUT.split("  soak").next().unwrap();
    let r = DesiredConfig::parse(minimal, "agents.toml").unwrap().agents()[0].rollout.clone().unwrap();
    assert_eq!((r.policy.soak_seconds, r.policy.deadline_seconds, r.max_in_flight_per_relay, r.window), (900, 1200, None, None));
}

#[test]
fn hosts_get_the_target_once_their_wave_is_open() {
    let c = DesiredConfig::parse(ROLLOUT, "agents.toml").unwrap();
    assert_eq!(c.rollouts().map(|a| a.name.as_str()).collect::<Vec<_>>(), ["falcon-agent"]);
    let hosts: Vec<String> = (0..2000).map(|i| format!("dc1-host-{i}")).collect();
    let version = |h: &str, fleet: &[usize]| {
        let class = c.class_of(h);
        c.variant(class, c.rollout_mask(h, class, fleet))[0].version.clone()
    };
    // Wave 0: everybody keeps `from`; the last wave open: everybody has the target.
    assert!(hosts.iter().all(|h| version(h, &[0]) == "5.1.3" && version(h, &[]) == "5.1.3"));
    assert!(hosts.iter().all(|h| version(h, &[4]) == "5.1.5"));
    // Wave 1 (1 %): exactly the hosts whose bucket is under 100, by the documented rule.
    for h in &hosts {
        let in_first = crate::rollout::bucket("falcon-agent", "5.1.5", h) < 100;
        assert_eq!(version(h, &[1]) == "5.1.5", in_first, "{h}");
    }
    let first = hosts.iter().filter(|h| version(h, &[1]) == "5.1.5").count();
    let second = hosts.iter().filter(|h| version(h, &[2]) == "5.1.5").count();
    assert!(first > 0 && first < second && second < 2000, "{first} {second}");
    // The target carries the default's digest; `from` its own.
    let h = hosts.iter().find(|h| version(h, &[1]) == "5.1.5").unwrap();
    let class = c.class_of(h);
    assert_eq!(c.variant(class, c.rollout_mask(h, class, &[1]))[0].md5, "");
    assert_eq!(c.variant(class, 0)[0].md5, "490ac172dabecc867289079d48e84a66");
    // The others group is outside the waves, whatever the fleet's wave.
    let web = c.class_of("bj-web-7");
    assert_eq!(c.rollout_mask("bj-web-7", web, &[4]), 0);
    assert_eq!(c.variant(web, 0xf)[0].version, "5.1.4");
    // abort: everybody back to `from`.
    let aborted = DesiredConfig::parse(&ROLLOUT.replace("  soak", "  abort = true\n  soak"), "a.toml").unwrap();
    assert!(hosts.iter().all(|h| aborted.rollout_mask(h, aborted.class_of(h), &[4]) == 0));
}

#[test]
fn at_most_four_rollouts() {
    let agent = |i: usize| {
        format!(
            "[[agent]]\nname = \"a{i}\"\ntarball = \"http://f/r\"\nrun_user = \"u\"\nwork_dir = \"/w\"\n\
                 default = {{ version = \"2\" }}\n[agent.rollout]\nfrom = {{ version = \"1\" }}\nwaves = [100]\n"
        )
    };
    let four: String = (0..4).map(agent).collect();
    assert_eq!(DesiredConfig::parse(&four, "x").unwrap().rollouts().count(), 4);
    let five = format!("{four}{}", agent(4));
    assert_eq!(error_of(&five), "agents.toml:43:1: at most 4 agents may have a rollout at once");
}

#[test]
fn the_enrollment_table_names_revoked_hosts_and_times() {
    use crate::enroll::HostRevocation;
    let base = "[[agent]]\nname = \"a\"\ntarball = \"http://f/r\"\nrun_user = \"u\"\nwork_dir = \"/w\"\ndefault = { version = \"1\" }\n";
    let c = DesiredConfig::parse(base, "agents.toml").unwrap();
    assert!(c.revocations().is_empty(), "no [enrollment]: nothing withdrawn");
    let text = format!(
        "{base}[enrollment]\nnot_before = 2026-01-01T00:00:00Z\nhosts.\"web-1\" = {{ not_before = 2026-01-02T00:00:00.25+01:00 }}\nhosts.\"web-9\" = {{ revoked = true }}\n"
    );
    let c = DesiredConfig::parse(&text, "agents.toml").unwrap();
    let r = c.revocations();
    assert_eq!(r.not_before_ms(), 1_767_225_600_000);
    assert_eq!(r.host("web-1"), Some(HostRevocation::NotBefore(1_767_308_400_250)));
    assert_eq!(r.host("web-9"), Some(HostRevocation::Revoked));
    assert_eq!(r.host("web-2"), None);
    let with = |tail: &str| DesiredConfig::parse(&format!("{base}[enrollment]\n{tail}\n"), "agents.toml").unwrap_err().to_string();
    assert!(with("hosts.\"a b\" = { revoked = true }").contains("bad hostname \"a b\""), "{}", with("hosts.\"a b\" = { revoked = true }"));
    assert!(with("hosts.h = { }").contains("either revoked = true or not_before"));
    assert!(with("hosts.h = { revoked = true, not_before = 2026-01-01T00:00:00Z }").contains("either revoked"));
    assert!(with("not_before = 2026-01-01T00:00:00").contains("not_before must be a full time with its offset"));
    assert!(with("revoked = [\"h\"]").contains("unknown field"), "{}", with("revoked = [\"h\"]"));
}

#[test]
fn bad_rollout_blocks_name_line_and_column() {
    let with = |from: &str, to: &str| error_of(&ROLLOUT.replace(from, to));
    assert_eq!(with("waves = [1, 5, 25, 100]", "waves = [1, 5, 25, 90]"), "agents.toml:12:11: waves must end at 100");
    assert_eq!(
        with("waves = [1, 5, 25, 100]", "waves = [1, 5, 5, 100]"),
        "agents.toml:12:18: waves are percents of the fleet, 1-100, strictly increasing; got 5"
    );
    assert_eq!(
        with("waves = [1, 5, 25, 100]", "waves = [0, 100]"),
        "agents.toml:12:12: waves are percents of the fleet, 1-100, strictly increasing; got 0"
    );
    let sixteen: Vec<String> = (85..=100).map(|p| p.to_string()).collect();
    assert_eq!(with("waves = [1, 5, 25, 100]", &format!("waves = [{}]", sixteen.join(", "))), "agents.toml:12:11: at most 15 waves");
    assert_eq!(with("advance_at = 0.95", "advance_at = 1.5"), "agents.toml:14:16: must be a ratio in (0, 1], got 1.5");
    assert_eq!(
        with("soak = \"15m\"", "soak = \"15 minutes\""),
        r#"agents.toml:13:10: duration must be a number with s, m, h or d ("15m"), got "15 minutes""#
    );
    assert_eq!(with("min_sample = 20", "min_sample = 0"), "agents.toml:16:51: min_sample must be at least 1, got 0");
    assert_eq!(
        with("max_in_flight_per_relay = 200", "max_in_flight_per_relay = 0"),
        "agents.toml:17:29: max_in_flight_per_relay must be at least 1, got 0"
    );
    assert_eq!(with("tz = \"UTC\"", "tz = \"CET\""), r#"agents.toml:18:12: tz must be "UTC" or a fixed offset like "+08:00", got "CET""#);
    assert_eq!(
        with("version = \"5.1.3\"", "version = \"5.1.5\""),
        r#"agents.toml:11:10: rollout.from is the default version "5.1.5": nothing to roll out"#
    );
    let unknown = with("  soak", "  speed = 3\n  soak");
    assert!(unknown.starts_with("agents.toml:13:3: unknown field `speed`"), "{unknown}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let e = DesiredConfig::load(Path::new("/nonexistent/agents.toml")).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/agents.toml: "), "{e}");
}

#[test]
fn example_file_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/agents.toml");
    let c = DesiredConfig::load(&path).unwrap();
    assert!(!c.agents().is_empty());
    assert!(c.class_count() > 1, "the example shows a prefix override");
}
