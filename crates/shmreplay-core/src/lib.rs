//! # shmreplay-core
//!
//! A shared-memory experience replay buffer for multi-process reinforcement learning: actor
//! processes insert transitions and learner processes sample random batches from one ring of
//! fixed-size records, concurrently, with no lock and no kernel object per slot.
//!
//! The crate is layered; each layer uses only the ones before it:
//!
//! * [`platform`]: the operating system and the CPU: mapping a segment file, copy kernels,
//!   kernel-held locks, process liveness, interrupts. All of the crate's `unsafe` is here.
//! * `layout`: where everything is in a segment (header, section directory, [`Schema`]); pure
//!   computation.
//! * [`protocol`]: the concurrency protocols (slot seqlock, handle table, flow control, attach/gc
//!   handshake), each model-checked with loom.
//! * the buffer ([`ReplayBuffer`]: writer, sampler, stats) and the registry ([`list`],
//!   [`remove`], [`remove_stale`]).
//!
//! Guarantees, in short:
//!
//! * One segment file per buffer (`/dev/shm/shmreplay.<name>` by default), created exclusively
//!   with mode 0600 and its whole size reserved up front, mapped by every process that attaches.
//! * Each slot is a seqlock: writers claim tickets from one atomic cursor and never wait for
//!   readers; readers validate every copy and redraw on a torn or in-progress slot.
//! * A writer killed mid-copy leaves its slot marked busy; readers skip it and the next writer
//!   of that slot takes it over once the owner is *proved* dead (its kernel lock released, or
//!   its pid gone); when death cannot be proved, writers wait (bounded, interruptible).
//!
//! ```
//! use shmreplay_core::{DType, ReplayBuffer, Schema};
//!
//! let schema = Schema::new(&[("obs", DType::U8, vec![4]), ("reward", DType::F32, vec![])])?;
//! let dir = std::env::temp_dir();
//! let name = shmreplay_core::unique_name();
//! let buffer = ReplayBuffer::builder(&name).dir(&dir).capacity(1000).schema(schema).create()?;
//!
//! // Two records, column-wise: 2 x 4 bytes of obs, 2 x f32 reward.
//! let rewards: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|r| r.to_le_bytes()).collect();
//! buffer.extend(&[&[1, 2, 3, 4, 5, 6, 7, 8], &rewards])?;
//!
//! // Any process: attach by name and sample a batch of 3 into caller-owned buffers.
//! let learner = ReplayBuffer::builder(&name).dir(&dir).open()?;
//! let (mut obs, mut reward) = (vec![0u8; 3 * 4], vec![0u8; 3 * 4]);
//! let (mut index, mut key) = (vec![0u64; 3], vec![0u64; 3]);
//! learner.sample_into(&mut [&mut obs, &mut reward], &mut index, &mut key)?;
//! assert!(index.iter().all(|&i| i < 2));
//! assert_eq!(learner.len(), 2);
//! buffer.unlink()?;
//! # Ok::<(), shmreplay_core::Error>(())
//! ```
//!
//! Prioritized replay (see `protocol::priority` for the lock-free sum tree): the same builder
//! with a [`Sampler`], priorities with inserts, draws in proportion to `(p + eps)^alpha`, and
//! updates from any process.
//!
//! ```
//! use shmreplay_core::{DType, NoBlocking, OutColumn, Prioritized, PriorityOutputs, ReplayBuffer, Sampler, Schema};
//!
//! let schema = Schema::new(&[("x", DType::U8, vec![])])?;
//! let sampler = Sampler::Prioritized(Prioritized { alpha: 1.0, eps: 0.0, stratified: true });
//! let name = shmreplay_core::unique_name();
//! let buffer = ReplayBuffer::builder(&name).dir(std::env::temp_dir()).capacity(8)
//!     .schema(schema).sampler(sampler).create()?;
//! let rows = [0u8, 1, 2];
//! buffer.extend_columns_with_priorities(
//!     &[shmreplay_core::InColumn::from_slice(&rows)], Some(&[1.0, 2.0, 4.0]), &mut NoBlocking)?;
//!
//! let (mut x, mut index, mut key) = (vec![0u8; 7], vec![0u64; 7], vec![0u64; 7]);
//! let (mut p, mut w, mut raw) = (vec![0f64; 7], vec![0f32; 7], vec![0f64; 7]);
//! let info = PriorityOutputs { probability: &mut p, weight: &mut w, priority: &mut raw };
//! buffer.sample_prioritized_columns(
//!     &[OutColumn::from_slice(&mut x)], &mut index, &mut key, info, 1.0, &mut NoBlocking)?;
//! // Stratified: of 7 rows, exactly 1, 2 and 4 come from the rows of priority 1, 2 and 4.
//! assert_eq!(x, [0, 1, 1, 2, 2, 2, 2]);
//! assert_eq!(w, [1.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25]);
//! assert!((p[0] - 1.0 / 7.0).abs() < 1e-12);
//!
//! // Any process: new priorities for the sampled records (stale keys are ignored).
//! assert_eq!(buffer.update_priorities(&key[..1], &[8.0], &mut NoBlocking)?, 1);
//! buffer.unlink()?;
//! # Ok::<(), shmreplay_core::Error>(())
//! ```
//!
//! Flow control (see `protocol::flow`): a [`Limiter`] makes samples and inserts wait for each
//! other as Reverb's rate limiters do, and [`Sampler::Queue`] delivers each row once, in insert
//! order. [`WaitUpTo`] bounds a call's wait; [`ReplayBuffer::shutdown`] ends every wait.
//!
//! ```
//! use std::time::Duration;
//! use shmreplay_core::{DType, Error, InColumn, OutColumn, ReplayBuffer, Sampler, Schema, WaitUpTo};
//!
//! let schema = Schema::new(&[("x", DType::U8, vec![])])?;
//! let name = shmreplay_core::unique_name();
//! let queue = ReplayBuffer::builder(&name).dir(std::env::temp_dir()).capacity(4)
//!     .schema(schema).sampler(Sampler::Queue).create()?;
//! let never = &mut WaitUpTo(Some(Duration::ZERO));
//! queue.extend_columns(&[InColumn::from_slice(&[10, 11, 12])], never)?;
//! // Full after 4 rows: inserts wait (here: time out at once) until consumers take rows.
//! let refused = queue.extend_columns(&[InColumn::from_slice(&[13, 14])], never);
//! assert!(matches!(refused, Err(Error::Timeout(_))));
//!
//! let (mut x, mut index, mut key) = (vec![0u8; 2], vec![0u64; 2], vec![0u64; 2]);
//! queue.sample_columns(&[OutColumn::from_slice(&mut x)], &mut index, &mut key, never)?;
//! assert_eq!((x, key), (vec![10, 11], vec![0, 1])); // in order, each row once
//! assert_eq!(queue.len(), 1);
//! queue.unlink()?;
//! # Ok::<(), shmreplay_core::Error>(())
//! ```
//!
//! Episode streams ([`EpisodeBuffer`]): writers append the frames of their episodes, each frame
//! stored once; samplers get frame stacks and n-step returns rebuilt from them.
//!
//! ```
//! use shmreplay_core::{DType, EpisodeBuffer, Episodes, InColumn, NoBlocking, OutColumn, Schema, StepColumns};
//!
//! let schema = Schema::new(&[("obs", DType::U8, vec![]), ("reward", DType::F32, vec![])])?;
//! let name = shmreplay_core::unique_name();
//! let buffer = EpisodeBuffer::builder(&name).dir(std::env::temp_dir()).capacity(100)
//!     .schema(schema)
//!     .episodes(Episodes { frame_stack: 2, n_step: 2, gamma: 0.5, ..Episodes::default() })
//!     .create()?;
//! // One env: o_0 = 10, then two steps (rewards 1 and 2) ending the episode at o_2 = 12.
//! let mut writer = buffer.writer(1)?;
//! buffer.reset(&mut writer, &[0], &[InColumn::from_slice(&[10])], &mut NoBlocking)?;
//! for (o, r, end) in [(11u8, 1f32, false), (12, 2.0, true)] {
//!     let (o, r) = ([o], r.to_ne_bytes());
//!     let columns = [InColumn::from_slice(&o), InColumn::from_slice(&r)];
//!     buffer.step(&mut writer, &columns, &[end], &[false], None, &mut NoBlocking)?;
//! }
//! // Step 0: stack (o_0 repeated, o_0), return 1 + 0.5·2, next stack (o_1, o_2), discount 0.25.
//! let (mut obs, mut next, mut reward) = ([0u8; 2], [0u8; 2], [0u8; 4]);
//! let (mut discount, mut terminated, mut truncated) = ([0u8; 4], [0u8; 1], [0u8; 1]);
//! let out = StepColumns {
//!     fields: vec![OutColumn::from_slice(&mut obs), OutColumn::from_slice(&mut reward)],
//!     next: vec![OutColumn::from_slice(&mut next)],
//!     discount: OutColumn::from_slice(&mut discount),
//!     terminated: OutColumn::from_slice(&mut terminated),
//!     truncated: OutColumn::from_slice(&mut truncated),
//! };
//! let (mut index, mut key) = ([0u64; 1], [0u64; 1]);
//! loop {
//!     buffer.sample_columns(&out, &mut index, &mut key, None, &mut NoBlocking)?;
//!     if key[0] == 1 { break } // the draw fell on step 0 (step 1 is the other one)
//! }
//! drop(out);
//! assert_eq!((obs, next), ([10, 10], [11, 12]));
//! assert_eq!((f32::from_ne_bytes(reward), f32::from_ne_bytes(discount)), (2.0, 0.25));
//! assert_eq!(terminated, [1]);
//! buffer.ring().unlink()?;
//! # Ok::<(), shmreplay_core::Error>(())
//! ```

