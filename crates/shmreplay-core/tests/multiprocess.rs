//! Real processes: two writer processes and one sampler process share one small buffer, all
//! three released at the same instant; every record is self-validating, and the sampler checks
//! each row it draws.
//!
//! The test proves the overlap instead of hoping for it. The sampler starts while the writers
//! have barely begun and samples until it has watched the insert count grow under it at least
//! `TARGET_DISTINCT_COUNTS` times, in at least `TARGET_OVERLAPPED` batches during which records
//! were committed, and has redrawn rows it found being written (`retries`: with a ring of 8
//! slots the writers lap the sampler constantly); only then does it tell the writers they may
//! stop (after `MIN_ROWS` rows each), and it samples on until they have. On a loaded machine
//! that takes longer, never less: the whole run is bounded by `TIME_LIMIT`, and the parent
//! checks every target.
//!
//! The child processes are this same test binary, re-run on `child_process` with env vars.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shmreplay_core::{DType, Error, ReplayBuffer, Schema};

const PAYLOAD: usize = 4096;
/// Small enough that the writers lap each other and the sampler many times a millisecond.
const CAPACITY: u64 = 8;
const WRITERS: [u32; 2] = [1, 2];
/// Rows each writer inserts at least; it goes on until the sampler has seen enough.
const MIN_ROWS: u64 = 50_000;
/// Distinct insert counts the sampler must see at the start of its batches.
const TARGET_DISTINCT_COUNTS: u64 = 200;
/// Batches during which the writers must have committed records.
const TARGET_OVERLAPPED: u64 = 100;
/// Rows per sample call.
const BATCH: usize = 16;
/// Upper bound on the whole test; the children give up before it, and are killed after it.
const TIME_LIMIT: Duration = Duration::from_secs(18);
const CHILD_TIME_LIMIT: Duration = Duration::from_secs(12);
const CHILD_ROLE: &str = "SHMREPLAY_TEST_CHILD";
const CHILD_DIR: &str = "SHMREPLAY_TEST_DIR";
const CHILD_NAME: &str = "SHMREPLAY_TEST_NAME";

fn schema() -> Schema {
    Schema::new(&[
        ("writer", DType::U32, vec![]),
        ("seq", DType::U64, vec![]),
        ("payload", DType::U8, vec![PAYLOAD]),
    ])
    .unwrap()
}

