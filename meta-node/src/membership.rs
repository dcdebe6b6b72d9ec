//! Membership changes online: a node added to or removed from `cluster.toml` takes effect
//! without a restart.
//!
//! Any node coordinates (`GET /cluster/reload?all=1`, `api::cluster`): it reads its own
//! `cluster.toml` and walks every node of the old and the new map through three steps, each
//! `POST /internal/cluster/{step}` with the new map's text:
//!
//! 1. **prepare**: each node validates the map and keeps it as `next`; each old owner sends
//!    the hosts that change owner to their new owner (compact batches marked as handed back,
//!    the failover hand-back's path, marked with the new map's hash), where they wait as
//!    copies. The coordinator prepares every node at once, so such hosts may arrive before
//!    the receiver's own prepare: the change is on there from the first of them (its
//!    hand-back paused), or it would send them home and drop them, and a gather would miss
//!    them until the change ended. Nothing serves the new map yet. Any node refusing or
//!    unreachable aborts the change everywhere: nothing changed.
//! 2. **commit**: each node serves the new map (writes its `cluster.toml` first, so a restart
//!    keeps it), sets the `owned` flag of every host it holds by the new ring, and keeps the
//!    old map as `previous`. Heartbeats of moved hosts that still arrive at their old owner
//!    (a relay that has not learnt the map yet) are forwarded to the new one.
//! 3. **finish**: each node drops `previous`; the hand-back loop then sends what reported at
//!    the old owner since the prepare, and drops it there.
//!
//! Status stays whole throughout: a gathering node passes its map's hash, and a node answers
//! by that map's ring (current, previous or next) while a change is on, so one gather counts
//! every host exactly once by one ring, whichever nodes already committed. The hand-back is
//! paused while a change is on, so the old owner still holds what an old-map gather asks of
//! it. A node that leaves keeps serving until it is stopped: it owns nothing, forwards every
//! heartbeat it still gets and answers `GET /cluster/map` with the new map, from which relays
//! learn it.
//!
//! A change left half done (the coordinator died) ends by itself after [`CHANGE_TIMEOUT`]: a
//! prepared map is dropped, a committed one finished.
//!
//! **Generations.** Every change gives the map a generation one above the highest any node
//! held at prepare, which each node keeps beside its data (`cluster-generation`, outside the
//! file) and shows on `/health` (`clusterGeneration`) and `GET /cluster/map`
//! (`x-ops-cluster-generation`). A node that missed a commit (it died between prepare and
//! commit) finds a peer at a higher generation at its next probe and takes that peer's map the
//! way a change would, locally ([`catch_up`]); relays never take a map of a lower generation
//! than one they took. One generation with two hashes is a divergence (`crate::coordination::peers`).
//!
//! **Signed maps.** With trusted keys (`--trusted-key`), a map is taken only with the
//! operator's signature (`cluster.toml.sig`, sent as `x-ops-signature` with the prepare and
//! with `GET /cluster/map`) and when fresh (`ops_config::trust::check_fresh`): a version above
//! the highest this node verified (`cluster-version` in the data dir), not expired. The map's
//! generation is then its signed `version`, not a count of changes: a node, a coordinator or
//! anything answering on a peer's address can move hosts and credentials only to nodes that
//! the operator signed into a map.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use compact_str::CompactString;
use ops_config::ClusterMap;
use ops_config::reply::StepReply;
use ops_serve::forward::{Entry, Pending};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::store::SHARDS;
use crate::{Cluster, Node};

/// A change not carried to its end within this is ended here.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long after a change a node it left out may still post batches (under mTLS it is
/// known by its certificate only that long): what it held goes to the owners meanwhile.
pub const DEPARTED_GRACE: Duration = Duration::from_secs(600);

/// Where a node keeps its map's generation, in its data dir.
const GENERATION_FILE: &str = "cluster-generation";

/// Shards scanned per blocking step of the prepare's push.
const SHARDS_PER_STEP: usize = 16;