#![cfg_attr(loom, allow(dead_code, unused_imports))]

mod error;
#[cfg(not(loom))]
mod layout;
pub mod protocol;
mod sync;

#[cfg(not(loom))]
mod buffer;
#[cfg(not(loom))]
pub mod platform;
#[cfg(not(loom))]
mod registry;

#[cfg(not(loom))]
pub use buffer::episodes::{
    EpisodeBuffer, EpisodeBuilder, EpisodeWriter, Episodes, SequenceColumns, StepColumns,
};
#[cfg(all(not(loom), feature = "test-hooks"))]
pub use buffer::PauseAt;
#[cfg(not(loom))]
pub use buffer::{
    Blocking, Builder, InColumn, NoBlocking, OutColumn, PriorityOutputs, PriorityStats,
    ReplayBuffer, SegmentInfo, Stats, WaitUpTo,
};
pub use error::{human_bytes, Error, Result};
#[cfg(not(loom))]
pub use layout::schema::{DType, Field, Schema};
#[cfg(not(loom))]
pub use layout::{
    Flow, Limiter, Padding, Prioritized, Sampler, LAYOUT_VERSION, MAX_CAPACITY, MAX_EPISODE_WINDOW,
    MAX_HANDLES,
};
#[cfg(not(loom))]
pub use platform::mapping::huge_page_size;
#[cfg(not(loom))]
pub use platform::{copy, interrupt};
#[cfg(not(loom))]
pub use registry::{
    list, remove, remove_segment, remove_stale, segment_path, unique_name, validate_name, Listing,
    Unreadable, DEFAULT_DIR, FILE_PREFIX, MAX_NAME_LEN,
};
