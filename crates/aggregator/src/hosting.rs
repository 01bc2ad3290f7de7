//! Which partitions this aggregator hosts, and which of them it can serve reads for
//! (clustered mode).
//!
//! The `hosting` controller turns the placement into readers of the log (`consume`):
//!
//! ```text
//!  placement ──target──▶ controller ──▶ ready reader     (partitions that serve reads)
//!  (static, or the        │  ▲      └──▶ building reader  (new partitions, read from the log's start)
//!   members' rendezvous)  │  └── caught up? lag?
//!                         └──▶ Hosting (ready / building) ──▶ reads (grpc) and the membership entry
//! ```
//!
//! - A partition the placement newly gives this node is **built**: read from the beginning of
//!   the log (which keeps the retention, see `hitcounter_cluster::log::max_age`) by the
//!   building reader, beside the ready reader, so the partitions already served stay fresh.
//!   It becomes **ready** (readable, and announced so) once that reader has nothing pending;
//!   the two readers are then merged into one (restarted from the lowest position, close to
//!   the log's end). At most `--max-building-partitions` are built at once.
//! - A partition the placement takes away is **kept and served** until every one of its new
//!   hosts announces it ready; only then is it dropped (its keys, position and producers), so a
//!   move never leaves a partition without a readable replica that had one, and no read is
//!   answered from a half-built copy.
//! - **Leaving** (SIGTERM, with membership): the node announces itself leaving, so the
//!   placement gives its partitions to others; it goes on serving until each of them is ready
//!   elsewhere (at most `--handoff-timeout-seconds`), then deletes its entry and lets the
//!   server stop. A node that is killed instead leaves the membership one TTL later, and the
//!   partitions' other replicas serve meanwhile.
//!
//! With static placement (`--node-index`/`--nodes`) the target never changes: the same
//! controller builds the node's partitions once and serves them.

use std::{
    collections::BTreeSet,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use hitcounter_cluster::{
    partition_of, HitStream, MemberInfo, Members, Membership, Placement, Roster,
};
use hitcounter_telemetry::CancellationToken;
use tokio::{sync::watch, task::JoinHandle};
use tracing::Instrument;

use crate::{
    applier::Applier,
    consume::{PartitionReader, ReaderProgress},
    error::AggregatorError,
};

/// How often the controller looks at its readers and the placement.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// What this aggregator can serve now: read by every read call, announced to the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Hosting {
    /// Partitions of the key space; 0 on one machine, where every key is served.
    pub(crate) partitions: u32,
    /// Partitions caught up with the log: reads of their keys are served.
    pub(crate) ready: BTreeSet<u32>,
    /// Partitions being built: held, not readable.
    pub(crate) building: BTreeSet<u32>,
    /// Leaving the cluster (handing its partitions over).
    pub(crate) leaving: bool,
}

impl Hosting {
    /// One machine: every key is served.
    pub(crate) fn local() -> Self {
        Self::default()
    }

    /// `Err(partition)` when `key`'s partition is not served here.
    pub(crate) fn serves(&self, key: &str) -> Result<(), u32> {
        if self.partitions == 0 {
            return Ok(());
        }
        let partition = partition_of(key, self.partitions);
        if self.ready.contains(&partition) {
            Ok(())
        } else {
            Err(partition)
        }
    }
}

/// Where the target partitions come from.
pub(crate) enum Layout {
    /// `--node-index` of `--nodes`: fixed.
    Static { placement: Placement, node: usize },
    /// `--node-id`: from the announced members.
    Members {
        membership: Box<Membership>,
        members: watch::Receiver<Members>,
        node_id: String,
        address: String,
        replicas: usize,
    },
}

/// The hosting controller's settings.
pub(crate) struct Controller {
    pub(crate) applier: Arc<Applier>,
    pub(crate) stream: HitStream,
    pub(crate) layout: Layout,
    pub(crate) hosting: watch::Sender<Hosting>,
    /// Most partitions built at once.
    pub(crate) max_building: usize,
    /// Longest wait for the partitions' new hosts when leaving.
    pub(crate) handoff_timeout: Duration,
}