/// The cluster map a node serves, and the one it is moving from or to.
pub struct Membership {
    current: ArcSwap<Cluster>,
    /// Committed away from, until finish: gathers by nodes not yet committed use it.
    previous: ArcSwapOption<Cluster>,
    /// Prepared, not committed.
    next: ArcSwapOption<Cluster>,
    /// The change on now, if any.
    change: Mutex<Option<Change>>,
    /// Nodes the last change left out, and when it ended: they may still hand back what they
    /// hold for [`DEPARTED_GRACE`] ([`Membership::departed`]).
    departed: Mutex<Vec<(String, Instant)>>,
    /// The cluster file, rewritten at commit.
    path: Option<PathBuf>,
    /// The generation of the map served (0: never changed online), kept in `data_dir`.
    generation: AtomicU64,
    data_dir: PathBuf,
    /// One coordinated change at a time on this node.
    pub(crate) coordinating: tokio::sync::Mutex<()>,
    /// Held through a commit: the coordinator's and a catch-up's never interleave.
    committing: tokio::sync::Mutex<()>,
    /// The forwarder of the current map: the token that drains and stops it, and its task.
    forwarder: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
    /// Ends the current map's tasks (the peers' rollout poll).
    tasks: Mutex<CancellationToken>,
    /// With trusted keys: the highest signed map version verified (`cluster-version`).
    floor: Option<ops_serve::floor::VersionFloor>,
}

impl Membership {
    /// `data_dir` holds the map's generation (with `signed`: the version floor, and the
    /// generation is the map's version; the caller checked the map against the floor).
    pub fn new(cluster: Cluster, path: Option<PathBuf>, data_dir: &Path, signed: bool) -> Self {
        let floor = signed.then(|| ops_serve::floor::VersionFloor::open_map(data_dir));
        let generation = match (&floor, cluster.map.version) {
            (Some(f), _) => {
                if let Err(error) = f.raise(&cluster.map) {
                    tracing::error!(%error, "cannot keep the signed cluster map version");
                }
                cluster.map.version.unwrap_or(0)
            }
            _ => std::fs::read_to_string(data_dir.join(GENERATION_FILE)).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0),
        };
        Membership {
            floor,
            generation: AtomicU64::new(generation),
            data_dir: data_dir.to_path_buf(),
            current: ArcSwap::from_pointee(cluster),
            previous: ArcSwapOption::empty(),
            next: ArcSwapOption::empty(),
            change: Mutex::new(None),
            departed: Mutex::new(Vec::new()),
            path,
            coordinating: tokio::sync::Mutex::new(()),
            committing: tokio::sync::Mutex::new(()),
            forwarder: Mutex::new(None),
            tasks: Mutex::new(CancellationToken::new()),
        }
    }

    /// The map served now.
    pub fn current(&self) -> Arc<Cluster> {
        self.current.load_full()
    }

    /// The same without a reference count (the heartbeat path).
    pub fn guard(&self) -> arc_swap::Guard<Arc<Cluster>> {
        self.current.load()
    }

    /// The generation of the map served.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a change is on (prepared or committed, not finished).
    pub fn changing(&self) -> bool {
        self.change.lock().is_some()
    }

    /// This node takes part in a change (its own prepare or commit): it is on from now, or
    /// since it began, and no longer one that only moved hosts began.
    fn begin_change(&self) {
        self.change.lock().get_or_insert_with(|| Change { since: Instant::now(), unprepared: None }).unprepared = None;
    }

    /// The change is over here (finished, aborted or expired).
    fn change_over(&self) {
        *self.change.lock() = None;
    }

    /// Whether a change is committed here and not finished (a map is only prepared
    /// otherwise, or none): a peer's newer map waits for its end.
    pub fn committed_unfinished(&self) -> bool {
        self.previous.load().is_some()
    }

    /// Hosts moved by the map whose hash is `hash` arrive: unless this node serves that map,
    /// the change is on here from now (the hand-back paused), prepared or not yet (the
    /// coordinator prepares every node at once). Returns whether it began here. A change
    /// begun so lasts only until [`expire`](Self::expire)'s grace unless this node's own
    /// prepare follows: a peer cannot hold the hand-back off with a map nobody prepares.
    pub fn moving_in(&self, hash: &str) -> bool {
        if self.current.load().map.hash == hash {
            return false;
        }
        let mut change = self.change.lock();
        let began = change.is_none();
        if began {
            *change = Some(Change { since: Instant::now(), unprepared: Some(hash.to_owned()) });
        }
        began
    }

    /// The map whose hash is `hash` among the current, previous and next ones.
    pub fn by_hash(&self, hash: &str) -> Option<Arc<Cluster>> {
        [Some(self.current.load_full()), self.previous.load_full(), self.next.load_full()]
            .into_iter()
            .flatten()
            .find(|c| c.map.hash == hash)
    }

    /// The cluster file's path, if the node was started with one.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// Whether `id` left the map in a change that ended less than [`DEPARTED_GRACE`] ago: it
    /// still sends the hosts it held to their owners, and its batches are taken.
    pub fn departed(&self, id: &str) -> bool {
        self.departed.lock().iter().any(|(d, at)| d == id && at.elapsed() < DEPARTED_GRACE)
    }

    /// Drops the previous map (a change ends), keeping the nodes it had that the current
    /// one has not as departed.
    fn end_change(&self) -> Option<Arc<Cluster>> {
        let old = self.previous.swap(None)?;
        let current = self.current();
        let mut departed = self.departed.lock();
        departed.retain(|(_, at)| at.elapsed() < DEPARTED_GRACE);
        for n in old.map.nodes.iter().filter(|n| current.map.index_of(&n.id).is_none()) {
            departed.retain(|(d, _)| d != &n.id);
            departed.push((n.id.clone(), Instant::now()));
        }
        old.stop.cancel();
        Some(old)
    }

    /// Whether `id` is a node of the current, previous or next map.
    pub fn knows(&self, id: &str) -> bool {
        [Some(self.current.load_full()), self.previous.load_full(), self.next.load_full()]
            .into_iter()
            .flatten()
            .any(|c| c.map.index_of(id).is_some())
    }

    /// Ends a change nobody finished within [`CHANGE_TIMEOUT`], and one that only moved hosts
    /// began here ([`moving_in`](Self::moving_in)) when this node's own prepare has not come
    /// within `grace` (called by the hand-back loop).
    pub fn expire(&self, grace: Duration) {
        let stray = {
            let mut change = self.change.lock();
            let hash = change.as_ref().filter(|c| c.since.elapsed() > grace).and_then(|c| c.unprepared.clone());
            if hash.is_some() {
                *change = None;
            }
            hash
        };
        if let Some(hash) = stray {
            metrics::counter!(crate::metrics::UNPREPARED_MOVES).increment(1);
            tracing::warn!(
                %hash,
                grace_seconds = grace.as_secs(),
                "hosts were moved here for a cluster map this node was not asked to prepare within the grace; the change is off, the hand-back resumes"
            );
            return;
        }
        let overdue = self.change.lock().as_ref().is_some_and(|c| c.since.elapsed() > CHANGE_TIMEOUT);
        if !overdue {
            return;
        }
        if self.next.swap(None).is_some() {
            tracing::warn!("a prepared cluster map was never committed; dropped");
        }
        if self.end_change().is_some() {
            tracing::warn!("a cluster map change was never finished; finished here");
        }
        self.change_over();
    }
}

