//! The scheduler's decisions, as pure logic: no I/O and no clock (time is passed in).
//!
//! Rules, in the order they apply:
//! 1. **Named queues with quotas.** Every job belongs to a configured queue; a queue's admitted
//!    jobs together never hold more than its [`Quota`] of CPU (millis), memory (bytes) or GPUs.
//! 2. **Capacity, per node.** Jobs are placed on nodes ([`Scheduler::set_nodes`]; one node,
//!    named `""`, with the configured capacity until then): the jobs admitted to a node never
//!    hold more than its capacity, nor number more than its slots. An admitted job goes to the
//!    node with room for it whose dominant share (rule 4's measure, over that node's capacity)
//!    would be the smallest afterwards — work is spread — ties by node id. Fair shares (rule 4)
//!    are taken of all the nodes' capacity together. Part of a node's CPU may be taken by
//!    something other than the jobs ([`Scheduler::set_cpu_taken`]: the fast path): admission
//!    to that node then fits jobs in what is left (shares are still taken of the configured
//!    capacity), and a job waiting for that CPU says what took it. Jobs already admitted keep
//!    what they hold.
//! 3. **Order within a queue**: by priority class (the configured order, highest first; the empty
//!    class ranks last), then first in, first out. Only a queue's head may be admitted: a job is
//!    never overtaken by a later job of its own queue in the same or a lower class (no backfill).
//! 4. **Between queues**: the highest-priority class among the queue heads that their quota
//!    allows goes first (strict between classes); within a class, weighted **Dominant Resource
//!    Fairness**: the queue whose admitted jobs hold the smallest dominant share (its largest
//!    fraction of capacity over CPU, memory and GPUs) divided by its weight goes first, ties by
//!    queue name.
//! 5. **No starvation of large jobs**: when the job chosen by rule 4 does not fit in the free
//!    capacity, nothing else is admitted in that round, so smaller jobs cannot keep taking the
//!    capacity it waits for. A head blocked by its own queue's quota does not hold others back.
//!    A gate ([`Scheduler::schedule_gated`]: the runner's GPU memory, which the scheduler does
//!    not count) that refuses the chosen job blocks the round the same way, with its reason.
//!
//! **Tenants.** When jobs carry a tenant (an authenticating server sets it from the caller), a
//! queue's quota applies to each tenant's jobs in it separately, and each tenant has its own
//! line in the queue: rules 1 and 3 hold per (queue, tenant), so one tenant at its quota, or
//! with a large job at its head, never holds another back. Between the tenants of a queue, in
//! rule 4, the queue's share decides first (as before), then the tenant's own dominant share.
//! Jobs without a tenant are one line of their queue, as before tenants existed.
//!
//! Every waiting job gets a reason for people, e.g. `quota gpu 2/2 in queue research (needs 1)`
//! or `capacity cpu 1900/2000m (needs 500m)`. A round looks at queue heads only and keeps a
//! reason for each head; the jobs behind a head wait for it (`behind job X in queue Q`), which
//! [`Scheduler::waiting_reason`] says when asked. So a decision costs the same whether ten or
//! 100,000 jobs wait.
//!
//! Retries: [`RetryPolicy`] gives the RETRY_WAIT delay (exponential backoff with "equal jitter":
//! half the delay fixed, half random, from a seeded [`Jitter`]) and counts application failures
//! (the job's own, against its `max_retries`) apart from infrastructure failures (against the
//! policy's `max_infra_retries`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use thiserror::Error;

use crate::job::Resources;
use crate::store::FailureKind;

/// Why a queue's head waits when nothing but the runner's bound on running jobs holds it back.
pub const NO_SLOT: &str = "every slot for running jobs is taken";

/// Why a queue's head waits when there is no node to place it on.
pub const NO_NODE: &str = "no node takes jobs now";

/// A node jobs can be placed on, and what it offers them ([`Scheduler::set_nodes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCapacity {
    pub id: String,
    /// What the jobs admitted to it may hold together.
    pub capacity: Resources,
    /// Most jobs admitted to it at once.
    pub slots: usize,
}

/// A node as the scheduler keeps it: what it offers and what its admitted jobs hold.
#[derive(Clone, Debug)]
struct NodeUse {
    capacity: Vec3,
    slots: usize,
    used: Vec3,
    jobs: usize,
}

/// Limits of one queue; `None` is no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub gpus: Option<u32>,
}

impl Quota {
    fn limits(&self) -> [Option<u64>; 3] {
        [self.cpu_millis, self.memory_bytes, self.gpus.map(u64::from)]
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    pub name: String,
    /// Share weight for fair share between queues; at least 1.
    pub weight: u32,
    pub quota: Quota,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// What all admitted jobs together may hold.
    pub capacity: Resources,
    pub queues: Vec<QueueConfig>,
    /// Priority classes, highest first. A job with an empty class ranks after all of them.
    pub priority_classes: Vec<String>,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SchedError {
    #[error("scheduler configuration: {0}")]
    Config(String),
    #[error("no queue named '{0}'")]
    UnknownQueue(String),
    #[error("no priority class named '{0}'")]
    UnknownPriorityClass(String),
    /// The job asks for more than its queue's quota or the capacity: it could never run.
    #[error("job can never be admitted: {0}")]
    NeverFits(String),
    #[error("job {0} is already known to the scheduler")]
    Duplicate(String),
}

/// A job as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub id: String,
    pub queue: String,
    pub priority_class: String,
    pub resources: Resources,
    /// The job's tenant; empty for none (see the module documentation).
    pub tenant: String,
}

/// The outcome of one round of [`Scheduler::schedule`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Admitted in this order; their resources are held until [`Scheduler::release`].
    pub admitted: Vec<Pending>,
    /// Why each queue's head still waits, by job id. The jobs behind a head wait for it;
    /// [`Scheduler::waiting_reason`] gives any waiting job's reason.
    pub waiting: BTreeMap<String, String>,
}

const DIMS: [&str; 3] = ["cpu", "memory", "gpu"];

type Vec3 = [u64; 3];

fn vec3(r: &Resources) -> Vec3 {
    [r.cpu_millis, r.memory_bytes, u64::from(r.gpus)]
}

fn add(a: Vec3, b: Vec3) -> Vec3 {
    [
        a[0].saturating_add(b[0]),
        a[1].saturating_add(b[1]),
        a[2].saturating_add(b[2]),
    ]
}

fn sub(a: Vec3, b: Vec3) -> Vec3 {
    [
        a[0].saturating_sub(b[0]),
        a[1].saturating_sub(b[1]),
        a[2].saturating_sub(b[2]),
    ]
}

fn amount(dim: usize, v: u64) -> String {
    match dim {
        0 => format!("{v}m"),
        1 => format!("{v} bytes"),
        _ => v.to_string(),
    }
}

/// A limit a job would pass: `cpu 1900/2000m` and what the job needs, `500m`.
struct Shortfall {
    /// Which of CPU, memory, GPUs.
    dim: usize,
    usage: String,
    need: String,
}

impl Shortfall {
    /// `quota gpu 2/2 in queue research (needs 1)`, `... in queue research for tenant t ...`.
    fn quota(&self, line: &Line) -> String {
        format!(
            "quota {} in queue {} (needs {})",
            self.usage,
            line_name(line),
            self.need
        )
    }

