//! The node's inference core: the current plan, the stage thread, and the
//! routing of frames between them and the entry side ([`crate::RingExecutor`]).
//!
//! Frames arrive through [`Core::deliver`] (from the ring transport) and
//! leave through a [`Links`]; a frame for this node itself never touches the
//! transport.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sovereign_inference::{ModelConfig, Stage};

use crate::plan::Plan;
use crate::protocol::{Frame, ProtocolError, Step};
use crate::stage::StageServer;

/// Sends frames to other nodes (the ring's inference channel).
pub trait Links: Send + Sync + 'static {
    /// Sends `payload` to the node `to` (relayed if it is not a neighbour).
    fn send(&self, to: &str, payload: Vec<u8>) -> Result<(), String>;
}

/// A plan in force on this node, with what the entry side needs of it.
#[derive(Clone, Debug)]
pub struct Active {
    /// The plan.
    pub plan: Plan,
    /// Its id ([`Plan::id`]).
    pub id: u64,
    /// Bumped on every change of plan, including to none.
    pub generation: u64,
}

/// What the stage thread is told.
enum StageJob {
    Plan {
        id: u64,
        load: Option<(PathBuf, std::ops::Range<usize>, Option<String>)>,
    },
    Step(Step),
    Release {
        entry: String,
        seqs: Vec<u64>,
    },
}

/// An answer to a step, for the entry side.
#[derive(Debug)]
pub(crate) enum Reply {
    /// Logits (little-endian f32) and sampled tokens.
    Answer(Vec<u8>, Vec<u32>),
    Failed(String),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames sent to other nodes.
    pub frames_sent: AtomicU64,
    /// Bytes sent to other nodes.
    pub bytes_sent: AtomicU64,
    /// Steps run by this node's stage.
    pub stage_steps: AtomicU64,
    /// Replays after a change of plan or a failed step.
    pub replays: AtomicU64,
    /// Frames refused (bad version, malformed).
    pub frames_refused: AtomicU64,
}

/// The shared inference state of one node.
pub struct Core {
    name: String,
    links: Box<dyn Links>,
    config: ModelConfig,
    active: Mutex<Option<Active>>,
    changed: Condvar,
    generation: AtomicU64,
    stage_jobs: Mutex<mpsc::Sender<StageJob>>,
    waiters: Mutex<HashMap<u64, mpsc::Sender<Reply>>>,
    next_step: AtomicU64,
    next_seq_space: AtomicU64,
    /// Counters for `/metrics`.
    pub counters: Counters,
    /// The loaded stage's layers and KV bytes, for health.
    stage_state: Arc<Mutex<StageState>>,
}

/// What the stage thread holds, for health and metrics.
#[derive(Clone, Debug, Default)]
pub struct StageState {
    /// The plan whose stage is loaded.
    pub plan: Option<u64>,
    /// Its layers.
    pub layers: Option<std::ops::Range<usize>>,
    /// KV cache bytes held.
    pub kv_bytes: usize,
    /// Sequences with a cache.
    pub sequences: usize,
    /// The last load error, if any.
    pub error: Option<String>,
}

