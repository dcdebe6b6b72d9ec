//! `opsctl ca init` and `opsctl ca issue`: the cluster CA and the certificates that give meta
//! nodes and relays their identity under mTLS (`mtls = true` in cluster.toml). A meta node's
//! certificate names `{id}.meta.ops-fleet`, a relay's `{id}.relay.ops-fleet`
//! (`ops_config::cluster::{node_name, relay_name}`); both serve and show them as clients
//! (server and client auth), and `--san` adds the names or addresses updaters and operators
//! reach them at.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::{Failure, create_new};

/// Who a certificate is for.
pub enum Subject<'a> {
    Node(&'a str),
    Relay(&'a str),
}

fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

fn failed(what: &str) -> impl Fn(rcgen::Error) -> Failure + '_ {
    move |e| Failure::Usage(format!("{what}: {e}"))
}

/// Makes the cluster CA in `dir` (`ca.pem`, `ca.key` mode 0600), valid `days`. Never
/// overwrites.
pub fn init(dir: &Path, name: &str, days: i64) -> Result<(), Failure> {
    std::fs::create_dir_all(dir).map_err(|e| Failure::Usage(format!("{}: {e}", dir.display())))?;
    let (cert_path, key_path) = paths(dir);
    if cert_path.exists() || key_path.exists() {
        return Err(Failure::Usage(format!("{} holds a CA already: not overwriting it", dir.display())));
    }
    let key = KeyPair::generate().map_err(failed("key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(failed("CA"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    (params.not_before, params.not_after) = (now - time::Duration::hours(1), now + time::Duration::days(days));
    let cert = params.self_signed(&key).map_err(failed("CA"))?;
    create_new(&key_path, 0o600, &key.serialize_pem())?;
    create_new(&cert_path, 0o644, &cert.pem())?;
    println!("cluster CA: {} (give it as ca_file in cluster.toml), key {} (keep it offline)", cert_path.display(), key_path.display());
    Ok(())
}

/// Issues a certificate for `subject` signed by the CA in `dir`, valid `days`, with `sans`
/// besides its identity name: `{dir}/{id}.pem` and `{dir}/{id}.key` (mode 0600), or `out`.
pub fn issue(dir: &Path, subject: Subject, sans: &[String], days: i64, out: Option<&Path>) -> Result<(), Failure> {
    let (cert_path, key_path) = paths(dir);
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Failure::Usage(format!("{}: {e}", p.display())));
    let ca_key = KeyPair::from_pem(&read(&key_path)?).map_err(failed("CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&cert_path)?, ca_key).map_err(failed("CA certificate"))?;
    let (id, name) = match subject {
        Subject::Node(id) => (id, ops_config::cluster::node_name(id)),
        Subject::Relay(id) => (id, ops_config::cluster::relay_name(id)),
    };
    if !ops_config::cluster::lower_dns_label(id) {
        return Err(Failure::Usage(format!("{id:?}: an id named in a certificate is a lowercase DNS label (letters, digits, inner -)")));
    }
    let mut names = vec![name.clone()];
    names.extend(sans.iter().cloned());
    let mut params = CertificateParams::new(names).map_err(failed("--san"))?;
    params.distinguished_name.push(DnType::CommonName, name.as_str());
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.use_authority_key_identifier_extension = true;
    let now = time::OffsetDateTime::now_utc();
    (params.not_before, params.not_after) = (now - time::Duration::hours(1), now + time::Duration::days(days));
    let key = KeyPair::generate().map_err(failed("key"))?;
    let cert = params.signed_by(&key, &issuer).map_err(failed("certificate"))?;
    let base = out.map_or_else(|| dir.join(id), Path::to_path_buf);
    let (pem, key_out) = (base.with_extension("pem"), base.with_extension("key"));
    create_new(&key_out, 0o600, &key.serialize_pem())?;
    create_new(&pem, 0o644, &cert.pem())?;
    println!("{name}: {} and {} (give them as --tls-cert and --tls-key)", pem.display(), key_out.display());
    Ok(())
}