    /// `capacity cpu 1900/2000m (needs 500m)`.
    fn capacity(&self) -> String {
        format!("capacity {} (needs {})", self.usage, self.need)
    }
}

/// The first dimension in which `used + need` exceeds `limits`.
fn exceeds(used: Vec3, need: Vec3, limits: [Option<u64>; 3]) -> Option<Shortfall> {
    (0..3).find_map(|d| {
        let limit = limits[d]?;
        let unit = ["m", " bytes", ""][d];
        (used[d].saturating_add(need[d]) > limit).then(|| Shortfall {
            dim: d,
            usage: format!("{} {}/{limit}{unit}", DIMS[d], used[d]),
            need: amount(d, need[d]),
        })
    })
}

struct Waiting {
    job: Pending,
}

/// One line of jobs: a queue and a tenant ("" for jobs without one).
type Line = (String, String);

/// `research`, or `research for tenant t`.
fn line_name(line: &Line) -> String {
    if line.1.is_empty() {
        line.0.clone()
    } else {
        format!("{} for tenant {}", line.0, line.1)
    }
}

fn line_of(job: &Pending) -> Line {
    (job.queue.clone(), job.tenant.clone())
}

/// The jobs of one line and what its admitted jobs hold (its quota's usage).
#[derive(Default)]
struct LineState {
    /// By (class rank, arrival).
    waiting: BTreeMap<(usize, u64), Waiting>,
    used: Vec3,
}

/// A configured queue and what all its admitted jobs hold (its fair share's usage).
struct QueueState {
    config: QueueConfig,
    used: Vec3,
}

