//! Seeded handles: two handles seeded alike draw the same rows from a buffer in the same state
//! (uniform, prioritized stratified and i.i.d.); another seed draws others; reseeding restarts
//! the sequence; unseeded handles draw different rows.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use shmreplay_core::{
    Builder, DType, NoBlocking, OutColumn, Prioritized, PriorityOutputs, ReplayBuffer, Sampler,
    Schema,
};

const ROWS: u64 = 1000;
const BATCH: usize = 64;

fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "seed-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn dir() -> PathBuf {
    std::env::temp_dir()
}

/// A buffer of `ROWS` rows (`x` = the row's number), made with `sampler`; prioritized rows get
/// priorities 1..=ROWS so that draws depend on the tree.
fn filled(sampler: Sampler) -> ReplayBuffer {
    let schema = Schema::new(&[("x", DType::U64, vec![])]).unwrap();
    let buf = ReplayBuffer::builder(&unique("buf"))
        .dir(dir())
        .capacity(ROWS)
        .schema(schema)
        .sampler(sampler)
        .create()
        .unwrap();
    let values: Vec<u8> = (0..ROWS).flat_map(|x| x.to_le_bytes()).collect();
    match sampler {
        Sampler::Prioritized(_) => {
            let priorities: Vec<f64> = (1..=ROWS).map(|p| p as f64).collect();
            buf.extend_columns_with_priorities(
                &[shmreplay_core::InColumn::from_slice(&values)],
                Some(&priorities),
                &mut NoBlocking,
            )
            .unwrap();
        }
        _ => {
            buf.extend(&[&values]).unwrap();
        }
    }
    buf
}

/// Three calls' draws (slots) of `buf`.
fn draws(buf: &ReplayBuffer) -> Vec<u64> {
    let mut all = Vec::new();
    for _ in 0..3 {
        let mut out = vec![0u8; BATCH * 8];
        let mut index = vec![0u64; BATCH];
        let mut key = vec![0u64; BATCH];
        if let Sampler::Prioritized(_) = buf.sampler() {
            let (mut p, mut w, mut r) = (vec![0.0; BATCH], vec![0.0f32; BATCH], vec![0.0; BATCH]);
            buf.sample_prioritized_columns(
                &[OutColumn::from_slice(&mut out)],
                &mut index,
                &mut key,
                PriorityOutputs {
                    probability: &mut p,
                    weight: &mut w,
                    priority: &mut r,
                },
                0.4,
                &mut NoBlocking,
            )
            .unwrap();
        } else {
            buf.sample_into(&mut [&mut out], &mut index, &mut key)
                .unwrap();
        }
        // The rows are the records of the slots drawn.
        for (row, &slot) in index.iter().enumerate() {
            let x = u64::from_le_bytes(out[row * 8..row * 8 + 8].try_into().unwrap());
            assert_eq!(x, slot);
            assert_eq!(key[row], slot);
        }
        all.extend(index);
    }
    all
}

fn attach(buf: &ReplayBuffer, seed: Option<u64>) -> ReplayBuffer {
    let builder: Builder = ReplayBuffer::builder(buf.name()).dir(dir()).seed_opt(seed);
    builder.open().unwrap()
}

fn check(sampler: Sampler) {
    let buf = filled(sampler);
    let a = attach(&buf, Some(7));
    let b = attach(&buf, Some(7));
    let first = draws(&a);
    assert_eq!(first, draws(&b), "{sampler:?}: same seed, same draws");
    // Another seed: other draws.
    b.reseed(8);
    let other = draws(&b);
    assert_ne!(first, other, "{sampler:?}: another seed");
    // Reseeding restarts the sequence, on any handle (the creator's too).
    b.reseed(7);
    buf.reseed(7);
    assert_eq!(first, draws(&b));
    assert_eq!(first, draws(&buf));
    // Unseeded handles: different draws.
    let (c, d) = (attach(&buf, None), attach(&buf, None));
    assert_ne!(draws(&c), draws(&d), "{sampler:?}: unseeded handles");
    buf.unlink().unwrap();
}

#[test]
fn uniform_draws_follow_the_seed() {
    check(Sampler::Uniform);
}

#[test]
fn prioritized_draws_follow_the_seed() {
    for stratified in [true, false] {
        check(Sampler::Prioritized(Prioritized {
            stratified,
            ..Prioritized::default()
        }));
    }
}

#[test]
fn seed_on_create() {
    let schema = Schema::new(&[("x", DType::U64, vec![])]).unwrap();
    let buf = ReplayBuffer::builder(&unique("create"))
        .dir(dir())
        .capacity(ROWS)
        .schema(schema)
        .seed(3)
        .create()
        .unwrap();
    let values: Vec<u8> = (0..ROWS).flat_map(|x| x.to_le_bytes()).collect();
    buf.extend(&[&values]).unwrap();
    let other = attach(&buf, Some(3));
    assert_eq!(draws(&buf), draws(&other));
    buf.unlink().unwrap();
}
