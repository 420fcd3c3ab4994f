//! # shmreplay-core
//!
//! A shared-memory experience replay buffer for multi-process reinforcement learning: actor
//! processes insert transitions and learner processes sample random batches from one ring of
//! fixed-size records, concurrently, with no lock and no kernel object per slot.
//!
//! * One segment file per buffer (`/dev/shm/shmreplay.<name>` by default), created exclusively
//!   with mode 0600 and its whole size reserved up front, mapped by every process that attaches.
//! * Each slot is a seqlock ([`slot`]): writers claim tickets from one atomic cursor and never
//!   wait for readers; readers validate every copy and redraw on a torn or in-progress slot.
//! * A writer killed mid-copy leaves its slot marked busy; readers skip it and the next writer of
//!   that slot takes it over once the owner is known dead ([`process`]).
//! * All shared bytes are accessed atomically ([`copy`]); `unsafe` lives only in `copy` and
//!   `segment`.
//!
//! ```
//! use shmreplay_core::{DType, ReplayBuffer, Schema};
//!
//! let schema = Schema::new(&[("obs", DType::U8, vec![4]), ("reward", DType::F32, vec![])])?;
//! let dir = std::env::temp_dir();
//! let name = shmreplay_core::unique_name();
//! let buffer = ReplayBuffer::create(&name, Some(&dir), 1000, schema)?;
//!
//! // Two records, column-wise: 2 x 4 bytes of obs, 2 x f32 reward.
//! let rewards: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|r| r.to_le_bytes()).collect();
//! buffer.extend(&[&[1, 2, 3, 4, 5, 6, 7, 8], &rewards])?;
//!
//! // Any process: attach by name and sample a batch of 3 into caller-owned buffers.
//! let learner = ReplayBuffer::attach(&name, Some(&dir))?;
//! let (mut obs, mut reward) = (vec![0u8; 3 * 4], vec![0u8; 3 * 4]);
//! let (mut index, mut key) = (vec![0u64; 3], vec![0u64; 3]);
//! learner.sample_into(&mut [&mut obs, &mut reward], &mut index, &mut key)?;
//! assert!(index.iter().all(|&i| i < 2));
//! assert_eq!(learner.len(), 2);
//! buffer.unlink()?;
//! # Ok::<(), shmreplay_core::Error>(())
//! ```

#![cfg_attr(loom, allow(dead_code))]

mod error;
#[cfg(not(loom))]
pub mod interrupt;
mod schema;
pub mod slot;
mod sync;

#[cfg(not(loom))]
mod buffer;
#[cfg(not(loom))]
pub mod copy;
#[cfg(not(loom))]
pub mod process;
#[cfg(not(loom))]
mod segment;

#[cfg(not(loom))]
pub use buffer::{
    list, remove, remove_stale, segment_path, unique_name, validate_name, Listing, ReplayBuffer,
    SegmentInfo, Stats, Unreadable, DEFAULT_DIR, FILE_PREFIX, MAX_CAPACITY, MAX_HANDLES,
    MAX_NAME_LEN,
};
pub use error::{human_bytes, Error, Result};
pub use schema::{DType, Field, Schema};
