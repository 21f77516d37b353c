//! The one inference edge: every protocol (KServe gRPC, our own API, batch inference jobs, and
//! any to come) turns its request into an [`InferCall`] and goes through [`Inference::infer`], so
//! validation, deadlines, the response cache and errors cannot differ between them. Errors are
//! [`Error`]s; each protocol maps their [`ErrorKind`](crate::ErrorKind) to its own status in one
//! place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;
use veraltheim_bus::TraceParent;
use veraltheim_fastpath::{InferError, InferOutput, ModelWorker, Request, SpanRef};
use veraltheim_models::Tensor;
use veraltheim_models::validate::{validate_inputs, validate_outputs};
use veraltheim_storage::ContentHash;

use crate::Error;
use crate::cache::ResponseCache;
use crate::manager::{InFlight, ModelManager};

/// The models and the response cache, behind the one inference path.
pub struct Inference {
    models: Arc<ModelManager>,
    cache: ResponseCache,
}

/// One inference as every protocol describes it.
pub struct InferCall {
    pub model: String,
    /// The version asked for; empty: the serving one.
    pub version: String,
    pub id: String,
    pub inputs: Vec<Tensor>,
    /// Outputs asked for; empty: all.
    pub outputs: Vec<String>,
    pub priority: u32,
    /// The request's own queue timeout (KServe's `timeout` parameter).
    pub timeout: Option<Duration>,
    /// The caller's deadline (gRPC's `grpc-timeout`).
    pub deadline: Option<Instant>,
    pub received: Instant,
    /// The W3C trace context the request runs in. A protocol handler sets the caller's
    /// `traceparent`; the coordinator's tracing replaces it with its own span for the request
    /// (whose id the batch's trace links to), or clears it when it exports nothing. When set,
    /// the fast path records the request's batch ([`veraltheim_fastpath::BatchTrace`]).
    pub trace: Option<TraceParent>,
    /// Background work (a batch inference job's line): it runs behind online requests, and
    /// under the model's controller when the model has a latency objective.
    pub background: bool,
}

impl Inference {
    pub fn new(models: Arc<ModelManager>, cache: ResponseCache) -> Self {
        Inference { models, cache }
    }

    pub fn models(&self) -> &Arc<ModelManager> {
        &self.models
    }

    pub fn cache(&self) -> &ResponseCache {
        &self.cache
    }

