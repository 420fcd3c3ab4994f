//! Actor processes insert transitions while a learner samples batches, all through one
//! shared-memory buffer, from Rust alone.
//!
//! ```text
//! cargo run --release -p shmreplay-core --example actor_learner
//! ```
//!
//! The example re-runs its own binary as the actor processes (`actor_learner actor NAME ID`).

use std::process::Command;
use std::time::{Duration, Instant};

use shmreplay_core::{DType, ReplayBuffer, Schema};

const OBS: usize = 4 * 84 * 84;
const STEPS_PER_ACTOR: u64 = 5_000;
const BATCH: usize = 32;

fn schema() -> shmreplay_core::Result<Schema> {
    Schema::new(&[
        ("obs", DType::U8, vec![4, 84, 84]),
        ("action", DType::I32, vec![]),
        ("reward", DType::F32, vec![]),
        ("actor", DType::I32, vec![]),
        ("step", DType::I64, vec![]),
    ])
}

/// One actor: pushes `STEPS_PER_ACTOR` transitions whose frame bytes encode (actor, step).
fn actor(name: &str, id: i32) -> shmreplay_core::Result<()> {
    let buffer = ReplayBuffer::attach(name, None)?;
    let mut obs = vec![0u8; OBS];
    for step in 0..STEPS_PER_ACTOR as i64 {
        obs.fill((step as u8).wrapping_add(id as u8));
        let action = (step % 6) as i32;
        let reward = if step % 100 == 0 { 1.0f32 } else { 0.0 };
        buffer.push(&[
            &obs,
            &action.to_le_bytes(),
            &reward.to_le_bytes(),
            &id.to_le_bytes(),
            &step.to_le_bytes(),
        ])?;
    }
    Ok(())
}

/// The learner: starts the actors, samples batches until they are done, checks every row.
fn learner() -> Result<(), Box<dyn std::error::Error>> {
    let name = shmreplay_core::unique_name();
    let buffer = ReplayBuffer::create(&name, None, 10_000, schema()?)?;
    println!(
        "created {} ({} MB)",
        buffer.path().display(),
        buffer.segment_bytes() >> 20
    );
    let exe = std::env::current_exe()?;
    let mut actors = (0..2)
        .map(|id| {
            Command::new(&exe)
                .args(["actor", &name, &id.to_string()])
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;

    let (mut obs, mut action, mut reward) = (
        vec![0u8; BATCH * OBS],
        vec![0u8; BATCH * 4],
        vec![0u8; BATCH * 4],
    );
    let (mut actor_ids, mut steps) = (vec![0u8; BATCH * 4], vec![0u8; BATCH * 8]);
    let (mut index, mut key) = (vec![0u64; BATCH], vec![0u64; BATCH]);
    let started = Instant::now();
    let mut batches = 0u64;
    while actors.iter_mut().any(|a| matches!(a.try_wait(), Ok(None))) {
        if buffer.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut out = [
            &mut obs[..],
            &mut action[..],
            &mut reward[..],
            &mut actor_ids[..],
            &mut steps[..],
        ];
        buffer.sample_into(&mut out, &mut index, &mut key)?;
        for row in 0..BATCH {
            let id = i32::from_le_bytes(actor_ids[4 * row..4 * row + 4].try_into()?);
            let step = i64::from_le_bytes(steps[8 * row..8 * row + 8].try_into()?);
            let expected = (step as u8).wrapping_add(id as u8);
            assert!(
                obs[row * OBS..(row + 1) * OBS]
                    .iter()
                    .all(|&b| b == expected),
                "torn row"
            );
        }
        batches += 1;
    }
    for mut a in actors {
        assert!(a.wait()?.success(), "an actor failed");
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = buffer.stats();
    println!(
        "{} inserts and {} sampled rows in {seconds:.2} s ({batches} batches, {} retries), every row intact",
        stats.inserts, stats.samples, stats.retries
    );
    buffer.unlink()?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("actor") => Ok(actor(&args[2], args[3].parse()?)?),
        _ => learner(),
    }
}