/// A running reader.
struct Reader {
    partitions: BTreeSet<u32>,
    started: tokio::time::Instant,
    progress: Arc<ReaderProgress>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), AggregatorError>>,
}

impl Reader {
    /// Stops it between two messages and waits for it.
    async fn stop(self) -> Result<(), AggregatorError> {
        self.stop.cancel();
        self.task
            .await
            .map_err(|e| AggregatorError::Startup(format!("log reader failed: {e}")))?
    }
}

impl Controller {
    fn start_reader(&self, partitions: BTreeSet<u32>, role: &'static str) -> Option<Reader> {
        if partitions.is_empty() {
            return None;
        }
        let progress = Arc::new(ReaderProgress::default());
        let stop = CancellationToken::new();
        let reader = PartitionReader {
            applier: Arc::clone(&self.applier),
            stream: self.stream.clone(),
            partitions: partitions.iter().copied().collect(),
            role,
            progress: Arc::clone(&progress),
        };
        let task = tokio::spawn(
            reader
                .run(stop.clone())
                .instrument(tracing::info_span!("consume", reader = role)),
        );
        Some(Reader {
            partitions,
            started: tokio::time::Instant::now(),
            progress,
            stop,
            task,
        })
    }

    /// The placement as this node sees it now, and this node's index in it.
    fn roster(&self, own: &MemberInfo) -> (Roster, Option<usize>) {
        match &self.layout {
            Layout::Static { placement, node } => {
                let addresses: Vec<String> = (0..placement.nodes).map(|_| String::new()).collect();
                (Roster::fixed(*placement, &addresses), Some(*node))
            }
            Layout::Members {
                members, replicas, ..
            } => {
                let mut members = members.borrow().clone();
                // This node is live whatever the bucket says right now.
                members.insert(own.node_id.clone(), own.clone());
                let roster = Roster::from_members(self.stream.partitions(), *replicas, &members);
                let me = roster.node(&own.node_id);
                (roster, me)
            }
        }
    }

    /// Whether `partition`, which the placement no longer gives this node, is ready on every
    /// one of its hosts, so this node may drop it.
    fn handed_over(roster: &Roster, partition: u32) -> bool {
        let hosts = roster.hosts(partition);
        !hosts.is_empty()
            && hosts.iter().all(|&n| {
                roster.nodes[n]
                    .ready
                    .as_ref()
                    .is_some_and(|ready| ready.contains(&partition))
            })
    }

