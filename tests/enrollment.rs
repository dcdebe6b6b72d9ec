//! End-to-end tests of host identity: the real updater enrolls with the enrollment secret and
//! reports with its credential through a real relay; a heartbeat with another host's
//! credential is refused, one with none (the stock Go updater's, or anyone's) is answered but
//! never replaces an enrolled host's state; `--require-enrollment` refuses it.

use std::time::Duration;

use ops_e2e::cluster::Cluster;
use ops_e2e::{Meta, eventually, get_json, post_json, workspace_root};
use serde_json::{Value, json};

const SECRET: &str = "enroll-secret-0123456789abcdef";

fn agents() -> String {
    std::fs::read_to_string(workspace_root().join("config/examples/agents.toml")).unwrap()
}

/// One agent installed under `work` from a server that refuses connections: the updater's
/// cycle fails its download (a `lastError`) and reports.
fn local_agents(work: &std::path::Path) -> String {
    format!(
        "[[agent]]\nname = \"falcon-agent\"\ntarball = \"http://127.0.0.1:9/releases\"\nrun_user = \"{}\"\nwork_dir = \"{}\"\ndefault = {{ version = \"5.1.4\", md5 = \"\", cmd = \"start\" }}\n",
        String::from_utf8_lossy(&std::process::Command::new("id").arg("-un").output().expect("id -un").stdout).trim(),
        work.display()
    )
}

