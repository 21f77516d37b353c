//! A job's output kept to a size: the first half of the budget passes through as it comes (the
//! head), the last half is kept in memory (the tail) and comes at the end after a note of how
//! many bytes were cut between them. Local attempts write it to their log file; Kubernetes
//! attempts apply it to the pod's log as it is read (the kubelet keeps the pod's own copy).
//!
//! Memory is bounded by the tail's half of the budget, whatever the output's size.

use std::collections::VecDeque;

/// The head/tail split of one output.
pub(crate) struct HeadTail {
    head_left: u64,
    tail: VecDeque<u8>,
    tail_cap: usize,
    cut: u64,
}

impl HeadTail {
    /// A cap of `max` bytes (head and tail; the note comes on top).
    pub(crate) fn new(max: u64) -> Self {
        let head = max / 2;
        HeadTail {
            head_left: head,
            tail: VecDeque::new(),
            // On 32-bit targets a cap beyond memory is cut to what can be addressed.
            tail_cap: usize::try_from(max - head).unwrap_or(usize::MAX),
            cut: 0,
        }
    }

    /// Takes the next bytes of the output; returns the part of them that belongs to the head
    /// (pass it on now). The rest is kept for the tail, dropping what falls out of it.
    pub(crate) fn push<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let n = data
            .len()
            .min(usize::try_from(self.head_left).unwrap_or(usize::MAX));
        self.head_left -= n as u64;
        let (head, rest) = data.split_at(n);
        if rest.len() >= self.tail_cap {
            self.cut += (self.tail.len() + rest.len() - self.tail_cap) as u64;
            self.tail.clear();
            self.tail.extend(&rest[rest.len() - self.tail_cap..]);
        } else {
            let over = (self.tail.len() + rest.len()).saturating_sub(self.tail_cap);
            self.tail.drain(..over);
            self.cut += over as u64;
            self.tail.extend(rest);
        }
        head
    }

    /// What comes after the head once the output has ended: the note of what was cut (if
    /// anything was), then the tail.
    pub(crate) fn finish(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.tail.len() + 96);
        if self.cut > 0 {
            out.extend_from_slice(
                format!(
                    "\n[veraltheim: {} bytes of this output were cut here (jobs.max_log_bytes)]\n",
                    self.cut
                )
                .as_bytes(),
            );
        }
        out.extend(self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(max: u64, chunks: &[&[u8]]) -> Vec<u8> {
        let mut cap = HeadTail::new(max);
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(cap.push(c));
        }
        out.extend(cap.finish());
        out
    }

    #[test]
    fn within_the_cap_everything_passes_in_order() {
        assert_eq!(run(10, &[b"abc", b"def", b"ghij"]), b"abcdefghij");
    }

    #[test]
    fn beyond_the_cap_head_note_and_tail_remain() {
        let out =
            String::from_utf8(run(10, &[b"0123456", b"789abcdefghijklmnopqrstuvwxyz"])).unwrap();
        assert_eq!(
            out,
            "01234\n[veraltheim: 26 bytes of this output were cut here (jobs.max_log_bytes)]\nvwxyz"
        );
    }

    proptest::proptest! {
        #[test]
        fn the_kept_bytes_are_the_first_and_last_halves_and_the_cut_counts_the_rest(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            splits in proptest::collection::vec(0usize..400, 0..8),
            max in 2u64..200,
        ) {
            let mut points: Vec<usize> = splits.into_iter().map(|s| s.min(data.len())).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for p in points.into_iter().chain([data.len()]) {
                chunks.push(&data[from..p]);
                from = p;
            }
            let out = run(max, &chunks);
            let max = max as usize;
            if data.len() <= max {
                proptest::prop_assert_eq!(out, data);
            } else {
                let head = max / 2;
                let tail = max - head;
                let note = format!(
                    "\n[veraltheim: {} bytes of this output were cut here (jobs.max_log_bytes)]\n",
                    data.len() - max
                );
                let mut want = data[..head].to_vec();
                want.extend_from_slice(note.as_bytes());
                want.extend_from_slice(&data[data.len() - tail..]);
                proptest::prop_assert_eq!(out, want);
            }
        }
    }
}