/// The scheduler's state: waiting jobs by line, and the resources admitted jobs hold.
pub struct Scheduler {
    /// One node's capacity, as configured: what [`Scheduler::check`] measures a job against.
    capacity: Vec3,
    /// All the nodes' capacity together: what shares are taken of.
    total: Vec3,
    nodes: BTreeMap<String, NodeUse>,
    classes: Vec<String>,
    queues: BTreeMap<String, QueueState>,
    /// The lines with waiting or admitted jobs (made when a job arrives, dropped when empty).
    lines: BTreeMap<Line, LineState>,
    /// Waiting job id → (line, key in the line).
    index: HashMap<String, (Line, (usize, u64))>,
    /// Admitted job id → (line, resources held, node).
    admitted: HashMap<String, (Line, Vec3, String)>,
    used: Vec3,
    arrivals: u64,
    /// Why each queue's head waited at the end of the last round, by job id.
    head_reasons: HashMap<String, String>,
    /// CPU (millis) of a node taken by something other than the jobs, and what took it, in
    /// words ([`Scheduler::set_cpu_taken`]); kept across [`Scheduler::set_nodes`].
    cpu_taken: BTreeMap<String, (u64, String)>,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("capacity", &self.capacity)
            .field("used", &self.used)
            .field("waiting", &self.index.len())
            .field("admitted", &self.admitted.len())
            .finish()
    }
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedError> {
        let mut queues = BTreeMap::new();
        for q in config.queues {
            if q.weight == 0 {
                return Err(SchedError::Config(format!(
                    "queue '{}' needs a weight of at least 1",
                    q.name
                )));
            }
            let name = q.name.clone();
            let state = QueueState {
                config: q,
                used: [0; 3],
            };
            if queues.insert(name.clone(), state).is_some() {
                return Err(SchedError::Config(format!("queue '{name}' is named twice")));
            }
        }
        let classes = config.priority_classes;
        let mut seen = std::collections::HashSet::new();
        for c in &classes {
            if c.is_empty() || !seen.insert(c) {
                return Err(SchedError::Config(format!(
                    "priority class '{c}' is empty or named twice"
                )));
            }
        }
        let capacity = vec3(&config.capacity);
        let nodes = BTreeMap::from([(
            String::new(),
            NodeUse {
                capacity,
                slots: usize::MAX,
                used: [0; 3],
                jobs: 0,
            },
        )]);
        Ok(Self {
            capacity,
            total: capacity,
            nodes,
            classes,
            queues,
            lines: BTreeMap::new(),
            index: HashMap::new(),
            admitted: HashMap::new(),
            used: [0; 3],
            arrivals: 0,
            head_reasons: HashMap::new(),
            cpu_taken: BTreeMap::new(),
        })
    }

    fn rank(&self, class: &str) -> Result<usize, SchedError> {
        if class.is_empty() {
            return Ok(self.classes.len());
        }
        self.classes
            .iter()
            .position(|c| c == class)
            .ok_or_else(|| SchedError::UnknownPriorityClass(class.to_owned()))
    }

    /// Whether a job with these fields could ever be admitted: known queue and class, and no
    /// more resources than its queue's quota or the capacity. For rejecting a submit early.
    pub fn check(&self, queue: &str, class: &str, resources: &Resources) -> Result<(), SchedError> {
        let q = self
            .queues
            .get(queue)
            .ok_or_else(|| SchedError::UnknownQueue(queue.to_owned()))?;
        self.rank(class)?;
        let need = vec3(resources);
        if let Some(s) = exceeds([0; 3], need, q.config.quota.limits()) {
            return Err(SchedError::NeverFits(
                s.quota(&(queue.to_owned(), String::new())),
            ));
        }
        if let Some(s) = exceeds([0; 3], need, self.capacity.map(Some)) {
            return Err(SchedError::NeverFits(s.capacity()));
        }
        Ok(())
    }

    /// Puts a job in line, behind the jobs of its queue and class already waiting.
    pub fn enqueue(&mut self, job: Pending) -> Result<(), SchedError> {
        self.check(&job.queue, &job.priority_class, &job.resources)?;
        if self.index.contains_key(&job.id) || self.admitted.contains_key(&job.id) {
            return Err(SchedError::Duplicate(job.id));
        }
        let key = (self.rank(&job.priority_class)?, self.arrivals);
        self.arrivals += 1;
        let line = line_of(&job);
        self.index.insert(job.id.clone(), (line.clone(), key));
        self.lines
            .entry(line)
            .or_default()
            .waiting
            .insert(key, Waiting { job });
        Ok(())
    }

    /// Forgets a line once nothing waits in it and nothing of it is admitted.
    fn tidy(&mut self, line: &Line) {
        if self
            .lines
            .get(line)
            .is_some_and(|l| l.waiting.is_empty() && l.used == [0; 3])
        {
            self.lines.remove(line);
        }
    }

    /// Takes a waiting job out of line (cancelled); whether it was waiting.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some((line, key)) = self.index.remove(id) else {
            return false;
        };
        if let Some(l) = self.lines.get_mut(&line) {
            l.waiting.remove(&key);
        }
        self.tidy(&line);
        self.head_reasons.remove(id);
        true
    }

    /// Why a waiting job waits: for a queue's head, its reason as of the last round; for the
    /// jobs behind it, `behind job H in queue Q`. `None` for a job that is not waiting, or a
    /// head that became one after the last round.
    pub fn waiting_reason(&self, id: &str) -> Option<String> {
        let (line, key) = self.index.get(id)?;
        let (head_key, head) = self.lines.get(line)?.waiting.first_key_value()?;
        if head_key == key {
            self.head_reasons.get(id).cloned()
        } else {
            Some(format!(
                "behind job {} in queue {}",
                head.job.id,
                line_name(line)
            ))
        }
    }

    /// Holds what an already running job needs, as if admitted now, whatever the quota and
    /// capacity say (it runs already: a coordinator restart adopted it); release it with
    /// [`Scheduler::release`]. A job of a queue that left the configuration counts against the
    /// capacity only. On the single node (no [`Scheduler::set_nodes`]).
    pub fn adopt(&mut self, job: &Pending) -> Result<(), SchedError> {
        self.adopt_on(job, "")
    }

    /// [`Scheduler::adopt`] for a job running on `node` (which may be one the scheduler does
    /// not know now: it counts once the node is set again).
    pub fn adopt_on(&mut self, job: &Pending, node: &str) -> Result<(), SchedError> {
        if self.index.contains_key(&job.id) || self.admitted.contains_key(&job.id) {
            return Err(SchedError::Duplicate(job.id.clone()));
        }
        let need = vec3(&job.resources);
        self.used = add(self.used, need);
        let line = line_of(job);
        if let Some(q) = self.queues.get_mut(&job.queue) {
            q.used = add(q.used, need);
            let l = self.lines.entry(line.clone()).or_default();
            l.used = add(l.used, need);
        }
        if let Some(n) = self.nodes.get_mut(node) {
            n.used = add(n.used, need);
            n.jobs += 1;
        }
        self.admitted
            .insert(job.id.clone(), (line, need, node.to_owned()));
        Ok(())
    }

    /// Frees what an admitted job held (it ended or went back to wait); whether it was admitted.
    pub fn release(&mut self, id: &str) -> bool {
        let Some((line, held, node)) = self.admitted.remove(id) else {
            return false;
        };
        self.used = sub(self.used, held);
        if let Some(q) = self.queues.get_mut(&line.0) {
            q.used = sub(q.used, held);
        }
        if let Some(l) = self.lines.get_mut(&line) {
            l.used = sub(l.used, held);
        }
        if let Some(n) = self.nodes.get_mut(&node) {
            n.used = sub(n.used, held);
            n.jobs = n.jobs.saturating_sub(1);
        }
        self.tidy(&line);
        true
    }

    /// The nodes jobs are placed on from now on, replacing the ones before (the single node
    /// `""` included). Jobs admitted to a node that is no longer among them stay admitted (and
    /// counted in their queue's share) until released; they count against that node again if
    /// it comes back.
    pub fn set_nodes(&mut self, nodes: Vec<NodeCapacity>) {
        let mut map: BTreeMap<String, NodeUse> = nodes
            .into_iter()
            .map(|n| {
                (
                    n.id,
                    NodeUse {
                        capacity: vec3(&n.capacity),
                        slots: n.slots,
                        used: [0; 3],
                        jobs: 0,
                    },
                )
            })
            .collect();
        for (_, held, node) in self.admitted.values() {
            if let Some(n) = map.get_mut(node) {
                n.used = add(n.used, *held);
                n.jobs += 1;
            }
        }
        self.total = map.values().fold([0; 3], |t, n| add(t, n.capacity));
        self.nodes = map;
    }

    /// Node `node`'s CPU (millis) that something other than the jobs uses now (`why`, in words,
    /// e.g. `the fast path uses 1500m of the configured 3500m`, appended to the reason of a job
    /// that waits for that CPU). Admission to the node fits jobs in its capacity less
    /// `millis`; the jobs admitted already keep what they hold, even above it. 0 gives the
    /// whole capacity back.
    pub fn set_cpu_taken(&mut self, node: &str, millis: u64, why: String) {
        if millis == 0 {
            self.cpu_taken.remove(node);
        } else {
            self.cpu_taken.insert(node.to_owned(), (millis, why));
        }
    }

    /// Node `node`'s capacity for admission now: the configured one less the CPU taken.
    fn admissible(&self, node: &str, n: &NodeUse) -> Vec3 {
        let mut cap = n.capacity;
        if let Some((taken, _)) = self.cpu_taken.get(node) {
            cap[0] = cap[0].saturating_sub(*taken);
        }
        cap
    }

    /// The node an admitted job was placed on.
    pub fn node_of(&self, id: &str) -> Option<&str> {
        self.admitted.get(id).map(|(_, _, node)| node.as_str())
    }

    /// The admitted jobs and their nodes.
    pub fn admitted_jobs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.admitted
            .iter()
            .map(|(id, (_, _, node))| (id.as_str(), node.as_str()))
    }

    /// Whether job `id` waits in line.
    pub fn is_waiting(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    /// The node with room for `need` whose dominant share would be the smallest with it, or
    /// why there is none.
    fn place(&self, need: Vec3) -> Result<String, String> {
        let mut best: Option<(f64, &str)> = None;
        let mut why = Vec::new();
        for (id, n) in &self.nodes {
            if n.jobs >= n.slots {
                why.push(format!("node {id}: all {} slots taken", n.slots));
                continue;
            }
            let cap = self.admissible(id, n);
            if let Some(s) = exceeds(n.used, need, cap.map(Some)) {
                let mut reason = s.capacity();
                if let Some((_, taken_by)) = self.cpu_taken.get(id).filter(|_| s.dim == 0) {
                    reason = format!("{reason}; {taken_by}");
                }
                why.push(if id.is_empty() {
                    reason
                } else {
                    format!("node {id}: {reason}")
                });
                continue;
            }
            let after = add(n.used, need);
            let share = (0..3)
                .filter(|&d| n.capacity[d] > 0)
                .map(|d| after[d] as f64 / n.capacity[d] as f64)
                .fold(0.0, f64::max);
            if best.is_none_or(|b| share < b.0) {
                best = Some((share, id));
            }
        }
        match best {
            Some((_, id)) => Ok(id.to_owned()),
            None if self.nodes.is_empty() => Err(NO_NODE.to_owned()),
            // The single node says it as before nodes existed.
            None if self.nodes.len() == 1 && self.nodes.contains_key("") => {
                Err(why.pop().unwrap_or_default())
            }
            None => {
                let more = why.len().saturating_sub(3);
                why.truncate(3);
                let mut reason = format!("no node has room: {}", why.join("; "));
                if more > 0 {
                    reason.push_str(&format!("; and {more} more"));
                }
                Err(reason)
            }
        }
    }

    /// Resources held by admitted jobs in total.
    pub fn used(&self) -> Resources {
        to_resources(self.used)
    }

    /// Resources held by admitted jobs of `queue`.
    pub fn queue_used(&self, queue: &str) -> Option<Resources> {
        self.queues.get(queue).map(|q| to_resources(q.used))
    }

    /// Jobs waiting.
    pub fn waiting_len(&self) -> usize {
        self.index.len()
    }

    /// Jobs admitted and not yet released.
    pub fn admitted_len(&self) -> usize {
        self.admitted.len()
    }

    /// The largest fraction of the capacity `used` holds, over CPU, memory and GPUs.
    fn dominant_share(&self, used: Vec3) -> f64 {
        (0..3)
            .filter(|&d| self.total[d] > 0)
            .map(|d| used[d] as f64 / self.total[d] as f64)
            .fold(0.0, f64::max)
    }

    /// One round: admits every job the rules allow, in order, and says why the rest wait.
    pub fn schedule(&mut self) -> Decision {
        self.schedule_at_most(usize::MAX)
    }

    /// [`Scheduler::schedule`], admitting at most `slots` jobs (the free slots of a runner that
    /// bounds how many jobs run at once).
    pub fn schedule_at_most(&mut self, slots: usize) -> Decision {
        self.schedule_gated(slots, &mut |_| Ok(()))
    }

    /// [`Scheduler::schedule_at_most`], where a job is admitted only if `gate` also takes it:
    /// `gate` is asked about the job rules 1–4 chose once it fits the capacity, and is the last
    /// word (a job it takes is admitted). A refusal blocks the round as capacity does (rule 5),
    /// the refusal's text being the job's waiting reason.
    pub fn schedule_gated(
        &mut self,
        slots: usize,
        gate: &mut dyn FnMut(&Pending) -> Result<(), String>,
    ) -> Decision {
        let mut decision = Decision::default();
        let mut quota_blocked: BTreeMap<String, String> = BTreeMap::new();
        let mut capacity_block: Option<(String, String, String)> = None; // (id, line, reason)
        loop {
            quota_blocked.clear();
            let slots_full = decision.admitted.len() >= slots;
            // (rank, queue share / weight, queue, the line's own share, tenant)
            let mut best: Option<(usize, f64, &str, f64, &str)> = None;
            for (line, l) in &self.lines {
                let Some((&(rank, _), head)) = l.waiting.first_key_value() else {
                    continue;
                };
                let Some(q) = self.queues.get(&line.0) else {
                    continue;
                };
                let need = vec3(&head.job.resources);
                if let Some(s) = exceeds(l.used, need, q.config.quota.limits()) {
                    quota_blocked.insert(head.job.id.clone(), s.quota(line));
                    continue;
                }
                let share = self.dominant_share(q.used) / f64::from(q.config.weight);
                let own = self.dominant_share(l.used);
                let this = (rank, share, line.0.as_str(), own, line.1.as_str());
                if best.is_none_or(|b| this < b) {
                    best = Some(this);
                }
            }
            let Some((_, _, queue, _, tenant)) = best else {
                break;
            };
            if slots_full {
                break;
            }
            let line = (queue.to_owned(), tenant.to_owned());
            let (key, need, head_id) = {
                let l = self.lines.get(&line).expect("a line just seen");
                let (&key, head) = l.waiting.first_key_value().expect("a head just seen");
                (key, vec3(&head.job.resources), head.job.id.clone())
            };
            let node = match self.place(need) {
                Ok(node) => node,
                Err(reason) => {
                    capacity_block = Some((head_id, line_name(&line), reason));
                    break;
                }
            };
            let gated = {
                let l = self.lines.get(&line).expect("a line just seen");
                gate(&l.waiting[&key].job)
            };
            if let Err(reason) = gated {
                capacity_block = Some((head_id, line_name(&line), reason));
                break;
            }
            let l = self.lines.get_mut(&line).expect("a line just seen");
            let job = l.waiting.remove(&key).expect("present").job;
            l.used = add(l.used, need);
            if let Some(q) = self.queues.get_mut(&line.0) {
                q.used = add(q.used, need);
            }
            self.used = add(self.used, need);
            if let Some(n) = self.nodes.get_mut(&node) {
                n.used = add(n.used, need);
                n.jobs += 1;
            }
            self.index.remove(&job.id);
            self.admitted.insert(job.id.clone(), (line, need, node));
            decision.admitted.push(job);
        }
        self.head_reasons.clear();
        for l in self.lines.values() {
            let Some(head) = l.waiting.values().next() else {
                continue;
            };
            let head_reason = if let Some(r) = quota_blocked.get(&head.job.id) {
                r.clone()
            } else if let Some((id, _, r)) = capacity_block.as_ref().filter(|b| b.0 == head.job.id)
            {
                debug_assert_eq!(id, &head.job.id);
                r.clone()
            } else if let Some((id, queue, r)) = &capacity_block {
                format!(
                    "capacity is kept for job {id} in queue {queue}, ahead by priority or fair share ({r})"
                )
            } else {
                // A head neither quota- nor capacity-blocked was left for want of a slot.
                NO_SLOT.to_owned()
            };
            self.head_reasons
                .insert(head.job.id.clone(), head_reason.clone());
            decision.waiting.insert(head.job.id.clone(), head_reason);
        }
        decision
    }
}