/// A host key file (`opsctl host-key`) and an enrollment secret file in `dir`.
fn enrollment_files(dir: &std::path::Path) -> (String, String) {
    let key = dir.join("host.keys").display().to_string();
    let (code, out, err) = ops_e2e::opsctl(&["host-key", "--out", &key]);
    assert_eq!(code, 0, "{out}{err}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600, "the host key is its owner's only");
    let secret = dir.join("enroll.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    (key, secret.display().to_string())
}

fn post(url: &str, headers: &[(&str, &str)], body: String) -> (u16, Value) {
    let mut req = reqwest::blocking::Client::new().post(url).body(body).timeout(Duration::from_secs(10));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn heartbeat(host: &str, version: &str, error: &str) -> String {
    let mut agent = json!({"name": "falcon-agent", "version": version, "status": "started", "timestamp": 1});
    if !error.is_empty() {
        agent["lastError"] = json!(error);
    }
    json!({"hostname": host, "ip": "10.0.0.1", "realAgents": [agent]}).to_string()
}

fn host_view(c: &Cluster, host: &str) -> Value {
    get_json(&c.meta(0).url(&format!("/status/host/{host}"))).1
}

/// One meta node and one relay that check and issue host credentials, the agents installed
/// under `work`; and the enrollment secret's file.
fn enrolling_cluster(work: &std::path::Path) -> (Cluster, String) {
    let mut c = Cluster::files(1, &local_agents(work));
    let (key, secret) = enrollment_files(c.dir.path());
    let flags = vec![format!("--host-key-file={key}"), format!("--enroll-secret-file={secret}")];
    c.meta_args.extend(flags.iter().cloned());
    c.relay_args.extend(flags);
    c.start_all(1);
    (c, secret)
}

#[test]
fn only_a_hosts_own_credential_changes_what_is_stored_of_it() {
    let work = tempfile::tempdir().unwrap();
    let (c, secret) = enrolling_cluster(work.path());
    let relay = c.relays[0].url("");
    let relay = relay.trim_end_matches('/');

    // The real updater enrolls through the relay, keeps its credential (0600) and reports with it.
    let state = c.dir.path().join("updater-state");
    let secret_arg = format!("--enroll-secret-file={secret}");
    let state_arg = format!("--state-dir={}", state.display());
    let server = format!("--server={relay}");
    let updater = |ip: &str| {
        let ip = format!("--ip={ip}");
        ops_e2e::Proc::run_to_exit(
            "ops-updater",
            &["--once", &server, "--hostname=web-1", &ip, "--control-timeout-seconds=2", &secret_arg, &state_arg],
        )
        .1
    };
    let log = updater("10.0.0.9");
    assert!(log.contains("enrolled: host credential kept"), "{log}");
    let kept = state.join("host-credential");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&kept).unwrap().permissions().mode() & 0o777, 0o600);
    let credential = std::fs::read_to_string(&kept).unwrap().trim().to_owned();
    let enrolled = eventually(Duration::from_secs(15), || (host_view(&c, "web-1")["authenticated"] == true).then_some(()));
    assert!(enrolled.is_some(), "the updater's reports are authenticated: {}", host_view(&c, "web-1"));
    assert_eq!(host_view(&c, "web-1")["ip"], "10.0.0.9");

    // Enrolling needs the secret.
    let (status, reply) = post(&format!("{relay}/enroll"), &[("authorization", "Bearer wrong")], json!({"hostname": "x"}).to_string());
    assert_eq!(status, 401, "{reply}");
    let (status, reply) =
        post(&format!("{relay}/enroll"), &[("authorization", &format!("Bearer {SECRET}"))], json!({"hostname": "web-2"}).to_string());
    assert_eq!(status, 200, "{reply}");
    let web2 = reply["credential"].as_str().unwrap().to_owned();

    // Another host's credential, a forged one: refused with the reason, nothing goes on.
    let cred = ops_config::enroll::CREDENTIAL_HEADER;
    let (status, reply) = post(&format!("{relay}/heartbeat"), &[(cred, &web2)], heartbeat("web-1", "6.6.6", "halt it"));
    assert_eq!(status, 401, "{reply}");
    assert!(reply["errorMessage"].as_str().unwrap().contains("not web-1's"), "{reply}");
    let last = if credential.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &credential[..credential.len() - 1]);
    let (status, _) = post(&format!("{relay}/heartbeat"), &[(cred, &forged)], heartbeat("web-1", "6.6.6", "halt it"));
    assert_eq!(status, 401);
    // None at all: answered with the desired state (the stock Go updater gets it), and never
    // stored over the enrolled host's.
    let (status, reply) = post_json(&format!("{relay}/heartbeat"), heartbeat("web-1", "6.6.6", "halt it"));
    assert_eq!(status, 200, "{reply}");
    assert!(reply["desiredAgents"].as_array().is_some_and(|a| !a.is_empty()), "{reply}");
    let ignored = eventually(Duration::from_secs(15), || {
        let text = ops_e2e::metric_at(c.meta(0).url("").trim_end_matches('/'), "ops_meta_reports_unauthenticated_ignored_total");
        (text >= 1.0).then_some(())
    });
    assert!(ignored.is_some(), "the meta node saw the report and ignored it");
    let h = host_view(&c, "web-1");
    assert_eq!((h["authenticated"].as_bool(), h["ip"].as_str()), (Some(true), Some("10.0.0.9")), "nothing of it stored: {h}");
    assert!(h["agents"].as_array().unwrap().iter().all(|a| a["lastError"] != "halt it" && a["version"] != "6.6.6"), "{h}");

    // A host that never enrolled (a Go updater) is held, marked unauthenticated.
    let (status, _) = post_json(&format!("{relay}/heartbeat"), heartbeat("go-1", "5.1.3", ""));
    assert_eq!(status, 200);
    let go = eventually(Duration::from_secs(15), || {
        let h = host_view(&c, "go-1");
        (h["hostname"] == "go-1").then_some(h)
    })
    .expect("go-1 held");
    assert_eq!(go["authenticated"], false, "{go}");

    // The updater's next cycle still reports with the kept credential.
    let log = updater("10.0.0.10");
    assert!(!log.contains("enrolled:"), "enrolled once only: {log}");
    let again = eventually(Duration::from_secs(15), || (host_view(&c, "web-1")["ip"] == "10.0.0.10").then_some(()));
    assert!(again.is_some(), "{}", host_view(&c, "web-1"));
}