/// A membership change on at a node.
struct Change {
    /// When it began here.
    since: Instant,
    /// Begun by moved hosts only ([`Membership::moving_in`]): the map they name. Such a
    /// change ends at [`Membership::expire`]'s grace unless this node's own prepare comes.
    unprepared: Option<String>,
}

/// Builds what node `id` knows of the cluster `map`. A node that `map` leaves out is leaving:
/// it is kept as an extra entry past the ring's nodes, so it can still gather and serve, but
/// it owns no host (the forwarder and the ring know only the map's nodes).
pub fn build(
    settings: &crate::Settings,
    map: &ClusterMap,
    signature: Option<String>,
    my_addr: Option<std::net::SocketAddr>,
    stop: CancellationToken,
) -> Result<Cluster, String> {
    let mut forward = settings.forward.clone();
    // Under mTLS a peer is known by its certificate: the token is never sent.
    forward.token = settings.token.clone().filter(|_| !map.mtls);
    let forwarder = ops_serve::forward::Forwarder::new(map, forward, stop.clone());
    let client =
        ops_serve::tls::for_cluster(reqwest::Client::builder().no_proxy(), map).and_then(|b| b.build().map_err(|e| e.to_string()))?;
    let ring = map.ring();
    let (map, me, leaving) = match map.index_of(&settings.id) {
        Some(me) => (map.clone(), me, false),
        None => {
            let mut with_me = map.clone();
            let addr = my_addr.ok_or("this node is not in the map")?;
            with_me.nodes.push(ops_config::NodeSpec { id: settings.id.clone(), addr, weight: 1 });
            let me = with_me.nodes.len() - 1;
            (with_me, me, true)
        }
    };
    Ok(Cluster {
        alive: crate::coordination::peers::Peers::new(map.nodes.len(), me),
        ring,
        me,
        forwarder,
        client,
        map,
        signature,
        leaving,
        stop,
    })
}