/// The payload of row `seq` of `writer`: every 8 bytes differ between any two rows, so a row
/// mixed from two records never matches the payload its `writer` and `seq` fields name. Cheap
/// (one mix per word), so that the writers spend their time copying into the ring.
fn payload(writer: u32, seq: u64) -> Vec<u8> {
    let mut x = (u64::from(writer) << 48) ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::with_capacity(PAYLOAD);
    for _ in 0..PAYLOAD / 8 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

// The files the processes coordinate through, in the test's own directory.

/// A child is attached (attaching prefaults the mapping, which takes a while).
fn ready_path(dir: &Path, role: &str) -> PathBuf {
    dir.join(format!("ready-{role}"))
}

/// The start time (unix ns), written by the parent once every child is ready.
fn go_path(dir: &Path) -> PathBuf {
    dir.join("go")
}

/// The sampler has seen enough: the writers may stop.
fn enough_path(dir: &Path) -> PathBuf {
    dir.join("enough")
}

/// What a child reports to the parent.
fn report_path(dir: &Path, role: &str) -> PathBuf {
    dir.join(format!("{role}.out"))
}

/// The start line: reports ready, waits for the parent's start time (a few milliseconds
/// ahead), and spins until then, so that all three children start within microseconds of
/// each other.
fn wait_for_start(dir: &Path, role: &str) {
    std::fs::write(ready_path(dir, role), b"").unwrap();
    let waited = Instant::now();
    let start = loop {
        if let Ok(text) = std::fs::read_to_string(go_path(dir)) {
            if let Ok(start) = text.trim().parse::<u64>() {
                break start;
            }
        }
        assert!(
            waited.elapsed() < CHILD_TIME_LIMIT,
            "{role}: no start signal"
        );
        std::thread::sleep(Duration::from_micros(100));
    };
    while unix_nanos() < start {
        std::hint::spin_loop();
    }
}

/// Inserts rows `0, 1, ...` until it has inserted `MIN_ROWS` and the sampler has seen enough;
/// returns how many.
fn writer(buffer: &ReplayBuffer, dir: &Path, id: u32) -> u64 {
    let started = Instant::now();
    let mut seq = 0u64;
    loop {
        let fields: [&[u8]; 3] = [&id.to_le_bytes(), &seq.to_le_bytes(), &payload(id, seq)];
        buffer.push(&fields).unwrap();
        seq += 1;
        if seq % 256 == 0
            && seq >= MIN_ROWS
            && (enough_path(dir).exists() || started.elapsed() > CHILD_TIME_LIMIT)
        {
            return seq;
        }
    }
}

/// What the sampler saw.
#[derive(Debug, Default)]
struct Seen {
    /// Rows checked, rows that were not whole records, rows per writer.
    checked: u64,
    torn: u64,
    per_writer: [u64; 2],
    batches: u64,
    /// Records the writers were done with (inserts + superseded, over all handles) when the
    /// sampler's first batch began.
    first_progress: u64,
    /// Distinct values of that count at the start of a batch.
    distinct_counts: u64,
    /// Batches during which the writers committed records.
    overlapped: u64,
    /// The sampler's redrawn rows (slots being written, or overwritten while copied).
    retries: u64,
}

impl Seen {
    fn encode(&self) -> String {
        [
            self.checked,
            self.torn,
            self.per_writer[0],
            self.per_writer[1],
            self.batches,
            self.first_progress,
            self.distinct_counts,
            self.overlapped,
            self.retries,
        ]
        .map(|v| v.to_string())
        .join(" ")
    }

    fn decode(text: &str) -> Seen {
        let v: Vec<u64> = text
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        Seen {
            checked: v[0],
            torn: v[1],
            per_writer: [v[2], v[3]],
            batches: v[4],
            first_progress: v[5],
            distinct_counts: v[6],
            overlapped: v[7],
            retries: v[8],
        }
    }

    fn enough(&self) -> bool {
        self.distinct_counts >= TARGET_DISTINCT_COUNTS
            && self.overlapped >= TARGET_OVERLAPPED
            && self.retries > 0
            && self.per_writer.iter().all(|&n| n > 0)
    }
}

/// Records the writers are done with (inserted, or dropped as superseded).
fn progress(buffer: &ReplayBuffer) -> u64 {
    let stats = buffer.stats();
    stats.inserts + stats.superseded
}

/// Samples from the start until it has seen the writers at work enough, then tells them so, and
/// samples on until they are done (or time runs out), checking every row.
fn sampler(buffer: &ReplayBuffer, dir: &Path) -> Seen {
    let (mut w, mut s, mut p) = (
        vec![0u8; 4 * BATCH],
        vec![0u8; 8 * BATCH],
        vec![0u8; PAYLOAD * BATCH],
    );
    let (mut index, mut key) = (vec![0u64; BATCH], vec![0u64; BATCH]);
    let mut seen = Seen::default();
    let mut last_count = None;
    let retries_before = buffer.stats().retries;
    let started = Instant::now();
    let mut signalled = false;
    let writers_done = || {
        WRITERS
            .iter()
            .all(|w| report_path(dir, &format!("writer-{w}")).exists())
    };
    while started.elapsed() < CHILD_TIME_LIMIT {
        if seen.enough() {
            if !signalled {
                std::fs::write(enough_path(dir), b"").unwrap();
                signalled = true;
            }
            if writers_done() {
                break;
            }
        }
        let before = progress(buffer);
        match buffer.sample_into(&mut [&mut w, &mut s, &mut p], &mut index, &mut key) {
            Ok(()) => {}
            Err(Error::Empty) if seen.batches == 0 => {
                std::hint::spin_loop();
                continue;
            }
            Err(e) => panic!("sample: {e}"),
        }
        if seen.batches == 0 {
            seen.first_progress = before;
        }
        seen.batches += 1;
        if last_count != Some(before) {
            seen.distinct_counts += 1;
            last_count = Some(before);
        }
        for row in 0..BATCH {
            let id = u32::from_le_bytes(w[4 * row..4 * row + 4].try_into().unwrap());
            let seq = u64::from_le_bytes(s[8 * row..8 * row + 8].try_into().unwrap());
            let whole = WRITERS.contains(&id)
                && p[PAYLOAD * row..PAYLOAD * (row + 1)] == payload(id, seq)[..];
            if whole {
                seen.per_writer[id as usize - 1] += 1;
            } else {
                seen.torn += 1;
            }
            seen.checked += 1;
        }
        if progress(buffer) > before {
            seen.overlapped += 1;
        }
        seen.retries = buffer.stats().retries - retries_before;
    }
    if !signalled {
        std::fs::write(enough_path(dir), b"").unwrap();
    }
    seen
}

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_process() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(CHILD_DIR).unwrap());
    let name = std::env::var(CHILD_NAME).unwrap();
    let buffer = ReplayBuffer::attach(&name, Some(&dir)).unwrap();
    wait_for_start(&dir, &role);
    let report = match role.as_str() {
        "writer-1" => writer(&buffer, &dir, 1).to_string(),
        "writer-2" => writer(&buffer, &dir, 2).to_string(),
        "sampler" => {
            let seen = sampler(&buffer, &dir);
            println!("sampler: {seen:?}");
            assert_eq!(seen.torn, 0, "torn rows seen by the sampler process");
            seen.encode()
        }
        other => panic!("unknown child role {other}"),
    };
    std::fs::write(report_path(&dir, &role), report).unwrap();
}

