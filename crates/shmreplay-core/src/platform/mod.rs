//! The platform layer: everything that talks to the operating system or the CPU, and the only
//! `unsafe` code of the crate.
//!
//! * `mapping`: a segment file mapped into memory, with bounds-checked atomic access.
//! * [`copy`]: copy kernels between private memory and live shared memory.
//! * [`memory`]: the caller's memory as raw, bounds-checked byte ranges.
//! * `futex`: sleeping on a word of the segment until another process changes it.
//! * `files`: creating segment files whole, reserving their space, removing them safely.
//! * `locks`: kernel-held tokens (OFD byte-range locks) that prove a handle's death.
//! * [`liveness`]: process identity and three-valued liveness.
//! * [`interrupt`]: letting an embedding runtime (Python's Ctrl-C) stop a waiting call.

pub mod copy;
pub(crate) mod files;
pub(crate) mod futex;
pub mod interrupt;
pub mod liveness;
pub(crate) mod locks;
pub(crate) mod mapping;
pub mod memory;