/// Starts the tasks that belong to the current map (its forwarder, the peers' rollout
/// poll), and drains and stops those of the map before it.
pub fn start_map_tasks(node: &Arc<Node>) {
    let background = &node.background;
    let Some(m) = &node.cluster else { return };
    let c = m.current();
    let drain = CancellationToken::new();
    let task = tokio::spawn(c.forwarder.clone().run(drain.clone()));
    if let Some((old_drain, _old)) = m.forwarder.lock().replace((drain, task)) {
        // The old forwarder sends what it holds to the old map's owners, which forward
        // what they no longer own; then it stops.
        old_drain.cancel();
    }
    let tasks = background.child_token();
    std::mem::replace(&mut *m.tasks.lock(), tasks.clone()).cancel();
    let n = node.clone();
    let nodes = ops_serve::rollout::Nodes {
        client: c.client.clone(),
        bases: (0..c.map.nodes.len()).map(|i| c.map.url(i, "")).collect(),
        skip: Some(c.me),
        token: node.peer_token().cloned(),
    };
    tokio::spawn(node.rollouts.clone().poll(nodes, node.settings.rollout_interval, move || Some(n.desired.current()), tasks));
}

/// Drains the current forwarder (shutdown), waiting up to `grace`.
pub async fn drain(node: &Node, grace: Duration) {
    let Some(m) = &node.cluster else { return };
    let taken = m.forwarder.lock().take();
    if let Some((drain, task)) = taken {
        drain.cancel();
        if tokio::time::timeout(grace, task).await.is_err() {
            tracing::warn!("forwarder did not drain within the grace period");
        }
    }
    m.tasks.lock().cancel();
}

/// Step 1 on this node: validates `text` (with trusted keys: its `signature` and version),
/// keeps it as the next map and sends the hosts that change owner to their new owner.
pub async fn prepare(node: &Arc<Node>, text: &str, signature: Option<&str>) -> Result<StepReply, String> {
    let m = node.cluster.as_ref().ok_or("this node is standalone: start it with --cluster to change membership online")?;
    let map = verify(node, m, text, signature)?;
    let current = m.current();
    let generation = m.generation();
    let reply =
        |moved, unchanged| StepReply { id: node.settings.id.clone(), hash: map.hash.clone(), moved, unchanged, remarked: 0, generation };
    if map.hash == current.map.hash {
        return Ok(reply(0, true));
    }
    if let Some(why) = map.online_change_refused(&current.map) {
        return Err(why);
    }
    if let Some(next) = m.next.load_full()
        && next.map.hash != map.hash
    {
        return Err(format!("another change (to map {}) is being prepared here", next.map.hash));
    }
    let my_addr = current.map.nodes[current.me].addr;
    let signature = signature.map(ops_config::trust::signature_header);
    let next = Arc::new(build(&node.settings, &map, signature, Some(my_addr), node.stop.child_token())?);
    // The change is on (the hand-back paused) before moved hosts are taken here.
    m.begin_change();
    m.next.store(Some(next.clone()));
    let moved = push_moving(node, &next).await?;
    tracing::info!(hash = %map.hash, moved, nodes = map.nodes.len(), "cluster map prepared; moving hosts sent to their new owners");
    Ok(reply(moved, false))
}

/// The map of `text`, when this node may take it: parsed and, with trusted keys, signed by
/// the operator and fresh (above the highest version verified here, not expired).
pub fn verify(node: &Node, m: &Membership, text: &str, signature: Option<&str>) -> Result<ClusterMap, String> {
    let file = m.path().map_or_else(|| PathBuf::from("cluster.toml"), PathBuf::from);
    let map = ops_config::trust::parse_signed_map(text, signature, &node.settings.trusted_keys, &file).map_err(|e| e.to_string())?;
    if let Some(floor) = &m.floor {
        floor.check(&map).map_err(|e| format!("signed cluster map refused: {e}"))?;
    }
    Ok(map)
}