    /// Runs until `stop` is cancelled. `shutdown` (SIGTERM) starts leaving; `serving` is
    /// cancelled once the node may stop serving reads (at once without membership).
    pub(crate) async fn run(
        self,
        initial: BTreeSet<u32>,
        shutdown: CancellationToken,
        serving: CancellationToken,
        stop: CancellationToken,
    ) -> Result<(), AggregatorError> {
        let total = self.stream.partitions();
        let mut state = Hosting {
            partitions: total,
            ready: BTreeSet::new(),
            building: initial.clone(),
            leaving: false,
        };
        // The first reader resumes every partition held (from the checkpoint, or the
        // placement's): none is readable until it has caught up.
        let mut ready_reader = self.start_reader(initial, "ready");
        let mut building_reader: Option<Reader> = None;
        let mut members_changed = match &self.layout {
            Layout::Members { members, .. } => Some(members.clone()),
            Layout::Static { .. } => None,
        };
        let heartbeat = match &self.layout {
            Layout::Members { membership, .. } => membership.heartbeat_interval(),
            Layout::Static { .. } => Duration::MAX,
        };
        let mut announced: Option<(MemberInfo, tokio::time::Instant)> = None;
        let mut leave_deadline: Option<tokio::time::Instant> = None;
        let gauge = |state: &str| metrics::gauge!("hitcounter_aggregator_partitions", "state" => state.to_owned());
        if matches!(self.layout, Layout::Static { .. }) {
            // Without membership nothing is handed over: stop serving when told to.
            let (shutdown, serving) = (shutdown.clone(), serving.clone());
            tokio::spawn(async move {
                shutdown.cancelled().await;
                serving.cancel();
            });
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = async {
                    match members_changed.as_mut() {
                        Some(members) => { let _ = members.changed().await; }
                        None => std::future::pending::<()>().await,
                    }
                } => {}
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            // A reader that stopped by itself failed (an owner stopped): so does the node.
            for reader in [&mut ready_reader, &mut building_reader] {
                if reader.as_ref().is_some_and(|r| r.task.is_finished()) {
                    if let Some(reader) = reader.take() {
                        reader.stop().await?;
                        return Err(AggregatorError::OwnerStopped);
                    }
                }
            }
            // Caught-up readers make their partitions readable.
            if let Some(reader) = &ready_reader {
                if reader.progress.caught_up.load(Ordering::Acquire) {
                    for p in &reader.partitions {
                        if state.building.remove(p) {
                            state.ready.insert(*p);
                        }
                    }
                }
            }
            if building_reader
                .as_ref()
                .is_some_and(|r| r.progress.caught_up.load(Ordering::Acquire))
            {
                // Built: readable now, and one reader again (both are close to the end).
                let (took, messages) = building_reader.as_ref().map_or((Duration::ZERO, 0), |r| {
                    (
                        r.started.elapsed(),
                        r.progress.applied.load(Ordering::Relaxed),
                    )
                });
                let built = take_stopped(&mut building_reader).await?;
                let mut all = built.clone();
                all.extend(take_stopped(&mut ready_reader).await?);
                for p in &built {
                    state.building.remove(p);
                    state.ready.insert(*p);
                }
                tracing::info!(partitions = ?built, messages, seconds = took.as_secs_f64(), "built: serving reads");
                metrics::histogram!("hitcounter_aggregator_partition_build_seconds")
                    .record(took.as_secs_f64());
                metrics::counter!("hitcounter_aggregator_partitions_moved_total", "change" => "built")
                    .increment(built.len() as u64);
                ready_reader = self.start_reader(all, "ready");
            }
            if shutdown.is_cancelled() && !state.leaving {
                if let Layout::Members { .. } = self.layout {
                    state.leaving = true;
                    leave_deadline = Some(tokio::time::Instant::now() + self.handoff_timeout);
                    tracing::info!(timeout = ?self.handoff_timeout, "leaving: handing the partitions over before stopping");
                }
            }
            // The placement now.
            let own = self.own_info(&state, &ready_reader, &building_reader);
            let (roster, me) = self.roster(&own);
            let target: BTreeSet<u32> = match me {
                Some(me) if !state.leaving => roster.partitions_of(me),
                _ => BTreeSet::new(),
            };
            let held: BTreeSet<u32> = state.ready.union(&state.building).copied().collect();
            if state.leaving {
                let waiting = held
                    .iter()
                    .filter(|&&p| !Self::handed_over(&roster, p))
                    .count();
                let expired = leave_deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
                // Nobody stays to take the partitions (the whole cluster is stopping): waiting
                // would only delay the stop by the handoff timeout.
                let nobody_stays = roster
                    .nodes
                    .iter()
                    .all(|node| node.leaving || node.id == own.node_id);
                if waiting == 0 || expired || nobody_stays {
                    if nobody_stays && waiting > 0 {
                        tracing::info!(waiting, "every member is leaving: nobody to hand over to");
                    } else if expired && waiting > 0 {
                        tracing::warn!(waiting, "handoff timed out: leaving with partitions not yet ready elsewhere (their other replicas serve them)");
                    }
                    if let Layout::Members {
                        membership,
                        node_id,
                        ..
                    } = &self.layout
                    {
                        if let Err(error) = membership.leave(node_id).await {
                            tracing::warn!(%error, "could not remove this node from the membership; it expires after the member TTL");
                        }
                    }
                    tracing::info!("left the cluster");
                    serving.cancel();
                    break;
                }
            } else {
                // Partitions to give up: no longer placed here, and ready on all their hosts.
                // A partition still being built here serves nobody: it goes at once.
                let gone: BTreeSet<u32> = held
                    .difference(&target)
                    .copied()
                    .filter(|p| state.building.contains(p) || Self::handed_over(&roster, *p))
                    .collect();
                // Partitions to build: placed here, not held, up to the limit in flight.
                let room = self.max_building.saturating_sub(state.building.len());
                let new: BTreeSet<u32> = target.difference(&held).copied().take(room).collect();
                if !gone.is_empty() {
                    let kept_ready: BTreeSet<u32> = take_stopped(&mut ready_reader)
                        .await?
                        .difference(&gone)
                        .copied()
                        .collect();
                    let kept_building: BTreeSet<u32> = take_stopped(&mut building_reader)
                        .await?
                        .difference(&gone)
                        .copied()
                        .collect();
                    let keys = self.applier.drop_partitions(&gone, total).await;
                    for p in &gone {
                        state.ready.remove(p);
                        state.building.remove(p);
                    }
                    tracing::info!(partitions = ?gone, keys, "handed over: partitions dropped");
                    metrics::counter!("hitcounter_aggregator_partitions_moved_total", "change" => "dropped")
                        .increment(gone.len() as u64);
                    ready_reader = self.start_reader(kept_ready, "ready");
                    building_reader = self.start_reader(kept_building, "building");
                }
                if !new.is_empty() {
                    let mut building = new.clone();
                    building.extend(take_stopped(&mut building_reader).await?);
                    state.building.extend(new.iter().copied());
                    tracing::info!(partitions = ?new, "placed here: building from the log");
                    building_reader = self.start_reader(building, "building");
                }
            }
            gauge("ready").set(state.ready.len() as f64);
            gauge("building").set(state.building.len() as f64);
            self.hosting.send_if_modified(|hosting| {
                let changed = *hosting != state;
                if changed {
                    *hosting = state.clone();
                }
                changed
            });
            // Announce on a change, and as the heartbeat.
            if let Layout::Members { membership, .. } = &self.layout {
                let own = self.own_info(&state, &ready_reader, &building_reader);
                let due = match &announced {
                    None => true,
                    Some((last, at)) => {
                        last.ready != own.ready
                            || last.building != own.building
                            || last.leaving != own.leaving
                            || at.elapsed() >= heartbeat
                    }
                };
                if due {
                    match membership.announce(&own).await {
                        Ok(()) => announced = Some((own, tokio::time::Instant::now())),
                        Err(error) => {
                            metrics::counter!("hitcounter_aggregator_membership_errors_total")
                                .increment(1);
                            tracing::warn!(%error, "cannot announce this node; trying again");
                        }
                    }
                }
            }
        }
        for reader in [ready_reader, building_reader].into_iter().flatten() {
            reader.stop().await?;
        }
        Ok(())
    }

