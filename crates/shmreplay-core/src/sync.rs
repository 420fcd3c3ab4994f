//! The atomics the slot protocol is written against: `std` normally, `loom` under `--cfg loom`
//! so that the same protocol code is model-checked.
#[cfg(loom)]
pub(crate) use loom::{
    hint::spin_loop,
    sync::atomic::{fence, AtomicU64, Ordering},
    thread::yield_now,
};
#[cfg(not(loom))]
pub(crate) use std::{
    hint::spin_loop,
    sync::atomic::{fence, AtomicU64, Ordering},
    thread::yield_now,
};
