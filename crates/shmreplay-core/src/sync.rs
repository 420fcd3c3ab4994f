//! The atomics the protocols are written against: `std` (and `portable-atomic` for 128 bits)
//! normally, `loom` under `--cfg loom` so that the same protocol code is model-checked.
#[cfg(loom)]
pub(crate) use loom::{
    hint::spin_loop,
    sync::atomic::{fence, AtomicU32, AtomicU64, Ordering},
    thread::yield_now,
};
#[cfg(not(loom))]
pub(crate) use portable_atomic::AtomicU128;
#[cfg(not(loom))]
pub(crate) use std::{
    hint::spin_loop,
    sync::atomic::{fence, AtomicU32, AtomicU64, Ordering},
    thread::yield_now,
};

/// A 128-bit atomic for loom, which has none: a lock around the value is a faithful model of
/// an atomic cell whose every access is sequentially consistent.
#[cfg(loom)]
#[derive(Debug, Default)]
pub(crate) struct AtomicU128(loom::sync::Mutex<u128>);

#[cfg(loom)]
impl AtomicU128 {
    pub(crate) fn new(value: u128) -> Self {
        AtomicU128(loom::sync::Mutex::new(value))
    }
    pub(crate) fn load(&self, _: Ordering) -> u128 {
        *self.0.lock().unwrap()
    }
    pub(crate) fn store(&self, value: u128, _: Ordering) {
        *self.0.lock().unwrap() = value;
    }
    pub(crate) fn swap(&self, value: u128, _: Ordering) -> u128 {
        std::mem::replace(&mut *self.0.lock().unwrap(), value)
    }
    pub(crate) fn compare_exchange(
        &self,
        current: u128,
        new: u128,
        _: Ordering,
        _: Ordering,
    ) -> Result<u128, u128> {
        let mut value = self.0.lock().unwrap();
        if *value == current {
            *value = new;
            Ok(current)
        } else {
            Err(*value)
        }
    }
}