    /// This node's membership entry for `state`.
    fn own_info(
        &self,
        state: &Hosting,
        ready_reader: &Option<Reader>,
        building_reader: &Option<Reader>,
    ) -> MemberInfo {
        let pending = |reader: &Option<Reader>| {
            reader
                .as_ref()
                .map(|r| r.progress.pending.load(Ordering::Relaxed))
                .unwrap_or(0)
        };
        let (node_id, address) = match &self.layout {
            Layout::Members {
                node_id, address, ..
            } => (node_id.clone(), address.clone()),
            Layout::Static { node, .. } => (node.to_string(), String::new()),
        };
        MemberInfo {
            node_id,
            address,
            ready: state.ready.iter().copied().collect(),
            building: state.building.iter().copied().collect(),
            lag: pending(ready_reader),
            building_lag: pending(building_reader),
            leaving: state.leaving,
        }
    }
}

/// Takes the reader out of `slot`, stopped; returns its partitions (none if there was none).
async fn take_stopped(slot: &mut Option<Reader>) -> Result<BTreeSet<u32>, AggregatorError> {
    match slot.take() {
        Some(reader) => {
            let partitions = reader.partitions.clone();
            reader.stop().await?;
            Ok(partitions)
        }
        None => Ok(BTreeSet::new()),
    }
}