/// Sends every host this node owns that `next` gives another node to that node.
async fn push_moving(node: &Arc<Node>, next: &Arc<Cluster>) -> Result<usize, String> {
    let mut moved = 0;
    for first in (0..SHARDS).step_by(SHARDS_PER_STEP) {
        let (n, c) = (node.clone(), next.clone());
        let by_target = tokio::task::spawn_blocking(move || {
            let mut out: Vec<Vec<Entry>> = (0..c.map.nodes.len()).map(|_| Vec::new()).collect();
            for i in first..(first + SHARDS_PER_STEP).min(SHARDS) {
                n.store.encode_held(
                    i,
                    true,
                    |h| Some(c.ring.owner(h)).filter(|&t| t != c.me),
                    |target, host, seen, record| out[target].push((CompactString::from(host), Pending { seen, body: record.into() })),
                );
            }
            out
        })
        .await
        .map_err(|e| format!("scan failed: {e}"))?;
        for (target, entries) in by_target.into_iter().enumerate() {
            if entries.is_empty() {
                continue;
            }
            if !next.forwarder.send_moving(target, &entries, &next.map.hash).await {
                return Err(format!("node {} did not take the hosts it gets", next.map.nodes[target].id));
            }
            moved += entries.len();
        }
    }
    Ok(moved)
}

/// Step 2 on this node: serves the prepared map whose hash is `hash`, as generation
/// `generation` (the coordinator's; None, from a coordinator before generations: one above
/// this node's).
pub async fn commit(node: &Arc<Node>, hash: &str, generation: Option<u64>) -> Result<StepReply, String> {
    let m = node.cluster.as_ref().ok_or("this node is standalone")?;
    let _one = m.committing.lock().await;
    let mut reply = StepReply { id: node.settings.id.clone(), hash: hash.to_owned(), ..StepReply::default() };
    if m.current().map.hash == hash {
        // Served already; a change that brings a diverged node back still gives every node
        // the change's generation.
        if let Some(g) = generation.filter(|&g| g > m.generation()) {
            keep_generation(m, g)?;
        }
        reply.unchanged = true;
        reply.generation = m.generation();
        return Ok(reply);
    }
    let next = m.next.load_full().filter(|n| n.map.hash == hash).ok_or_else(|| format!("map {hash} was not prepared here"))?;
    // A signed map's generation is its version, whatever the coordinator says.
    let generation = match (&m.floor, next.map.version) {
        (Some(_), Some(version)) => version,
        _ => generation.unwrap_or(0).max(m.generation() + 1),
    };
    // The floor first, then the file and its signature, then its generation: a crash between
    // leaves a map that the floor (or the next probe, as behind its peers) brings along.
    if let Some(floor) = &m.floor {
        floor.raise(&next.map).map_err(|e| format!("cannot keep the signed cluster map version: {e}"))?;
    }
    if let Some(path) = m.path() {
        // The map and its signature as one pair (a crash between them is finished at the
        // next load), each through a temporary file of this node's own: nodes of one machine
        // may share the file.
        if std::fs::read_to_string(path).ok().as_deref() != Some(next.map.text.as_str())
            || ops_config::trust::read_signature(path).ok().flatten().map(|s| ops_config::trust::signature_file(&s))
                != next.signature.as_deref().map(ops_config::trust::signature_file)
        {
            ops_config::trust::write_signed(path, &next.map.text, next.signature.as_deref(), &node.settings.id)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
    }
    keep_generation(m, generation)?;
    reply.generation = generation;
    m.next.store(None);
    let old = m.current.swap(next.clone());
    m.previous.store(Some(old));
    m.begin_change();
    node.rollouts.set_ids(next.map.nodes.iter().map(|n| n.id.clone()).collect());
    start_map_tasks(node);
    let n = node.clone();
    reply.remarked = tokio::task::spawn_blocking(move || {
        let c = n.cluster.as_ref().map(|m| m.current()).expect("a cluster");
        n.store.remark_owned(|h| c.ring.owner(h) == c.me)
    })
    .await
    .map_err(|e| format!("remark failed: {e}"))?;
    let ids: Vec<&str> = next.map.nodes.iter().map(|n| n.id.as_str()).collect();
    tracing::info!(hash, generation, nodes = ?ids, remarked = reply.remarked, leaving = next.leaving, "cluster map committed");
    Ok(reply)
}

/// A peer serves map `text` at generation `generation`, above this node's: this node missed
/// a commit. It takes the map through the three steps of a change, here alone: the hosts it
/// owned that the map gives others go to them, then it serves the map.
///
/// A node that prepared this very map and then lost its coordinator (cut off between prepare
/// and commit) commits it now: the peer serving it shows the coordinator got that far. A
/// node that prepared another map drops it for a newer signed one; without keys it waits for
/// its change to end ([`CHANGE_TIMEOUT`]).
pub async fn catch_up(node: &Arc<Node>, text: &str, signature: Option<&str>, generation: u64) -> Result<StepReply, CatchUpError> {
    use CatchUpError::{Busy, Refused};
    let m = node.cluster.as_ref().ok_or_else(|| Refused("this node is standalone".into()))?;
    let _one = m.coordinating.try_lock().map_err(|_| Busy("a membership change is running here".to_owned()))?;
    if m.committed_unfinished() {
        return Err(Busy("a membership change is being finished here".into()));
    }
    if let Some(next) = m.next.load_full() {
        let map = verify(node, m, text, signature).map_err(Refused)?;
        if next.map.hash == map.hash {
            let reply = commit(node, &map.hash, Some(generation)).await.map_err(Refused)?;
            finish(node, &map.hash).map_err(Refused)?;
            tracing::warn!(hash = %map.hash, generation, "a prepared cluster map was committed by a peer but not here: committed it");
            return Ok(reply);
        }
        if m.floor.is_none() {
            return Err(Busy(format!("another change (to map {}) is prepared here", next.map.hash)));
        }
        // Signed and above the floor: the operator's newer map replaces the prepared one.
        abort(node, &next.map.hash);
    }
    let prepared = prepare(node, text, signature).await;
    let hash = match prepared {
        Ok(r) => r.hash,
        Err(e) => {
            if let Ok(map) = ClusterMap::parse(text, Path::new("cluster.toml")) {
                abort(node, &map.hash);
            }
            return Err(Refused(e));
        }
    };
    let reply = commit(node, &hash, Some(generation)).await.map_err(Refused)?;
    finish(node, &hash).map_err(Refused)?;
    Ok(reply)
}

/// Why [`catch_up`] did not take a peer's map.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    /// A change is on here: asked again at the next probe.
    #[error("{0}")]
    Busy(String),
    /// The map is refused (not signed, not newer, not a change allowed online, a failed
    /// step): not asked again until the peer offers a newer one.
    #[error("{0}")]
    Refused(String),
}

