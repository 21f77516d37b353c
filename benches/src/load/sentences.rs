//! Sentences for the text benchmarks (`text`, `cosched`): a seeded generator of a realistic mix
//! of lengths (about 10 to 80 characters: short phrases and subject–verb–object sentences with
//! an optional tail; about 5 to 18 tokens with all-MiniLM-L6-v2's WordPiece tokenizer), and the
//! statistics of a list of token counts (mean, p10/p50/p90, min, max).
//!
//! Deterministic: the same seed gives the same sentences on every machine (SplitMix64, no
//! dependency).

use serde::Serialize;

/// A small deterministic generator (SplitMix64): the same seed gives the same arrivals and
/// sentences on every machine, with no dependency.
#[derive(Clone, Debug)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so that its logarithm is finite.
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

const SHORT: &[&str] = &[
    "Good morning.",
    "Thanks a lot!",
    "See you soon.",
    "Where is it?",
    "It works now.",
    "Call me later.",
];
const SUBJECTS: &[&str] = &[
    "The cat",
    "A man",
    "My neighbour",
    "The old bridge",
    "Our team",
    "She",
    "The committee",
    "A small bird",
    "The train to Paris",
    "Everyone in the office",
    "The children",
    "This recipe",
];
const VERBS: &[&str] = &[
    "is eating",
    "repaired",
    "will visit",
    "has forgotten",
    "painted",
    "sold",
    "is watching",
    "found",
    "wrote about",
    "cannot find",
    "needs",
    "described",
];
const OBJECTS: &[&str] = &[
    "a piece of bread",
    "the red car",
    "the report",
    "an old guitar",
    "the keys",
    "a letter",
    "the garden",
    "three tickets",
    "the new museum",
    "a cup of coffee",
    "the river",
    "the results",
];
const TAILS: &[&str] = &[
    "",
    "",
    " yesterday",
    " in the morning",
    " after the long meeting",
    " near the station",
    " with great care",
    " before the storm arrived",
    " for the second time this week",
];

/// `n` sentences of mixed lengths (about 10 to 80 characters, like the realistic sentences
/// of the `text` measurements): short phrases and subject–verb–object sentences with an
/// optional tail, drawn from `seed`.
pub fn sentences(n: usize, seed: u64) -> Vec<String> {
    let mut rng = SplitMix::new(seed);
    (0..n)
        .map(|_| {
            if rng.below(8) == 0 {
                return SHORT[rng.below(SHORT.len())].to_string();
            }
            let mut s = format!(
                "{} {} {}{}.",
                SUBJECTS[rng.below(SUBJECTS.len())],
                VERBS[rng.below(VERBS.len())],
                OBJECTS[rng.below(OBJECTS.len())],
                TAILS[rng.below(TAILS.len())]
            );
            if s.len() > 80 {
                s.truncate(79);
                s.push('.');
            }
            s
        })
        .collect()
}

/// Tokens per sentence over a list of sentences.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenStats {
    pub sentences: usize,
    pub total: u64,
    pub mean: f64,
    pub min: usize,
    pub p10: usize,
    pub p50: usize,
    pub p90: usize,
    pub max: usize,
}

impl TokenStats {
    /// The statistics of `counts` (tokens of each sentence); `None` for no sentence.
    /// Percentiles are nearest-rank: the smallest count with at least that share of the
    /// sentences at or below it.
    pub fn of(counts: &[usize]) -> Option<TokenStats> {
        if counts.is_empty() {
            return None;
        }
        let mut sorted = counts.to_vec();
        sorted.sort_unstable();
        let n = sorted.len();
        let rank = |percent: usize| sorted[(percent * n).div_ceil(100).clamp(1, n) - 1];
        let total: u64 = sorted.iter().map(|&c| c as u64).sum();
        Some(TokenStats {
            sentences: n,
            total,
            mean: total as f64 / n as f64,
            min: sorted[0],
            p10: rank(10),
            p50: rank(50),
            p90: rank(90),
            max: sorted[n - 1],
        })
    }
}

/// The mean tokens per request when request `i` of `counts` was sent `weights[i]` times;
/// `None` when the lengths differ or nothing was sent.
pub fn weighted_mean(counts: &[usize], weights: &[u64]) -> Option<f64> {
    if counts.len() != weights.len() {
        return None;
    }
    let sent: u64 = weights.iter().sum();
    if sent == 0 {
        return None;
    }
    let tokens: f64 = counts
        .iter()
        .zip(weights)
        .map(|(&c, &w)| c as f64 * w as f64)
        .sum();
    Some(tokens / sent as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_are_mixed_and_reproducible() {
        let a = sentences(2000, 7);
        assert_eq!(a, sentences(2000, 7));
        assert_ne!(a, sentences(2000, 8));
        let lens: Vec<usize> = a.iter().map(String::len).collect();
        let (min, max) = (*lens.iter().min().unwrap(), *lens.iter().max().unwrap());
        assert!(min >= 10 && max <= 80, "{min}..{max}");
        // Mixed lengths: short phrases and long sentences both occur.
        assert!(min <= 15 && max >= 60, "{min}..{max}");
    }
}