impl Core {
    /// A core for node `name` running a model of `config`, sending through `links`.
    pub fn start(name: String, config: ModelConfig, links: Box<dyn Links>) -> Arc<Self> {
        let (tx, rx) = mpsc::channel();
        let core = Arc::new(Self {
            name,
            links,
            config,
            active: Mutex::new(None),
            changed: Condvar::new(),
            generation: AtomicU64::new(0),
            stage_jobs: Mutex::new(tx),
            waiters: Mutex::new(HashMap::new()),
            next_step: AtomicU64::new(1),
            next_seq_space: AtomicU64::new(1),
            counters: Counters::default(),
            stage_state: Arc::new(Mutex::new(StageState::default())),
        });
        let weak = Arc::downgrade(&core);
        let state = Arc::clone(&core.stage_state);
        std::thread::Builder::new()
            .name("ring-stage".into())
            .spawn(move || stage_thread(rx, weak, state))
            .ok();
        core
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The plan in force, if any.
    pub fn active(&self) -> Option<Active> {
        lock(&self.active).clone()
    }

    /// What the stage thread holds.
    pub fn stage_state(&self) -> StageState {
        lock(&self.stage_state).clone()
    }

    /// Puts `plan` in force (`None`: the ring cannot serve): the stage thread
    /// loads this node's layers of `model` (and drops every cache), and
    /// steps in flight are replayed on the new plan by their entry nodes.
    pub fn set_plan(&self, plan: Option<Plan>, model: PathBuf) {
        let mut active = lock(&self.active);
        let same = match (&*active, &plan) {
            (Some(a), Some(p)) => a.plan == *p,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let job = match &plan {
            Some(p) => StageJob::Plan {
                id: p.id(),
                load: p.stage_of(&self.name).map(|s| {
                    (
                        model.clone(),
                        s.layers.clone(),
                        p.next(&self.name).map(str::to_owned),
                    )
                }),
            },
            None => StageJob::Plan { id: 0, load: None },
        };
        let _ = lock(&self.stage_jobs).send(job);
        *active = plan.map(|plan| Active {
            id: plan.id(),
            plan,
            generation,
        });
        self.changed.notify_all();
    }

    /// The current plan generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for a plan (returns at once if one is in force).
    pub fn wait_for_plan(&self, timeout: Duration) -> Option<Active> {
        let active = lock(&self.active);
        let (active, _) = self
            .changed
            .wait_timeout_while(active, timeout, |a| a.is_none())
            .unwrap_or_else(|e| e.into_inner());
        active.clone()
    }

    /// Waits up to `timeout` for the plan generation to move past `generation`.
    pub fn wait_for_change(&self, generation: u64, timeout: Duration) {
        let active = lock(&self.active);
        let _ = self
            .changed
            .wait_timeout_while(active, timeout, |_| self.generation() == generation);
    }

    /// Handles a frame received from `from` over the ring.
    pub fn deliver(&self, from: &str, payload: &[u8]) -> Result<(), ProtocolError> {
        match Frame::decode(payload) {
            Ok(frame) => {
                self.handle(frame);
                Ok(())
            }
            Err(e) => {
                self.counters.frames_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = from, "refused a ring frame: {e}");
                Err(e)
            }
        }
    }

    fn handle(&self, frame: Frame) {
        match frame {
            Frame::Step(step) => {
                let _ = lock(&self.stage_jobs).send(StageJob::Step(step));
            }
            Frame::Release { entry, seqs } => {
                let _ = lock(&self.stage_jobs).send(StageJob::Release { entry, seqs });
            }
            Frame::Answer {
                step,
                values,
                tokens,
            } => self.answer(step, Reply::Answer(values, tokens)),
            Frame::Failed { step, reason } => self.answer(step, Reply::Failed(reason)),
        }
    }

    /// Fails every step waiting for an answer (a ring link went down: a frame
    /// on it may be lost), so their entry executors replay them at once
    /// rather than wait out a timeout.
    pub fn fail_pending(&self, reason: &str) {
        let waiters: Vec<mpsc::Sender<Reply>> =
            lock(&self.waiters).drain().map(|(_, w)| w).collect();
        for waiter in waiters {
            let _ = waiter.send(Reply::Failed(reason.to_owned()));
        }
    }

    fn answer(&self, step: u64, reply: Reply) {
        if let Some(waiter) = lock(&self.waiters).remove(&step) {
            let _ = waiter.send(reply);
        }
    }

    /// Sends `frame` to `to`: through the links, or straight to this node.
    pub(crate) fn send(&self, to: &str, frame: Frame) -> Result<(), String> {
        if to == self.name {
            self.handle(frame);
            return Ok(());
        }
        let bytes = frame.encode();
        self.counters.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.links.send(to, bytes)
    }

    /// A fresh step number and the receiver its answer arrives on.
    pub(crate) fn expect(&self) -> (u64, mpsc::Receiver<Reply>) {
        let step = self.next_step.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        lock(&self.waiters).insert(step, tx);
        (step, rx)
    }

    /// Stops waiting for `step`.
    pub(crate) fn forget(&self, step: u64) {
        lock(&self.waiters).remove(&step);
    }

    /// A block of sequence numbers no other executor of this node uses.
    pub(crate) fn seq_space(&self) -> u64 {
        self.next_seq_space.fetch_add(1, Ordering::Relaxed) << 32
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs this node's stage: loads layers when the plan changes, runs steps
/// in arrival order (so several requests are pipelined through the ring),
/// and sends each result on.
fn stage_thread(
    jobs: mpsc::Receiver<StageJob>,
    core: std::sync::Weak<Core>,
    state: Arc<Mutex<StageState>>,
) {
    let mut server: Option<StageServer> = None;
    let mut plan = 0u64;
    let mut backlog: std::collections::VecDeque<StageJob> = std::collections::VecDeque::new();
    loop {
        let job = match backlog.pop_front() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        backlog.extend(jobs.try_iter());
        let is_plan = |j: &StageJob| matches!(j, StageJob::Plan { .. });
        if is_plan(&job) && backlog.iter().any(is_plan) {
            // A newer plan is already queued: do not load layers for this one.
            continue;
        }
        let Some(core) = core.upgrade() else { return };
        match job {
            StageJob::Plan { id, load } => {
                plan = id;
                server = None;
                let mut s = lock(&state);
                *s = StageState {
                    plan: Some(id).filter(|&id| id != 0),
                    ..StageState::default()
                };
                if let Some((path, range, next)) = load {
                    drop(s);
                    let loaded = Stage::load(&path, range.clone());
                    let mut s = lock(&state);
                    match loaded {
                        Ok(stage) => {
                            tracing::info!(layers = ?range, "loaded this node's stage");
                            s.layers = Some(range);
                            server = Some(StageServer::new(id, stage, next));
                        }
                        Err(e) => {
                            tracing::error!("loading layers {range:?}: {e}");
                            s.error = Some(e.to_string());
                        }
                    }
                }
            }
            StageJob::Step(step) => {
                let out = match &mut server {
                    Some(server) => server.run(step),
                    None => crate::stage::Outgoing {
                        to: step.entry.clone(),
                        frame: Frame::Failed {
                            step: step.step,
                            reason: format!(
                                "no stage of plan {:016x} here (plan {plan:016x})",
                                step.plan
                            ),
                        },
                    },
                };
                core.counters.stage_steps.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = core.send(&out.to, out.frame) {
                    tracing::warn!(to = out.to, "sending a step's result: {e}");
                }
            }
            StageJob::Release { entry, seqs } => {
                if let Some(server) = &mut server {
                    server.release(&entry, &seqs);
                }
            }
        }
        if let Some(server) = &server {
            let mut s = lock(&state);
            s.kv_bytes = server.kv_bytes();
            s.sequences = server.sequences();
        }
    }
}
