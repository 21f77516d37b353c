//! The submit side of a model's queue: many producers, one consumer (the model's batcher).
//! Lock-free: admission is one atomic reservation against the bound, then a push onto a crossbeam
//! `ArrayQueue`; a full queue refuses at once instead of making the caller wait.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_queue::ArrayQueue;
use tokio::sync::oneshot;

use crate::error::InferError;
use crate::request::{InferOutput, Request};

pub(crate) type Reply = oneshot::Sender<Result<InferOutput, InferError>>;

/// Non-batch dimensions of each input, with its name: only requests with equal keys can share a
/// batch.
pub(crate) type BatchKey = Vec<(String, Vec<usize>)>;

pub(crate) struct Pending {
    pub req: Request,
    pub reply: Reply,
    pub enqueued: Instant,
    /// Priority level, 1 highest.
    pub level: u32,
    /// When the queue policy's timeout passes: refused then, or demoted when `delay_on_timeout`.
    pub queue_expiry: Option<Instant>,
    pub delay_on_timeout: bool,
    /// Demoted by a DELAY timeout: considered after every request that is not.
    pub delayed: bool,
    /// The caller's own deadline: past it the request is refused whatever the policy.
    pub deadline: Option<Instant>,
    pub key: BatchKey,
    /// Text models: the request's tokens, counted by the model's tokenizer on arrival.
    pub tokens: Option<veraltheim_models::TokenCount>,
    /// Batches of its dimensions that left without it while it waited (the batcher's rule 4).
    pub passed: u32,
    /// Background work: the request asked for it, or its level is a background level.
    pub background: bool,
}

pub(crate) struct RequestQueue {
    items: ArrayQueue<Pending>,
    /// Requests admitted and not yet handed to the pool or answered: the bound applies to this,
    /// which counts both the ring and the batcher's local list.
    depth: AtomicUsize,
    capacity: usize,
}

impl RequestQueue {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RequestQueue {
            items: ArrayQueue::new(capacity),
            depth: AtomicUsize::new(0),
            capacity,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Admits `p`; false (and `p` dropped) when the queue is full.
    pub fn try_push(&self, p: Pending) -> bool {
        let reserved = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d < self.capacity).then_some(d + 1)
            })
            .is_ok();
        if !reserved {
            return false;
        }
        // Cannot fail: `depth` bounds the ring's occupancy from above.
        if self.items.push(p).is_err() {
            self.release(1);
            return false;
        }
        true
    }

    /// Whether the ring holds nothing (requests the batcher has not collected yet); `depth`
    /// also counts the batcher's local list.
    pub fn ring_is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn pop(&self) -> Option<Pending> {
        self.items.pop()
    }

    /// Gives back `n` reservations once requests leave the batcher.
    pub fn release(&self, n: usize) {
        self.depth.fetch_sub(n, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veraltheim_models::Tensor;

    fn pending() -> (Pending, oneshot::Receiver<Result<InferOutput, InferError>>) {
        let (tx, rx) = oneshot::channel();
        let req = Request::new(vec![Tensor::from_f32("x", vec![1, 1], &[0.0]).unwrap()], 1);
        (
            Pending {
                req,
                reply: tx,
                enqueued: Instant::now(),
                level: 1,
                queue_expiry: None,
                delay_on_timeout: false,
                delayed: false,
                deadline: None,
                key: Vec::new(),
                tokens: None,
                passed: 0,
                background: false,
            },
            rx,
        )
    }

    #[test]
    fn bound_counts_until_release() {
        let q = RequestQueue::new(2);
        assert!(q.try_push(pending().0));
        assert!(q.try_push(pending().0));
        assert!(!q.try_push(pending().0));
        // Popping alone does not free a slot: the batcher still holds the request.
        assert!(q.pop().is_some());
        assert!(!q.try_push(pending().0));
        q.release(1);
        assert!(q.try_push(pending().0));
        assert_eq!(q.depth(), 2);
    }

    #[test]
    fn many_producers_never_exceed_the_bound() {
        let q = std::sync::Arc::new(RequestQueue::new(64));
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let q = q.clone();
                let accepted = accepted.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        if q.try_push(pending().0) {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 64);
        assert_eq!(q.depth(), 64);
    }
}