/// Writes `generation` to the data dir, then serves it.
fn keep_generation(m: &Membership, generation: u64) -> Result<(), String> {
    let path = m.data_dir.join(GENERATION_FILE);
    std::fs::create_dir_all(&m.data_dir)
        .and_then(|()| ops_config::disk::write_atomically(&path, format!("{generation}\n").as_bytes()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    m.generation.store(generation, Ordering::Release);
    Ok(())
}

/// Step 3 on this node: drops the previous map; the hand-back takes it from there.
pub fn finish(node: &Node, hash: &str) -> Result<StepReply, String> {
    let m = node.cluster.as_ref().ok_or("this node is standalone")?;
    if m.current().map.hash != hash {
        return Err(format!("this node serves map {}, not {hash}", m.current().map.hash));
    }
    m.end_change();
    m.next.store(None);
    m.change_over();
    tracing::info!(hash, "cluster map change finished");
    Ok(StepReply { id: node.settings.id.clone(), hash: hash.to_owned(), generation: m.generation(), ..StepReply::default() })
}

/// Drops a prepared map (the coordinator aborts).
pub fn abort(node: &Node, hash: &str) -> StepReply {
    if let Some(m) = &node.cluster {
        if m.next.load().as_ref().is_some_and(|n| n.map.hash == hash) {
            m.next.store(None);
            tracing::warn!(hash, "prepared cluster map dropped: the change was aborted");
        }
        if m.previous.load().is_none() {
            m.change_over();
        }
    }
    StepReply { id: node.settings.id.clone(), hash: hash.to_owned(), ..StepReply::default() }
}