#[test]
fn with_require_enrollment_a_heartbeat_without_a_credential_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _) = enrollment_files(dir.path());
    let agents_path = dir.path().join("agents.toml");
    std::fs::write(&agents_path, agents()).unwrap();
    let (a, d) = (agents_path.display().to_string(), dir.path().join("data").display().to_string());
    let meta = Meta::start(&["--agents", &a, "--data-dir", &d, "--host-key-file", &key, "--require-enrollment"]);
    let (status, reply) = post_json(&meta.url("/heartbeat"), heartbeat("go-1", "5.1.3", ""));
    assert_eq!(status, 401, "{reply}");
    assert!(reply["errorMessage"].as_str().unwrap().contains("requires a host credential"), "{reply}");
    assert_eq!(get_json(&meta.url("/status/host/go-1")).0, 404, "nothing stored");
    let (status, reply) = post_json(&meta.url("/enroll"), json!({"hostname": "go-1"}).to_string());
    assert_eq!(status, 404, "this node has no enrollment secret: {reply}");
    // Flags that need a host key are refused without one.
    let bad = ops_e2e::Meta::try_start_at("127.0.0.1:0", &["--agents", &a, "--data-dir", &d, "--require-enrollment"]);
    assert!(bad.is_err_and(|log| log.contains("need --host-key-file")));
}

