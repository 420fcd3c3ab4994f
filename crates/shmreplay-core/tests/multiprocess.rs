//! Real processes: two writer processes and one sampler process share one buffer; every record
//! is self-validating, and the sampler checks each row it draws.
//!
//! The child processes are this same test binary, re-run on `child_process` with an env var.

use std::process::Command;
use std::time::{Duration, Instant};

use shmreplay_core::{DType, ReplayBuffer, Schema};

const PAYLOAD: usize = 4096;
const CHILD_ROLE: &str = "SHMREPLAY_TEST_CHILD";

fn schema() -> Schema {
    Schema::new(&[
        ("writer", DType::U32, vec![]),
        ("seq", DType::U64, vec![]),
        ("payload", DType::U8, vec![PAYLOAD]),
    ])
    .unwrap()
}

fn payload(writer: u32, seq: u64) -> Vec<u8> {
    let mut x = (u64::from(writer) << 48) ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..PAYLOAD)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn writer(buffer: &ReplayBuffer, id: u32, rows: u64) {
    for seq in 0..rows {
        let fields: [&[u8]; 3] = [&id.to_le_bytes(), &seq.to_le_bytes(), &payload(id, seq)];
        buffer.push(&fields).unwrap();
    }
}

/// Samples until `deadline`; returns (rows checked, torn rows).
fn sampler(buffer: &ReplayBuffer, deadline: Instant) -> (u64, u64) {
    let n = 16;
    let (mut w, mut s, mut p) = (vec![0u8; 4 * n], vec![0u8; 8 * n], vec![0u8; PAYLOAD * n]);
    let (mut index, mut key) = (vec![0u64; n], vec![0u64; n]);
    let (mut checked, mut torn) = (0, 0);
    while Instant::now() < deadline {
        if buffer.is_empty() {
            std::thread::yield_now();
            continue;
        }
        buffer
            .sample_into(&mut [&mut w, &mut s, &mut p], &mut index, &mut key)
            .unwrap();
        for row in 0..n {
            let id = u32::from_le_bytes(w[4 * row..4 * row + 4].try_into().unwrap());
            let seq = u64::from_le_bytes(s[8 * row..8 * row + 8].try_into().unwrap());
            if p[PAYLOAD * row..PAYLOAD * (row + 1)] != payload(id, seq)[..] {
                torn += 1;
            }
            checked += 1;
        }
    }
    (checked, torn)
}

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_process() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let dir = std::env::var("SHMREPLAY_TEST_DIR").unwrap();
    let name = std::env::var("SHMREPLAY_TEST_NAME").unwrap();
    let buffer = ReplayBuffer::attach(&name, Some(dir.as_ref())).unwrap();
    match role.as_str() {
        "writer-1" => writer(&buffer, 1, 20_000),
        "writer-2" => writer(&buffer, 2, 20_000),
        "sampler" => {
            let (checked, torn) = sampler(&buffer, Instant::now() + Duration::from_secs(2));
            println!("sampler checked {checked} rows, {torn} torn");
            assert!(checked > 0);
            assert_eq!(torn, 0, "torn rows seen by the sampler process");
        }
        other => panic!("unknown child role {other}"),
    }
}

#[test]
fn writers_and_sampler_in_separate_processes() {
    let dir = std::env::temp_dir();
    let name = shmreplay_core::unique_name();
    // A small ring so that slots are overwritten while the sampler copies them.
    let buffer = ReplayBuffer::create(&name, Some(&dir), 64, schema()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = ["writer-1", "writer-2", "sampler"]
        .iter()
        .map(|role| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_process",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ROLE, role)
                .env("SHMREPLAY_TEST_DIR", &dir)
                .env("SHMREPLAY_TEST_NAME", &name)
                .spawn()
                .unwrap()
        })
        .collect();
    let statuses: Vec<_> = children
        .into_iter()
        .map(|mut c| c.wait().unwrap())
        .collect();
    buffer.unlink().unwrap();
    assert!(
        statuses.iter().all(|s| s.success()),
        "a child failed: {statuses:?}"
    );
    let stats = buffer.stats();
    assert_eq!(stats.inserts + stats.superseded, 40_000);
    assert_eq!(buffer.len(), 64);
    // Every slot holds a whole record of one of the writers.
    for slot in 0..64 {
        let (mut w, mut s, mut p) = ([0u8; 4], [0u8; 8], vec![0u8; PAYLOAD]);
        buffer
            .read(slot, &mut [&mut w, &mut s, &mut p])
            .unwrap()
            .unwrap();
        assert_eq!(p, payload(u32::from_le_bytes(w), u64::from_le_bytes(s)));
    }
    assert_eq!(stats.attached, 1, "children released their handles on exit");
}