    /// Validates, queues and awaits one inference.
    ///
    /// The checks, the cache lookup and the submit run when this is called; the future only
    /// awaits the answer. That keeps the future small: tonic, axum and hyper move it through
    /// several boxes. When it carried the whole path it was 10 KiB (the on-demand load inline)
    /// and `memmove` took 10.3% of the server's CPU samples; at ~1 KiB, 7.6–8.4%, the rest being
    /// h2's and hyper's own (perf, identity at concurrency 64). A model that must first be
    /// loaded on demand takes a boxed path.
    pub fn infer(
        &self,
        call: InferCall,
    ) -> impl Future<Output = Result<InferOutput, Error>> + Send + '_ {
        let span = tracing::debug_span!("infer", model = %call.model, id = %call.id);
        let step = span.in_scope(|| self.start(call));
        async move {
            match step {
                Step::Submitted(submitted) => self.finish(submitted).await,
                Step::Load(call) => Box::pin(self.load_then_infer(call)).await,
            }
        }
        .instrument(span)
    }

    fn start(&self, call: InferCall) -> Step {
        if let Err(e) = self.models.check_version(&call.model, &call.version) {
            return Step::Submitted(Submitted::Done(Err(e)));
        }
        match self.models.acquire(&call.model) {
            Ok((worker, in_flight)) => Step::Submitted(self.submit(worker, in_flight, call)),
            Err(e) if self.models.loads_on_demand_after(&call.model, &e) => Step::Load(call),
            Err(e) => Step::Submitted(Submitted::Done(Err(e))),
        }
    }

    async fn load_then_infer(&self, call: InferCall) -> Result<InferOutput, Error> {
        // Held until the answer is in: a model with requests in flight is never evicted.
        let (worker, in_flight) = self
            .models
            .acquire_or_load(&call.model, call.deadline)
            .await?;
        self.finish(self.submit(worker, in_flight, call)).await
    }

    async fn finish(&self, submitted: Submitted) -> Result<InferOutput, Error> {
        match submitted {
            Submitted::Done(result) => result,
            Submitted::Waiting(waiting) => self.wait(waiting).await,
            Submitted::Count(counting) => Box::pin(self.count_then_wait(*counting)).await,
        }
    }

    /// Counts a large text request's tokens on a blocking thread, then queues and awaits it.
    async fn count_then_wait(&self, c: Counting) -> Result<InferOutput, Error> {
        let Counting {
            worker,
            in_flight,
            mut request,
            cache_key,
        } = c;
        let counter = worker.clone();
        let request = tokio::task::spawn_blocking(move || {
            counter.count_tokens_of(&mut request).map(|()| request)
        })
        .await
        .map_err(|e| {
            Error::Infer(InferError::Panicked {
                model: worker.name().to_string(),
                message: format!("counting the request's tokens failed: {e}"),
            })
        })??;
        let waiting = Self::queue(worker, in_flight, request, cache_key)?;
        self.wait(waiting).await
    }

    /// Validates the call against the model's configuration, answers it from the response cache
    /// when it can, and queues it otherwise.
    fn submit(&self, worker: Arc<ModelWorker>, in_flight: InFlight, call: InferCall) -> Submitted {
        let config = worker.config();
        let (inputs, rows) = match validate_inputs(config, call.inputs, self.models.limits()) {
            Ok(v) => v,
            Err(e) => return Submitted::Done(Err(Error::Invalid(e.to_string()))),
        };
        if let Err(e) = validate_outputs(config, &call.outputs) {
            return Submitted::Done(Err(Error::Invalid(e.to_string())));
        }
        let cache_key = if config.cache_enabled() {
            let lookup = Instant::now();
            let key = ResponseCache::key(&call.model, &config.to_json(), &inputs, &call.outputs);
            if let Some(hit) = self.cache.get(&key) {
                worker.record_cache_hit(lookup.elapsed(), call.received.elapsed());
                return Submitted::Done(Ok(InferOutput {
                    outputs: hit.outputs.clone(),
                    queue: Duration::ZERO,
                    compute: Duration::ZERO,
                    batch_size: rows,
                    batch: None,
                }));
            }
            worker.record_cache_miss(lookup.elapsed());
            Some(key)
        } else {
            None
        };
        let request = Request {
            id: call.id,
            inputs,
            rows,
            outputs: call.outputs,
            priority: call.priority,
            timeout: call.timeout,
            deadline: call.deadline,
            received: call.received,
            span: call.trace.map(|t| SpanRef {
                trace_id: t.trace_id(),
                span_id: t.parent_id(),
            }),
            background: call.background,
            tokens: None,
        };
        // A text model counts a request's tokens when it arrives; a large one is counted on a
        // blocking thread rather than here, on the runtime's.
        if worker.counts_tokens_off_runtime(&request) {
            return Submitted::Count(Box::new(Counting {
                worker,
                in_flight,
                request,
                cache_key,
            }));
        }
        match Self::queue(worker, in_flight, request, cache_key) {
            Ok(waiting) => Submitted::Waiting(waiting),
            Err(e) => Submitted::Done(Err(e)),
        }
    }

    /// Queues a request that is ready (validated, its tokens counted where they must be).
    fn queue(
        worker: Arc<ModelWorker>,
        in_flight: InFlight,
        request: Request,
        cache_key: Option<ContentHash>,
    ) -> Result<Waiting, Error> {
        let deadline = request.deadline;
        let rx = worker.submit(request)?;
        Ok(Waiting {
            worker,
            _in_flight: in_flight,
            rx,
            cache_key,
            deadline,
        })
    }

    async fn wait(&self, w: Waiting) -> Result<InferOutput, Error> {
        // The queue drops a request whose deadline passes while it waits; the timeout here
        // covers one whose batch is still computing when the caller's deadline comes.
        let answer = match w.deadline {
            Some(at) => match tokio::time::timeout_at(at.into(), w.rx).await {
                Ok(answer) => answer,
                Err(_) => return Err(Error::NoAnswerInTime(w.worker.name().to_string())),
            },
            None => w.rx.await,
        };
        let out = match answer {
            Ok(result) => result?,
            Err(_) => return Err(Error::Dropped(w.worker.name().to_string())),
        };
        if let Some(key) = w.cache_key {
            self.cache.insert(key, out.outputs.clone());
        }
        Ok(out)
    }
}

/// Where [`Inference::infer`] stands after its synchronous part.
enum Step {
    Submitted(Submitted),
    /// The model must be loaded on demand first.
    Load(InferCall),
}

/// A call that went through [`Inference::submit`]: answered already, queued, or to be counted
/// first.
enum Submitted {
    Done(Result<InferOutput, Error>),
    Waiting(Waiting),
    /// A large text request whose tokens are counted on a blocking thread before it is queued.
    Count(Box<Counting>),
}

/// A validated request waiting for its token count.
struct Counting {
    worker: Arc<ModelWorker>,
    in_flight: InFlight,
    request: Request,
    cache_key: Option<ContentHash>,
}

/// A submitted request, until its answer comes.
struct Waiting {
    worker: Arc<ModelWorker>,
    /// Held until the answer is in: a model with requests in flight is never evicted.
    _in_flight: InFlight,
    rx: tokio::sync::oneshot::Receiver<Result<InferOutput, InferError>>,
    cache_key: Option<ContentHash>,
    deadline: Option<Instant>,
}
