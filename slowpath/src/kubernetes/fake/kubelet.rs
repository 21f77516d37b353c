//! The fake job controller and kubelet: a created Job's pod runs its container's command as a
//! tiny script (see the module documentation of `fake`).

use super::*;

/// One statement of a fake container's script.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Step {
    Echo(String),
    Sleep(Duration),
    Exit(i32),
    Hold,
    Evict,
    NodeLost,
}

pub(super) fn script(command: &[String]) -> Vec<Step> {
    let text = match command {
        [sh, flag, script, ..] if sh.ends_with("sh") && flag == "-c" => script.clone(),
        argv => argv.join(" "),
    };
    text.split(['\n', ';'])
        .flat_map(|s| s.split("&&"))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let (word, rest) = s.split_once(' ').unwrap_or((s, ""));
            let rest = rest.trim();
            Some(match word {
                "echo" => Step::Echo(rest.trim_matches(['"', '\'']).to_owned()),
                "sleep" => Step::Sleep(Duration::from_secs_f64(rest.parse().unwrap_or(0.0))),
                "exit" => Step::Exit(rest.parse().unwrap_or(1)),
                "true" => return None,
                "false" => Step::Exit(1),
                "fake-hold" => Step::Hold,
                "fake-evict" => Step::Evict,
                "fake-node-lost" => Step::NodeLost,
                _ => return None,
            })
        })
        .collect()
}

/// How a fake pod ended.
pub(super) enum End {
    Exit(i32),
    Evicted,
    NodeLost,
    Deadline,
    Deleted,
}

/// The fake job controller and kubelet for one Job.
pub(super) struct Driver {
    pub(super) shared: Arc<Shared>,
    pub(super) ns: String,
    pub(super) job: String,
    pub(super) controls: mpsc::UnboundedReceiver<Control>,
    pub(super) released: bool,
}

impl Driver {
    pub(super) fn pod_key(&self) -> (String, String) {
        key(&self.ns, &format!("{}-fake0", self.job))
    }

    pub(super) async fn run(mut self) {
        let k = key(&self.ns, &self.job);
        let (spec, step) = {
            let state = self.shared.state.lock();
            (state.jobs.get(&k).cloned(), state.step)
        };
        let Some(job) = spec else { return };
        let job_spec = job.spec.clone().unwrap_or_default();
        let pod_spec = job_spec.template.spec.clone().unwrap_or_default();
        let container = pod_spec.containers.first().cloned().unwrap_or_default();
        let image = container.image.clone().unwrap_or_default();
        let mut argv = container.command.clone().unwrap_or_default();
        argv.extend(container.args.clone().unwrap_or_default());
        let steps = script(&argv);
        let deadline = job_spec
            .active_deadline_seconds
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(s.max(0) as u64));