/// Waits for `child` until `deadline`, killing it (by its own pid) if it overstays.
fn wait_or_kill(child: &mut Child, deadline: Instant) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!(
                "child {} still running after {TIME_LIMIT:?}: killed ({status})",
                child.id()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn writers_and_sampler_in_separate_processes() {
    let started = Instant::now();
    let deadline = started + TIME_LIMIT;
    let dir = std::env::temp_dir().join(format!("shmreplay-multiprocess-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let name = shmreplay_core::unique_name();
    let buffer = ReplayBuffer::create(&name, Some(&dir), CAPACITY, schema()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let roles = ["writer-1", "writer-2", "sampler"];
    let mut children: Vec<Child> = roles
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
                .env(CHILD_DIR, &dir)
                .env(CHILD_NAME, &name)
                .spawn()
                .unwrap()
        })
        .collect();
    // The start line: everyone attached, then go, 5 ms from now.
    while !roles.iter().all(|r| ready_path(&dir, r).exists()) {
        if let Some((i, status)) = children
            .iter_mut()
            .enumerate()
            .find_map(|(i, c)| c.try_wait().unwrap().map(|s| (i, s)))
        {
            panic!("{} exited before the start: {status}", roles[i]);
        }
        assert!(Instant::now() < deadline, "children never got ready");
        std::thread::sleep(Duration::from_micros(200));
    }
    let go = go_path(&dir);
    let tmp = dir.join("go.tmp");
    std::fs::write(&tmp, (unix_nanos() + 5_000_000).to_string()).unwrap();
    std::fs::rename(&tmp, &go).unwrap();
    let statuses: Vec<_> = children
        .iter_mut()
        .map(|c| wait_or_kill(c, deadline))
        .collect();
    let reports: Vec<_> = roles
        .iter()
        .map(|r| std::fs::read_to_string(report_path(&dir, r)))
        .collect();
    buffer.unlink().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        statuses.iter().all(|s| s.success()),
        "a child failed: {statuses:?}"
    );
    let reports: Vec<String> = reports.into_iter().map(|r| r.unwrap()).collect();
    let written: u64 = reports[..2].iter().map(|r| r.parse::<u64>().unwrap()).sum();
    let seen = Seen::decode(&reports[2]);
    eprintln!(
        "writers wrote {written} rows; the sampler saw {seen:?}; in {:?}",
        started.elapsed()
    );

    // The sampler ran alongside the writers, from (nearly) their start.
    assert!(
        seen.first_progress < written / 2,
        "the sampler started late: {} of {written} records were already written",
        seen.first_progress
    );
    assert!(
        seen.distinct_counts >= TARGET_DISTINCT_COUNTS,
        "the sampler saw the insert count at only {} distinct values",
        seen.distinct_counts
    );
    assert!(
        seen.overlapped >= TARGET_OVERLAPPED,
        "only {} of {} batches overlapped the writers' inserts",
        seen.overlapped,
        seen.batches
    );
    assert!(
        seen.per_writer.iter().all(|&n| n > 0),
        "the sampler did not see both writers: {:?}",
        seen.per_writer
    );
    // The writers lapped the sampler: it hit slots being written and redrew them.
    assert!(seen.retries > 0, "no retry: the sampler never met a writer");

    let stats = buffer.stats();
    assert_eq!(stats.inserts + stats.superseded, written);
    assert_eq!(stats.retries, seen.retries, "only the sampler samples");
    assert_eq!(stats.samples, seen.checked);
    assert_eq!(stats.lost, 0);
    assert_eq!(stats.recovered, 0, "no writer died");
    assert_eq!(buffer.len(), CAPACITY);
    // Every slot holds a whole record of one of the writers.
    for slot in 0..CAPACITY {
        let (mut w, mut s, mut p) = ([0u8; 4], [0u8; 8], vec![0u8; PAYLOAD]);
        buffer
            .read(slot, &mut [&mut w, &mut s, &mut p])
            .unwrap()
            .unwrap();
        assert_eq!(p, payload(u32::from_le_bytes(w), u64::from_le_bytes(s)));
    }
    assert_eq!(stats.attached, 1, "children released their handles on exit");
}