fn to_resources(v: Vec3) -> Resources {
    Resources {
        cpu_millis: v[0],
        memory_bytes: v[1],
        gpus: u32::try_from(v[2]).unwrap_or(u32::MAX),
        gpu_memory_bytes: 0,
    }
}

/// A small seeded random source (SplitMix64) for retry jitter: reproducible in tests.
#[derive(Clone, Debug)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A number in `0..=max`.
    pub fn up_to(&mut self, max: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        if max == u64::MAX { z } else { z % (max + 1) }
    }
}

/// How failed attempts are retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The delay before the first retry, before jitter.
    pub initial_delay_ms: u64,
    /// The longest delay, before jitter.
    pub max_delay_ms: u64,
    /// Infrastructure failures tolerated per job before it fails.
    pub max_infra_retries: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_delay_ms: 1_000,
            max_delay_ms: 300_000,
            max_infra_retries: 5,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Wait in RETRY_WAIT until `at_ms`, then queue again.
    RetryAt { at_ms: u64, reason: String },
    /// The job fails for good.
    GiveUp { reason: String },
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1 for the first): `initial · 2^(retry-1)` capped at
    /// the maximum, of which the upper half is random.
    pub fn delay_ms(&self, retry: u32, jitter: &mut Jitter) -> u64 {
        let exp = retry.saturating_sub(1).min(63);
        let base = self
            .initial_delay_ms
            .saturating_mul(1u64 << exp)
            .min(self.max_delay_ms);
        base - base / 2 + jitter.up_to(base / 2)
    }

    /// Decides after a failure of `kind`, given the job's failure counts *before* this one and
    /// its own `max_retries` (which bounds application failures only).
    pub fn on_failure(
        &self,
        kind: FailureKind,
        app_failures: u32,
        infra_failures: u32,
        max_retries: u32,
        now_ms: u64,
        jitter: &mut Jitter,
    ) -> RetryDecision {
        let (app, infra) = match kind {
            FailureKind::Application => (app_failures + 1, infra_failures),
            FailureKind::Infrastructure => (app_failures, infra_failures + 1),
        };
        if app > max_retries {
            return RetryDecision::GiveUp {
                reason: format!("failed {app} times (max_retries {max_retries})"),
            };
        }
        if infra > self.max_infra_retries {
            return RetryDecision::GiveUp {
                reason: format!(
                    "{infra} infrastructure failures (limit {})",
                    self.max_infra_retries
                ),
            };
        }
        let retry = app + infra;
        let delay = self.delay_ms(retry, jitter);
        RetryDecision::RetryAt {
            at_ms: now_ms.saturating_add(delay),
            reason: format!(
                "retry {retry} in {delay} ms ({app} application, {infra} infrastructure failures)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn res(cpu: u64, mem: u64, gpus: u32) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_bytes: mem,
            gpus,
            gpu_memory_bytes: 0,
        }
    }

    fn queue(name: &str, weight: u32, quota: Quota) -> QueueConfig {
        QueueConfig {
            name: name.into(),
            weight,
            quota,
        }
    }

    fn job(id: &str, queue: &str, class: &str, r: Resources) -> Pending {
        Pending {
            id: id.into(),
            queue: queue.into(),
            priority_class: class.into(),
            resources: r,
            tenant: String::new(),
        }
    }

    fn sched(capacity: Resources, queues: Vec<QueueConfig>) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            capacity,
            queues,
            priority_classes: vec!["high".into(), "low".into()],
        })
        .unwrap()
    }

    fn ids(d: &Decision) -> Vec<&str> {
        d.admitted.iter().map(|j| j.id.as_str()).collect()
    }

    fn node(id: &str, cpu: u64, slots: usize) -> NodeCapacity {
        NodeCapacity {
            id: id.into(),
            capacity: res(cpu, 1 << 30, 0),
            slots,
        }
    }

    #[test]
    fn a_gate_that_refuses_the_chosen_job_blocks_the_round_with_its_reason() {
        let mut s = sched(
            res(4000, 1 << 30, 2),
            vec![
                queue("gpu", 1, Quota::default()),
                queue("cpu", 1, Quota::default()),
            ],
        );
        s.enqueue(job("g1", "gpu", "high", res(100, 0, 1))).unwrap();
        s.enqueue(job("g2", "gpu", "high", res(100, 0, 1))).unwrap();
        s.enqueue(job("c1", "cpu", "low", res(100, 0, 0))).unwrap();
        let mut asked = Vec::new();
        let mut no_memory = |j: &Pending| {
            asked.push(j.id.clone());
            if j.resources.gpus > 0 {
                Err("gpu0 holds model m".to_string())
            } else {
                Ok(())
            }
        };
        let d = s.schedule_gated(8, &mut no_memory);
        // The gate is asked about the chosen head only, and its refusal holds the round back.
        assert_eq!(asked, ["g1"]);
        assert!(d.admitted.is_empty(), "{d:?}");
        assert_eq!(d.waiting["g1"], "gpu0 holds model m");
        assert_eq!(
            d.waiting["c1"],
            "capacity is kept for job g1 in queue gpu, ahead by priority or fair share (gpu0 holds model m)"
        );
        assert_eq!(
            s.waiting_reason("g2").unwrap(),
            "behind job g1 in queue gpu"
        );
        assert_eq!(s.waiting_len(), 3);
        // Once the gate takes it, it is admitted in its order; what it took stays held.
        let d = s.schedule_gated(8, &mut |_| Ok(()));
        assert_eq!(ids(&d), ["g1", "g2", "c1"]);
        assert_eq!(s.used().gpus, 2);
    }

    #[test]
    fn jobs_are_placed_on_the_least_loaded_node_with_room() {
        let mut s = sched(res(4000, 1 << 30, 0), vec![queue("q", 1, Quota::default())]);
        s.set_nodes(vec![node("a", 2000, 8), node("b", 4000, 8)]);
        for i in 0..4 {
            s.enqueue(job(&format!("j{i}"), "q", "", res(1000, 0, 0)))
                .unwrap();
        }
        let d = s.schedule();
        assert_eq!(ids(&d), ["j0", "j1", "j2", "j3"]);
        // b (the larger) first: with j0 it is at 1/4, a would be at 1/2; then a and b tie at
        // 1/2 (ties by id: a); then a would be full, b at 1/2: b; then a full, b at 3/4: b.
        let placed: Vec<_> = ["j0", "j1", "j2", "j3"]
            .iter()
            .map(|id| s.node_of(id).unwrap())
            .collect();
        assert_eq!(placed, ["b", "a", "b", "b"]);
        // 1000m free on each: a job of 2000m fits on neither, though the sum would hold it.
        s.enqueue(job("j4", "q", "", res(2000, 0, 0))).unwrap();
        let d = s.schedule();
        assert!(d.admitted.is_empty());
        assert_eq!(
            d.waiting.get("j4").map(String::as_str),
            Some(
                "no node has room: node a: capacity cpu 1000/2000m (needs 2000m); node b: capacity cpu 3000/4000m (needs 2000m)"
            )
        );
        // Released, its node has room again.
        assert!(s.release("j1"));
        assert_eq!(ids(&s.schedule()), ["j4"]);
        assert_eq!(s.node_of("j4"), Some("a"));
    }

    #[test]
    fn a_nodes_slots_bound_its_jobs_and_no_node_holds_all() {
        let mut s = sched(res(4000, 1 << 30, 0), vec![queue("q", 1, Quota::default())]);
        s.set_nodes(vec![node("a", 4000, 1)]);
        s.enqueue(job("j0", "q", "", res(10, 0, 0))).unwrap();
        s.enqueue(job("j1", "q", "", res(10, 0, 0))).unwrap();
        let d = s.schedule();
        assert_eq!(ids(&d), ["j0"]);
        assert_eq!(
            d.waiting.get("j1").map(String::as_str),
            Some("no node has room: node a: all 1 slots taken")
        );
        s.set_nodes(vec![]);
        assert!(s.schedule().admitted.is_empty());
        assert_eq!(s.waiting_reason("j1").as_deref(), Some(NO_NODE));
        // A job admitted to a node that left counts against it when it comes back.
        s.set_nodes(vec![node("a", 4000, 1)]);
        assert!(
            s.schedule().admitted.is_empty(),
            "j0 still holds a's one slot"
        );
        let mut adopted = sched(res(4000, 1 << 30, 0), vec![queue("q", 1, Quota::default())]);
        adopted
            .adopt_on(&job("x", "q", "", res(3000, 0, 0)), "a")
            .unwrap();
        adopted.set_nodes(vec![node("a", 4000, 8), node("b", 4000, 8)]);
        adopted.enqueue(job("y", "q", "", res(2000, 0, 0))).unwrap();
        assert_eq!(ids(&adopted.schedule()), ["y"]);
        assert_eq!(adopted.node_of("y"), Some("b"));
    }

    #[test]
    fn config_is_validated() {
        let bad = |queues, classes| {
            Scheduler::new(SchedulerConfig {
                capacity: res(1, 1, 1),
                queues,
                priority_classes: classes,
            })
            .unwrap_err()
        };
        assert!(matches!(
            bad(vec![queue("a", 0, Quota::default())], vec![]),
            SchedError::Config(_)
        ));
        assert!(matches!(
            bad(
                vec![
                    queue("a", 1, Quota::default()),
                    queue("a", 1, Quota::default())
                ],
                vec![]
            ),
            SchedError::Config(_)
        ));
        assert!(matches!(
            bad(vec![], vec!["x".into(), "x".into()]),
            SchedError::Config(_)
        ));
    }

    #[test]
    fn unknown_queue_class_and_impossible_jobs_are_rejected() {
        let gpu2 = Quota {
            gpus: Some(2),
            ..Default::default()
        };
        let mut s = sched(res(2000, 1 << 30, 4), vec![queue("research", 1, gpu2)]);
        assert_eq!(
            s.enqueue(job("1", "nope", "", res(1, 0, 0))),
            Err(SchedError::UnknownQueue("nope".into()))
        );
        assert_eq!(
            s.enqueue(job("1", "research", "urgent", res(1, 0, 0))),
            Err(SchedError::UnknownPriorityClass("urgent".into()))
        );
        let err = s
            .enqueue(job("1", "research", "", res(1, 0, 3)))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "job can never be admitted: quota gpu 0/2 in queue research (needs 3)"
        );
        let err = s
            .enqueue(job("1", "research", "", res(3000, 0, 0)))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "job can never be admitted: capacity cpu 0/2000m (needs 3000m)"
        );
        s.enqueue(job("1", "research", "", res(1, 0, 0))).unwrap();
        assert_eq!(
            s.enqueue(job("1", "research", "", res(1, 0, 0))),
            Err(SchedError::Duplicate("1".into()))
        );
    }

    #[test]
    fn quota_limits_a_queue_with_a_reason() {
        let gpu2 = Quota {
            gpus: Some(2),
            ..Default::default()
        };
        let mut s = sched(res(100_000, 1 << 40, 8), vec![queue("research", 1, gpu2)]);
        for i in 0..3 {
            s.enqueue(job(&format!("j{i}"), "research", "", res(100, 0, 1)))
                .unwrap();
        }
        let d = s.schedule();
        assert_eq!(ids(&d), ["j0", "j1"]);
        assert_eq!(d.waiting["j2"], "quota gpu 2/2 in queue research (needs 1)");
        assert_eq!(s.queue_used("research").unwrap().gpus, 2);
        // Releasing one lets the next in.
        assert!(s.release("j0"));
        assert!(!s.release("j0"));
        assert_eq!(ids(&s.schedule()), ["j2"]);
    }

    fn tenant_job(id: &str, queue: &str, tenant: &str, r: Resources) -> Pending {
        Pending {
            tenant: tenant.into(),
            ..job(id, queue, "", r)
        }
    }

    #[test]
    fn each_tenant_has_the_queues_quota_and_its_own_line() {
        let cpu1000 = Quota {
            cpu_millis: Some(1000),
            ..Default::default()
        };
        let mut s = sched(res(100_000, 1 << 40, 0), vec![queue("q", 1, cpu1000)]);
        s.enqueue(tenant_job("a1", "q", "a", res(1000, 0, 0)))
            .unwrap();
        s.enqueue(tenant_job("a2", "q", "a", res(1000, 0, 0)))
            .unwrap();
        s.enqueue(tenant_job("a3", "q", "a", res(100, 0, 0)))
            .unwrap();
        s.enqueue(tenant_job("b1", "q", "b", res(1000, 0, 0)))
            .unwrap();
        let d = s.schedule();
        // Tenant a at its quota holds neither tenant b back nor lets its own later, smaller
        // job overtake its head.
        assert_eq!(ids(&d), ["a1", "b1"]);
        assert_eq!(
            d.waiting["a2"],
            "quota cpu 1000/1000m in queue q for tenant a (needs 1000m)"
        );
        assert_eq!(
            s.waiting_reason("a3").unwrap(),
            "behind job a2 in queue q for tenant a"
        );
        // The queue as a whole holds both tenants' jobs.
        assert_eq!(s.queue_used("q").unwrap().cpu_millis, 2000);
        assert!(s.release("a1"));
        assert_eq!(ids(&s.schedule()), ["a2"]);
        // Jobs without a tenant are one line, with the quota to themselves.
        s.enqueue(job("n1", "q", "", res(1000, 0, 0))).unwrap();
        s.enqueue(job("n2", "q", "", res(1000, 0, 0))).unwrap();
        let d = s.schedule();
        assert_eq!(ids(&d), ["n1"]);
        assert_eq!(
            d.waiting["n2"],
            "quota cpu 1000/1000m in queue q (needs 1000m)"
        );
    }

    #[test]
    fn between_tenants_of_a_queue_the_smaller_share_goes_first() {
        let mut s = sched(res(4000, 1 << 40, 0), vec![queue("q", 1, Quota::default())]);
        s.enqueue(tenant_job("a1", "q", "a", res(1000, 0, 0)))
            .unwrap();
        assert_eq!(ids(&s.schedule()), ["a1"]);
        // a arrived first with its second job, but holds more than b: b goes first.
        s.enqueue(tenant_job("a2", "q", "a", res(1000, 0, 0)))
            .unwrap();
        s.enqueue(tenant_job("b1", "q", "b", res(1000, 0, 0)))
            .unwrap();
        assert_eq!(ids(&s.schedule_at_most(1)), ["b1"]);
        assert_eq!(ids(&s.schedule_at_most(1)), ["a2"]);
        // Empty lines are forgotten once their jobs are released.
        for id in ["a1", "a2", "b1"] {
            assert!(s.release(id));
        }
        assert!(s.lines.is_empty());
    }

    #[test]
    fn capacity_limits_everything_with_a_reason() {
        let mut s = sched(res(2000, 1 << 30, 0), vec![queue("a", 1, Quota::default())]);
        s.enqueue(job("j0", "a", "", res(1900, 0, 0))).unwrap();
        s.enqueue(job("j1", "a", "", res(500, 0, 0))).unwrap();
        s.enqueue(job("j2", "a", "", res(50, 0, 0))).unwrap();
        let d = s.schedule();
        assert_eq!(ids(&d), ["j0"]);
        assert_eq!(d.waiting["j1"], "capacity cpu 1900/2000m (needs 500m)");
        // FIFO within a queue, no backfill: j2 would fit but stays behind j1.
        assert!(
            !d.waiting.contains_key("j2"),
            "only heads are in a decision"
        );
        assert_eq!(
            s.waiting_reason("j2").as_deref(),
            Some("behind job j1 in queue a")
        );
        assert_eq!(
            s.waiting_reason("j1").as_deref(),
            Some("capacity cpu 1900/2000m (needs 500m)")
        );
        assert_eq!(s.waiting_reason("j0"), None, "admitted, not waiting");
        assert_eq!(s.used().cpu_millis, 1900);
    }

    #[test]
    fn cpu_taken_by_the_fast_path_lowers_admission_but_keeps_what_runs() {
        let mut s = sched(res(4000, 1 << 30, 0), vec![queue("a", 1, Quota::default())]);
        s.enqueue(job("j0", "a", "", res(2000, 0, 0))).unwrap();
        assert_eq!(ids(&s.schedule()), ["j0"]);
        // The fast path takes 3000m: j0 keeps its 2000m, above what is left for jobs.
        let why = "the fast path uses 3000m of the configured 4000m".to_string();
        s.set_cpu_taken("", 3000, why);
        s.enqueue(job("j1", "a", "", res(500, 0, 0))).unwrap();
        let d = s.schedule();
        assert!(d.admitted.is_empty());
        assert_eq!(
            d.waiting["j1"],
            "capacity cpu 2000/1000m (needs 500m); the fast path uses 3000m of the configured 4000m"
        );
        assert_eq!(s.used().cpu_millis, 2000, "the running job keeps its CPU");
        // A memory shortfall does not blame the fast path.
        s.release("j0");
        s.remove("j1");
        let mem = 3 << 28;
        s.enqueue(job("m0", "a", "", res(0, mem, 0))).unwrap();
        s.enqueue(job("m1", "a", "", res(0, mem, 0))).unwrap();
        assert_eq!(
            s.schedule().waiting["m1"],
            format!(
                "capacity memory {mem}/{} bytes (needs {mem} bytes)",
                1u64 << 30
            )
        );
        s.release("m0");
        s.remove("m1");
        // The fast path gives the CPU back: the whole capacity is admissible again.
        s.enqueue(job("j2", "a", "", res(4000, 0, 0))).unwrap();
        assert!(s.schedule().admitted.is_empty());
        s.set_cpu_taken("", 0, String::new());
        assert_eq!(ids(&s.schedule()), ["j2"]);
        // A job that fits the configured capacity is never refused at submit for it.
        s.set_cpu_taken(
            "",
            4000,
            "the fast path uses 4000m of the configured 4000m".into(),
        );
        assert!(s.check("a", "", &res(4000, 0, 0)).is_ok());
    }

    #[test]
    fn priority_classes_are_strict_and_fifo_within_a_class() {
        let mut s = sched(res(1000, 0, 0), vec![queue("a", 1, Quota::default())]);
        s.enqueue(job("low1", "a", "low", res(100, 0, 0))).unwrap();
        s.enqueue(job("none", "a", "", res(100, 0, 0))).unwrap();
        s.enqueue(job("high1", "a", "high", res(100, 0, 0)))
            .unwrap();
        s.enqueue(job("low2", "a", "low", res(100, 0, 0))).unwrap();
        s.enqueue(job("high2", "a", "high", res(100, 0, 0)))
            .unwrap();
        assert_eq!(
            ids(&s.schedule()),
            ["high1", "high2", "low1", "low2", "none"]
        );
    }

    #[test]
    fn strict_priority_holds_across_queues() {
        let mut s = sched(
            res(1000, 0, 0),
            vec![
                queue("a", 1, Quota::default()),
                queue("b", 1, Quota::default()),
            ],
        );
        s.enqueue(job("a-low", "a", "low", res(600, 0, 0))).unwrap();
        s.enqueue(job("b-high", "b", "high", res(600, 0, 0)))
            .unwrap();
        let d = s.schedule();
        assert_eq!(ids(&d), ["b-high"]);
        assert_eq!(d.waiting["a-low"], "capacity cpu 600/1000m (needs 600m)");
    }

    #[test]
    fn a_large_job_is_not_starved_by_smaller_ones_in_other_queues() {
        let mut s = sched(
            res(1000, 0, 0),
            vec![
                queue("a", 1, Quota::default()),
                queue("b", 1, Quota::default()),
            ],
        );
        s.enqueue(job("small0", "b", "", res(500, 0, 0))).unwrap();
        assert_eq!(ids(&s.schedule()), ["small0"]);
        // b now holds a share; a (share 0) goes first, its big job waits for capacity, and b's
        // small job, which would fit, waits too.
        s.enqueue(job("big", "a", "", res(1000, 0, 0))).unwrap();
        s.enqueue(job("small1", "b", "", res(100, 0, 0))).unwrap();
        let d = s.schedule();
        assert!(d.admitted.is_empty());
        assert_eq!(d.waiting["big"], "capacity cpu 500/1000m (needs 1000m)");
        assert!(
            d.waiting["small1"].starts_with("capacity is kept for job big in queue a"),
            "{}",
            d.waiting["small1"]
        );
        s.release("small0");
        assert_eq!(ids(&s.schedule()), ["big"]);
    }

    #[test]
    fn a_quota_blocked_head_does_not_hold_other_queues_back() {
        let one_gpu = Quota {
            gpus: Some(1),
            ..Default::default()
        };
        let mut s = sched(
            res(1000, 0, 4),
            vec![queue("a", 1, one_gpu), queue("b", 1, Quota::default())],
        );
        s.enqueue(job("a0", "a", "high", res(10, 0, 1))).unwrap();
        s.enqueue(job("a1", "a", "high", res(10, 0, 1))).unwrap();
        s.enqueue(job("b0", "b", "low", res(10, 0, 1))).unwrap();
        let d = s.schedule();
        assert_eq!(ids(&d), ["a0", "b0"]);
        assert_eq!(d.waiting["a1"], "quota gpu 1/1 in queue a (needs 1)");
    }

    #[test]
    fn fair_share_is_weighted_drf() {
        // Capacity 12 GPUs. Queue a (weight 2) and b (weight 1) each flood one-GPU jobs: a gets
        // twice b's share, 8 and 4.
        let mut s = sched(
            res(1_000_000, 0, 12),
            vec![
                queue("a", 2, Quota::default()),
                queue("b", 1, Quota::default()),
            ],
        );
        for i in 0..20 {
            s.enqueue(job(&format!("a{i:02}"), "a", "", res(1, 0, 1)))
                .unwrap();
            s.enqueue(job(&format!("b{i:02}"), "b", "", res(1, 0, 1)))
                .unwrap();
        }
        let d = s.schedule();
        assert_eq!(d.admitted.len(), 12);
        assert_eq!(s.queue_used("a").unwrap().gpus, 8);
        assert_eq!(s.queue_used("b").unwrap().gpus, 4);
        // The dominant resource counts: b's jobs are memory-heavy in a second scheduler.
        let mut s = Scheduler::new(SchedulerConfig {
            capacity: res(100, 100, 0),
            queues: vec![
                queue("cpu", 1, Quota::default()),
                queue("mem", 1, Quota::default()),
            ],
            priority_classes: vec![],
        })
        .unwrap();
        for i in 0..10 {
            s.enqueue(job(&format!("c{i}"), "cpu", "", res(10, 1, 0)))
                .unwrap();
            s.enqueue(job(&format!("m{i}"), "mem", "", res(1, 20, 0)))
                .unwrap();
        }
        s.schedule();
        // Each round goes to the lower dominant share: the cpu queue's is its cpu (10% a job), the
        // memory queue's its memory (20% a job), so the cpu queue runs about twice as many jobs,
        // until the memory queue's fifth job finds no memory left (9 + 80 + 20 > 100).
        let cpu = s.queue_used("cpu").unwrap();
        let mem = s.queue_used("mem").unwrap();
        assert!(cpu.memory_bytes + mem.memory_bytes <= 100);
        assert!(cpu.cpu_millis + mem.cpu_millis <= 100);
        assert_eq!(mem.memory_bytes, 80, "{cpu:?} {mem:?}");
        assert_eq!(cpu.cpu_millis, 90, "{cpu:?} {mem:?}");
    }

    #[test]
    fn slots_bound_admissions_without_reordering() {
        let mut s = sched(res(1000, 0, 0), vec![queue("a", 1, Quota::default())]);
        for id in ["x", "y", "z"] {
            s.enqueue(job(id, "a", "", res(1, 0, 0))).unwrap();
        }
        let d = s.schedule_at_most(1);
        assert_eq!(ids(&d), ["x"]);
        assert_eq!(d.waiting["y"], "every slot for running jobs is taken");
        assert_eq!(
            s.waiting_reason("z").as_deref(),
            Some("behind job y in queue a")
        );
        // A new head by priority has no reason until the next round.
        s.enqueue(job("w", "a", "high", res(1, 0, 0))).unwrap();
        assert_eq!(s.waiting_reason("w"), None);
        assert_eq!(
            s.waiting_reason("y").as_deref(),
            Some("behind job w in queue a")
        );
        assert!(s.remove("w"));
        assert!(s.schedule_at_most(0).admitted.is_empty());
        assert_eq!(ids(&s.schedule_at_most(5)), ["y", "z"]);
    }

    #[test]
    fn removed_jobs_are_not_admitted() {
        let mut s = sched(res(1000, 0, 0), vec![queue("a", 1, Quota::default())]);
        s.enqueue(job("x", "a", "", res(1, 0, 0))).unwrap();
        s.enqueue(job("y", "a", "", res(1, 0, 0))).unwrap();
        assert!(s.remove("x"));
        assert!(!s.remove("x"));
        assert_eq!(ids(&s.schedule()), ["y"]);
        assert_eq!(s.waiting_len(), 0);
        assert_eq!(s.admitted_len(), 1);
    }

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter() {
        let p = RetryPolicy {
            initial_delay_ms: 1000,
            max_delay_ms: 10_000,
            max_infra_retries: 3,
        };
        let mut j = Jitter::new(42);
        for (retry, base) in [
            (1, 1000),
            (2, 2000),
            (3, 4000),
            (4, 8000),
            (5, 10_000),
            (40, 10_000),
        ] {
            for _ in 0..50 {
                let d = p.delay_ms(retry, &mut j);
                assert!((base / 2..=base).contains(&d), "retry {retry}: {d}");
            }
        }
        // Seeded: reproducible; and the jitter does vary.
        let a: Vec<_> = (0..5).map(|_| p.delay_ms(3, &mut Jitter::new(7))).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut j = Jitter::new(7);
        let b: Vec<_> = (0..5).map(|_| p.delay_ms(3, &mut j)).collect();
        assert!(b.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn application_and_infrastructure_failures_are_counted_apart() {
        let p = RetryPolicy {
            initial_delay_ms: 100,
            max_delay_ms: 1000,
            max_infra_retries: 1,
        };
        let mut j = Jitter::new(1);
        use FailureKind::*;
        // max_retries 2: the third application failure gives up.
        assert!(matches!(
            p.on_failure(Application, 0, 0, 2, 1000, &mut j),
            RetryDecision::RetryAt { at_ms, .. } if (1050..=1100).contains(&at_ms)
        ));
        assert!(matches!(
            p.on_failure(Application, 1, 0, 2, 0, &mut j),
            RetryDecision::RetryAt { .. }
        ));
        assert_eq!(
            p.on_failure(Application, 2, 0, 2, 0, &mut j),
            RetryDecision::GiveUp {
                reason: "failed 3 times (max_retries 2)".into()
            }
        );
        // An infrastructure failure does not use the job's retries, even with max_retries 0.
        assert!(matches!(
            p.on_failure(Infrastructure, 0, 0, 0, 0, &mut j),
            RetryDecision::RetryAt { .. }
        ));
        assert_eq!(
            p.on_failure(Infrastructure, 0, 1, 0, 0, &mut j),
            RetryDecision::GiveUp {
                reason: "2 infrastructure failures (limit 1)".into()
            }
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Enqueue {
            queue: usize,
            class: usize,
            cpu: u64,
            gpus: u32,
        },
        Schedule,
        Release(usize),
        Remove(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..3usize, 0..3usize, 0..1200u64, 0..4u32)
                .prop_map(|(queue, class, cpu, gpus)| Op::Enqueue { queue, class, cpu, gpus }),
            2 => Just(Op::Schedule),
            1 => (0..64usize).prop_map(Op::Release),
            1 => (0..64usize).prop_map(Op::Remove),
        ]
    }

    proptest! {
        #[test]
        fn admitted_usage_never_exceeds_quota_or_capacity(
            quotas in proptest::collection::vec((proptest::option::of(0..1500u64), proptest::option::of(0..4u32), 1..4u32), 3),
            cap_cpu in 0..3000u64,
            cap_gpu in 0..6u32,
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let names = ["q0", "q1", "q2"];
            let classes = ["high", "low", ""];
            let queues: Vec<_> = quotas.iter().enumerate().map(|(i, &(cpu, gpus, w))| {
                queue(names[i], w, Quota { cpu_millis: cpu, memory_bytes: None, gpus })
            }).collect();
            let mut s = sched(res(cap_cpu, 0, cap_gpu), queues);
            let mut held: HashMap<String, (usize, Resources)> = HashMap::new();
            let mut n = 0;
            for op in ops {
                match op {
                    Op::Enqueue { queue, class, cpu, gpus } => {
                        n += 1;
                        let r = res(cpu, 0, gpus);
                        let fits = s.check(names[queue], classes[class], &r).is_ok();
                        let ok = s.enqueue(job(&format!("j{n}"), names[queue], classes[class], r)).is_ok();
                        prop_assert_eq!(fits, ok);
                    }
                    Op::Schedule => {
                        let d = s.schedule();
                        for j in d.admitted {
                            let q = names.iter().position(|n| *n == j.queue).unwrap();
                            held.insert(j.id, (q, j.resources));
                        }
                        // Every waiting job has a reason; the decision holds the heads'.
                        prop_assert!(d.waiting.len() <= names.len());
                        for id in s.index.keys() {
                            prop_assert!(s.waiting_reason(id).is_some(), "{} has no reason", id);
                        }
                    }
                    Op::Release(i) => {
                        let id = held.keys().nth(i % held.len().max(1)).cloned();
                        if let Some(id) = id {
                            held.remove(&id);
                            prop_assert!(s.release(&id));
                        }
                    }
                    Op::Remove(i) => { s.remove(&format!("j{}", i % (n + 1))); }
                }
                let total = held.values().fold((0u64, 0u32), |a, (_, r)| (a.0 + r.cpu_millis, a.1 + r.gpus));
                prop_assert!(total.0 <= cap_cpu && total.1 <= cap_gpu);
                for (qi, &(qcpu, qgpu, _)) in quotas.iter().enumerate() {
                    let used = held.values().filter(|(q, _)| *q == qi)
                        .fold((0u64, 0u32), |a, (_, r)| (a.0 + r.cpu_millis, a.1 + r.gpus));
                    prop_assert!(qcpu.is_none_or(|c| used.0 <= c));
                    prop_assert!(qgpu.is_none_or(|g| used.1 <= g));
                    let sq = s.queue_used(names[qi]).unwrap();
                    prop_assert_eq!((sq.cpu_millis, sq.gpus), used);
                }
            }
        }
    }
}
