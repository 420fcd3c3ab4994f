//! The concurrency protocols, each on plain atomics (or a lock trait) so that it compiles
//! under `--cfg loom` and is model-checked there (`make loom`):
//!
//! * [`slot`]: the per-slot seqlock: claim, commit, read, validate.
//! * [`handles`]: the handle table's intents and counters, which keep the size exact whoever
//!   dies where.
//! * [`flow`]: the rate limiter's formulas and the wait/wake handshake of flow control.
//! * [`episode`]: the links between the frames of an episode, never followed into another.
//! * `gate`: the attach / gc handshake that never removes a buffer someone holds.
//! * `priority`: the sum tree of priorities, exact and lock-free, repaired after deaths.

pub mod episode;
pub mod flow;
pub(crate) mod gate;
pub mod handles;
pub(crate) mod priority;
pub mod slot;