/// `opsctl enrollment` against a real meta node and relay, with the real updater: a
/// re-enrolment refuses the credential a host holds (a stolen copy too) at the relay and the
/// meta node, and the updater enrolls again in the same cycle; a revocation refuses the
/// host's credentials and its enrolment, and a relay that has not yet taken the config cannot
/// slip its reports past the meta node. The records lose their authenticated mark.
#[test]
fn withdrawn_credentials_are_refused_everywhere_and_the_updater_enrolls_again() {
    let work = tempfile::tempdir().unwrap();
    let (c, secret) = enrolling_cluster(work.path());
    let relay = c.relays[0].url("");
    let relay = relay.trim_end_matches('/').to_owned();
    let meta = c.meta(0).url("");
    let meta = meta.trim_end_matches('/').to_owned();
    let server = format!("--server={}", c.meta(0).addr);
    let token = format!("--token-file={}", c.dir.path().join("cluster.token").display());

    let state = c.dir.path().join("updater-state");
    let (secret_arg, state_arg, relay_arg) =
        (format!("--enroll-secret-file={secret}"), format!("--state-dir={}", state.display()), format!("--server={relay}"));
    let updater = |ip: &str| {
        let ip = format!("--ip={ip}");
        let (_, log) = ops_e2e::Proc::run_to_exit(
            "ops-updater",
            &["--once", &relay_arg, "--hostname=web-1", &ip, "--control-timeout-seconds=2", &secret_arg, &state_arg],
        );
        log
    };
    let credential = || std::fs::read_to_string(state.join("host-credential")).map(|c| c.trim().to_owned()).unwrap_or_default();
    let log = updater("10.0.0.1");
    assert!(log.contains("enrolled: host credential kept"), "{log}");
    let stolen = credential();
    assert!(eventually(Duration::from_secs(15), || (host_view(&c, "web-1")["authenticated"] == true).then_some(())).is_some());
    let relay_hash = |c: &Cluster| get_json(&c.relays[0].url("/health")).1["configHash"].as_str().unwrap_or("").to_owned();
    let meta_hash = |c: &Cluster| get_json(&c.meta(0).url("/health")).1["configHash"].as_str().unwrap_or("").to_owned();
    let relay_took_it = |c: &Cluster| eventually(Duration::from_secs(15), || (relay_hash(c) == meta_hash(c)).then_some(())).is_some();

    // re-enroll: the credential held now is refused at both; the updater enrolls again.
    let (code, out, err) = ops_e2e::opsctl(&[&server, &token, "enrollment", "re-enroll", "web-1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("[enrollment.hosts]") && out.contains("web-1 = { not_before = "), "{out}");
    assert!(relay_took_it(&c), "the relay takes the edited config");
    assert_eq!(host_view(&c, "web-1")["authenticated"], false, "the record's mark is cleared: {}", host_view(&c, "web-1"));
    let cred = ops_config::enroll::CREDENTIAL_HEADER;
    for url in [&relay, &meta] {
        let (status, reply) = post(&format!("{url}/heartbeat"), &[(cred, &stolen)], heartbeat("web-1", "6.6.6", "halt it"));
        assert_eq!(status, 401, "{url}: {reply}");
        assert!(reply["errorMessage"].as_str().unwrap().contains("issued before the operator's not_before"), "{reply}");
    }
    assert!(ops_e2e::metric_at(&relay, "ops_relay_credential_revoked_total") >= 1.0);
    assert!(ops_e2e::metric_at(&meta, "ops_meta_credential_revoked_total") >= 1.0);
    let log = updater("10.0.0.2");
    assert!(log.contains("host credential refused: enrolling again") && log.contains("enrolled: host credential kept"), "{log}");
    let fresh = credential();
    assert!(!fresh.is_empty() && fresh != stolen, "a new credential");
    let back = eventually(Duration::from_secs(15), || {
        let h = host_view(&c, "web-1");
        (h["ip"] == "10.0.0.2" && h["authenticated"] == true).then_some(())
    });
    assert!(back.is_some(), "the same cycle reported with the new credential: {}", host_view(&c, "web-1"));
    let (code, out, err) = ops_e2e::opsctl(&[&server, "enrollment", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("web-1") && out.contains("issued before") && out.contains("authenticated"), "{out}");

    // revoke: every credential of web-1 refused, its enrolment too.
    let (code, out, err) = ops_e2e::opsctl(&[&server, &token, "enrollment", "revoke", "web-1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(relay_took_it(&c));
    let (status, reply) = post(&format!("{relay}/heartbeat"), &[(cred, &fresh)], heartbeat("web-1", "6.6.6", "halt it"));
    assert_eq!(status, 401, "{reply}");
    assert!(reply["errorMessage"].as_str().unwrap().contains("revoked by the operator"), "{reply}");
    let (status, reply) =
        post(&format!("{relay}/enroll"), &[("authorization", &format!("Bearer {SECRET}"))], json!({"hostname": "web-1"}).to_string());
    assert_eq!(status, 403, "{reply}");
    assert_eq!(host_view(&c, "web-1")["authenticated"], false);
    // A relay with an older config (or a hostile one with a relay's token) forwards a report
    // with the revoked credential's serial: the meta node drops it.
    let serial: u64 = fresh.split('.').nth(2).unwrap().parse().unwrap();
    let mut body = Vec::new();
    ops_config::compact::begin(&mut body);
    let hb = ops_config::Heartbeat {
        hostname: "web-1".into(),
        ip: "10.6.6.6".into(),
        run_user: "".into(),
        updater_version: "".into(),
        real_agents: Vec::new(),
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as u32;
    ops_config::compact::encode(
        ops_config::compact::Record { seen: now + 1, told: 0, relay: "relay-1", auth: Some(serial) },
        &hb,
        &mut body,
    );
    let r = reqwest::blocking::Client::new()
        .post(format!("{meta}/internal/batch"))
        .bearer_auth(ops_e2e::cluster::TOKEN)
        .header("content-type", ops_config::compact::CONTENT_TYPE)
        .body(body)
        .timeout(Duration::from_secs(10))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{:?}", r.text());
    assert_eq!(ops_e2e::metric_at(&meta, "ops_meta_reports_revoked_total"), 1.0);
    assert_eq!(host_view(&c, "web-1")["ip"], "10.0.0.2", "nothing of it stored");
    // The updater cannot enroll; it goes on without a credential, answered, unauthenticated.
    let log = updater("10.0.0.3");
    assert!(log.contains("cannot enroll") && log.contains("revoked by the operator"), "{log}");
    let unauth = eventually(Duration::from_secs(15), || (host_view(&c, "web-1")["ip"] == "10.0.0.3").then_some(()));
    assert!(unauth.is_some(), "stored as unauthenticated: {}", host_view(&c, "web-1"));
    assert_eq!(host_view(&c, "web-1")["authenticated"], false);
    let (code, out, _) = ops_e2e::opsctl(&[&server, "enrollment", "list"]);
    assert!(code == 0 && out.contains("revoked (credentials and enrollment)") && out.contains("unauthenticated"), "{out}");

    // restore: it may enroll again.
    let (code, out, err) = ops_e2e::opsctl(&[&server, &token, "enrollment", "restore", "web-1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(relay_took_it(&c));
    let log = updater("10.0.0.4");
    assert!(log.contains("enrolled: host credential kept"), "{log}");
    let restored = eventually(Duration::from_secs(15), || {
        let h = host_view(&c, "web-1");
        (h["ip"] == "10.0.0.4" && h["authenticated"] == true).then_some(())
    });
    assert!(restored.is_some(), "{}", host_view(&c, "web-1"));
}