        // The job controller makes the pod; the scheduler places it.
        self.make_pod(&job);
        tokio::time::sleep(step).await;
        let end = if image.contains("pull-error") {
            self.set_waiting(
                "ErrImagePull",
                &format!("fake: cannot pull image \"{image}\""),
            );
            tokio::time::sleep(step).await;
            self.set_waiting(
                "ImagePullBackOff",
                &format!("Back-off pulling image \"{image}\""),
            );
            self.idle(deadline).await
        } else {
            self.set_running();
            self.run_steps(&steps, deadline).await
        };
        self.finish(end);
    }

    /// Waits for a control or the deadline, starting nothing.
    pub(super) async fn idle(&mut self, deadline: Option<tokio::time::Instant>) -> End {
        loop {
            match self.wait_or_control(None, deadline).await {
                Some(End::Exit(_)) | None => continue,
                Some(end) => return end,
            }
        }
    }

    /// Sleeps for `d` (forever when `None`) unless a control or the deadline comes first.
    /// `Some(End::Exit(0))` stands for a release.
    pub(super) async fn wait_or_control(
        &mut self,
        d: Option<Duration>,
        deadline: Option<tokio::time::Instant>,
    ) -> Option<End> {
        let sleep = async {
            match d {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => None,
            () = deadline => Some(End::Deadline),
            c = self.controls.recv() => match c {
                Some(Control::Release) => {
                    self.released = true;
                    Some(End::Exit(0))
                }
                Some(Control::Evict) => Some(End::Evicted),
                Some(Control::NodeLost) => Some(End::NodeLost),
                Some(Control::Deleted) | None => Some(End::Deleted),
            },
        }
    }

    pub(super) async fn run_steps(
        &mut self,
        steps: &[Step],
        deadline: Option<tokio::time::Instant>,
    ) -> End {
        for s in steps {
            match s {
                Step::Echo(text) => {
                    let mut state = self.shared.state.lock();
                    let log = state.logs.entry(self.pod_key()).or_default();
                    log.extend_from_slice(text.as_bytes());
                    log.push(b'\n');
                }
                Step::Sleep(d) => {
                    let until = tokio::time::Instant::now() + *d;
                    loop {
                        let left = until.saturating_duration_since(tokio::time::Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match self.wait_or_control(Some(left), deadline).await {
                            None => break,
                            Some(End::Exit(_)) => continue, // a release, not awaited here
                            Some(end) => return end,
                        }
                    }
                }
                Step::Hold => {
                    while !self.released {
                        match self.wait_or_control(None, deadline).await {
                            Some(End::Exit(_)) | None => {}
                            Some(end) => return end,
                        }
                    }
                    self.released = false;
                }
                Step::Exit(code) => return End::Exit(*code),
                Step::Evict => return End::Evicted,
                Step::NodeLost => return End::NodeLost,
            }
            // Controls that came while we were not waiting.
            if let Ok(c) = self.controls.try_recv() {
                match c {
                    Control::Release => self.released = true,
                    Control::Evict => return End::Evicted,
                    Control::NodeLost => return End::NodeLost,
                    Control::Deleted => return End::Deleted,
                }
            }
        }
        End::Exit(0)
    }

    pub(super) fn make_pod(&self, job: &Job) {
        let template = job
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let uid = job.metadata.uid.clone().unwrap_or_default();
        labels.insert("job-name".into(), self.job.clone());
        labels.insert("batch.kubernetes.io/job-name".into(), self.job.clone());
        labels.insert("controller-uid".into(), uid.clone());
        labels.insert("batch.kubernetes.io/controller-uid".into(), uid.clone());
        let pk = self.pod_key();
        let mut spec = template.spec.unwrap_or_default();
        spec.node_name = Some("fake-node-1".into());
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(pk.1.clone()),
                namespace: Some(self.ns.clone()),
                uid: Some(format!("{uid}-pod")),
                creation_timestamp: Some(now()),
                labels: Some(labels),
                owner_references: Some(vec![OwnerReference {
                    api_version: "batch/v1".into(),
                    kind: "Job".into(),
                    name: self.job.clone(),
                    uid,
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            spec: Some(spec),
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                conditions: Some(vec![PodCondition {
                    type_: "PodScheduled".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                container_statuses: Some(vec![ContainerStatus {
                    name: crate::kubernetes::classify::CONTAINER.into(),
                    image: String::new(),
                    image_id: String::new(),
                    ready: false,
                    restart_count: 0,
                    state: Some(ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("ContainerCreating".into()),
                            message: None,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        };
        let mut state = self.shared.state.lock();
        state.pods.insert(pk.clone(), pod);
        state.emit_pod(&self.shared.changes, "ADDED", &pk);
        let jk = key(&self.ns, &self.job);
        if let Some(job) = state.jobs.get_mut(&jk) {
            let s = job.status.get_or_insert_with(JobStatus::default);
            s.active = Some(1);
            s.ready = Some(0);
            s.start_time = Some(now());
        }
        state.emit_job(&self.shared.changes, "MODIFIED", &jk);
    }

    pub(super) fn update_pod(&self, f: impl FnOnce(&mut PodStatus)) {
        let pk = self.pod_key();
        let mut state = self.shared.state.lock();
        let Some(pod) = state.pods.get_mut(&pk) else {
            return;
        };
        f(pod.status.get_or_insert_with(PodStatus::default));
        state.emit_pod(&self.shared.changes, "MODIFIED", &pk);
    }

    pub(super) fn set_container(status: &mut PodStatus, state: ContainerState, ready: bool) {
        if let Some(c) = status
            .container_statuses
            .as_mut()
            .and_then(|c| c.first_mut())
        {
            c.state = Some(state);
            c.ready = ready;
            c.started = Some(ready);
        }
    }

    pub(super) fn set_waiting(&self, reason: &str, message: &str) {
        self.update_pod(|s| {
            Self::set_container(
                s,
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.into()),
                        message: Some(message.into()),
                    }),
                    ..Default::default()
                },
                false,
            );
        });
    }

    pub(super) fn set_running(&self) {
        self.update_pod(|s| {
            s.phase = Some("Running".into());
            s.start_time = Some(now());
            Self::set_container(
                s,
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(now()),
                    }),
                    ..Default::default()
                },
                true,
            );
        });
        let jk = key(&self.ns, &self.job);
        let mut state = self.shared.state.lock();
        if let Some(job) = state.jobs.get_mut(&jk) {
            job.status.get_or_insert_with(JobStatus::default).ready = Some(1);
        }
        state.emit_job(&self.shared.changes, "MODIFIED", &jk);
    }

    pub(super) fn terminated(code: i32) -> ContainerState {
        ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: code,
                reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                finished_at: Some(now()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub(super) fn finish(&self, end: End) {
        let pk = self.pod_key();
        match end {
            End::Deleted => return, // the delete handler takes it from here
            End::Exit(code) => self.update_pod(|s| {
                s.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
                Self::set_container(s, Self::terminated(code), false);
            }),
            End::Evicted => self.update_pod(|s| {
                s.phase = Some("Failed".into());
                s.reason = Some("Evicted".into());
                s.message = Some("The node was low on resource: memory.".into());
                s.conditions
                    .get_or_insert_with(Vec::new)
                    .push(PodCondition {
                        type_: "DisruptionTarget".into(),
                        status: "True".into(),
                        reason: Some("TerminationByKubelet".into()),
                        message: Some("The node was low on resource: memory.".into()),
                        ..Default::default()
                    });
                Self::set_container(s, Self::terminated(137), false);
            }),
            End::NodeLost | End::Deadline => {
                let mut state = self.shared.state.lock();
                state.emit_pod(&self.shared.changes, "DELETED", &pk);
            }
        }
        let jk = key(&self.ns, &self.job);
        let mut state = self.shared.state.lock();
        state.controls.remove(&jk);
        let Some(job) = state.jobs.get_mut(&jk) else {
            return;
        };
        let s = job.status.get_or_insert_with(JobStatus::default);
        s.active = None;
        s.ready = Some(0);
        let condition = |type_: &str, reason: &str, message: &str| JobCondition {
            type_: type_.into(),
            status: "True".into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_transition_time: Some(now()),
            last_probe_time: Some(now()),
        };
        match end {
            End::Exit(0) => {
                s.succeeded = Some(1);
                s.completion_time = Some(now());
                s.conditions = Some(vec![
                    condition(
                        "SuccessCriteriaMet",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                    condition(
                        "Complete",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                ]);
            }
            End::Deadline => {
                s.failed = Some(1);
                s.conditions = Some(vec![
                    condition(
                        "FailureTarget",
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    ),
                    condition(
                        "Failed",
                        "DeadlineExceeded",
                        "Job was active longer than specified deadline",
                    ),
                ]);
            }
            _ => {
                s.failed = Some(1);
                s.conditions = Some(vec![
                    condition(
                        "FailureTarget",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                    condition(
                        "Failed",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    ),
                ]);
            }
        }
        state.emit_job(&self.shared.changes, "MODIFIED", &jk);
    }
}
